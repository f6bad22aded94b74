"""DeepSeek-V2 / V2-Lite <-> moekit: multi-head latent attention with rotary positions on
complex pairs (moekit's interleaved layout), softmax router scores, greedy or group-limited
(best score per group) top-k without renormalisation, times ``routed_scaling_factor``, ungated
shared experts of ``n_shared_experts * moe_intermediate_size``, dense first blocks.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

from moekit.interop import deepseek_v3
from moekit.interop.keymap import Entry
from moekit.models.transformer.model import TransformerConfig
from moekit.routing import TopKRouterConfig

MODEL_TYPE = "deepseek_v2"

config_from_hf = partial(deepseek_v3.config_from_hf, v2=True)


def keymaps(config: TransformerConfig) -> dict[str, list[Entry]]:
    return deepseek_v3.keymaps(config)  # the router has no correction bias to map


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    out = deepseek_v3.config_to_hf(config)
    moe = config.moe.layer
    assert moe is not None  # deepseek_v3.config_to_hf checked
    router = cast(TopKRouterConfig, moe.router)
    out.update(
        architectures=["DeepseekV2ForCausalLM"],
        model_type=MODEL_TYPE,
        topk_method="group_limited_greedy" if router.num_groups > 1 else "greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
    )
    out.pop("rope_interleave", None)  # V2 always rotates complex pairs
    return out
