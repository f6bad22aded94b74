"""``torch.compile`` of the dense parts of a model's blocks: each block's token mixer
(attention or a recurrent mixer) and each dense feed-forward, compiled in place
(``nn.Module.compile``: parameter names and state-dict keys do not change). The MoE layers stay
eager: their dispatch has data-dependent shapes (and, in fp32, host reads), which a graph would
break on or recompile for; what fusion buys there comes from the expert kernels
(``moekit.experts.backends``).

What the compiler fuses in a dense part: the rotary embedding and QK-norm elementwise passes
around the attention kernel, the gated activation into its projections' neighbours, the
recurrent mixers' gates and short convolutions.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moekit.layers.dense_beside import DenseBesideMoE
from moekit.layers.moe import MoE
from moekit.models.common.block import Block

__all__ = ["compile_dense_parts"]


def compile_dense_parts(model: nn.Module, **options: Any) -> list[str]:
    """Compile (in place, lazily: the first call traces) every block's token mixer and dense
    feed-forward in ``model``; ``options`` go to ``torch.compile``. Returns the names of the
    modules compiled."""
    compiled: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, Block):
            continue
        for part_name in ("attn", "ffn"):
            part = getattr(module, part_name)
            if part is None or isinstance(part, MoE | DenseBesideMoE):
                continue
            part.compile(**options)
            compiled.append(f"{name}.{part_name}" if name else part_name)
    return compiled
