"""Data × expert parallelism on ``torch.distributed``, applied from outside the model: one API,
the mesh (``moekit.distributed.mesh``, as torchtitan lays it out).

    config = ParallelConfig(ep=2)                      # dp_shard: the rest of the world
    meshes = config.resolve(world, num_experts).build_meshes("cuda")
    parallelize(model, meshes)                         # EP all-to-all × FSDP2, in place
    ...
    loss.backward(); finish_expert_gradients(model, meshes); clip_grad_norm_(model, 1.0, meshes)

``moekit train`` does exactly this from the ``parallel`` section of a config. The older
data-parallel helpers (``wrap_data_parallel``: DDP with every expert replicated, and
``parallelize_experts`` beside it) live on in ``moekit.distributed.ddp`` for code that
uses them; importing them from here still works, with a ``DeprecationWarning`` that names the
mesh equivalent.
"""

import warnings
from typing import Any

from moekit.distributed import ddp as _ddp
from moekit.distributed.expert_parallel import ExpertParallelDispatcher, TrafficMeter, meter_traffic
from moekit.distributed.mesh import (
    Meshes,
    ParallelConfig,
    ParallelDims,
    clip_grad_norm_,
    finish_expert_gradients,
    full_tensors,
    load_full_state_dict,
    parallelize,
)

__all__ = [
    "ExpertParallelDispatcher",
    "Meshes",
    "ParallelConfig",
    "ParallelDims",
    "TrafficMeter",
    "clip_grad_norm_",
    "finish_expert_gradients",
    "full_tensors",
    "load_full_state_dict",
    "meter_traffic",
    "parallelize",
]

#: the older helpers, now in moekit.distributed.ddp: what the mesh API offers instead
_MOVED = {
    "wrap_data_parallel": "parallelize(model, meshes) with ParallelConfig(ep=1)",
    "parallelize_experts": "parallelize(model, meshes) with ParallelConfig(ep=...)",
    "expert_parameter_names": "the expert parameters are DTensors on meshes.expert_fsdp_mesh",
    "reduce_load_tallies": "parallelize(...): the tallies are summed over the ep group",
    "full_state_dict": "full_tensors(model, meshes)",
    "save_pretrained_distributed": "moekit.distributed.checkpoint (DCP folders)",
    "from_pretrained_distributed": "moekit.distributed.checkpoint (DCP folders)",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"moekit.distributed.{name} moved to moekit.distributed.ddp (the older DDP "
            f"helpers); the mesh API offers {_MOVED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_ddp, name)
    raise AttributeError(f"module 'moekit.distributed' has no attribute {name!r}")
