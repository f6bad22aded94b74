"""Expert and data parallelism on ``torch.distributed``, applied from outside the model."""

from moekit.distributed.expert_parallel import ExpertParallelDispatcher, TrafficMeter, meter_traffic
from moekit.distributed.parallelize import (
    expert_parameter_names,
    from_pretrained_distributed,
    full_state_dict,
    parallelize_experts,
    reduce_load_tallies,
    save_pretrained_distributed,
    wrap_data_parallel,
)

__all__ = [
    "ExpertParallelDispatcher",
    "TrafficMeter",
    "expert_parameter_names",
    "from_pretrained_distributed",
    "full_state_dict",
    "meter_traffic",
    "parallelize_experts",
    "reduce_load_tallies",
    "save_pretrained_distributed",
    "wrap_data_parallel",
]
