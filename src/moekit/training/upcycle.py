"""Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
from Dense Checkpoints"): turn a dense transformer into an MoE that starts where it was.

Each chosen dense FFN becomes an MoE layer whose E experts are copies of it (optionally with a
little Gaussian noise so they can diverge), with a freshly initialised router. With identical
experts and renormalised top-k weights the upcycled model computes exactly the dense model's
function at step 0. ``granularity=g`` instead splits each dense FFN along its hidden dimension
into ``g`` finer experts and replicates that set ``E / g`` times (fine-grained upcycling); its
step-0 output equals the dense one only when the router picks one full set.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch

from moekit.experts.bank import ExpertBank, ExpertConfig
from moekit.experts.dense import FeedForward
from moekit.layers import MoE, MoEConfig
from moekit.models.common.block import Block
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.transformer.model import TransformerLM
from moekit.routing import Gating, RouterOptions, TopKRouterConfig


def upcycle(
    dense: TransformerLM,
    num_experts: int,
    top_k: int,
    *,
    every: int = 1,
    first_dense: int = 0,
    noise_std: float = 0.0,
    granularity: int = 1,
    router: RouterOptions | None = None,
    seed: int = 0,
) -> TransformerLM:
    """An MoE ``TransformerLM`` initialised from ``dense`` (which must have no MoE layers).

    Args:
        dense: the dense model.
        num_experts: experts per MoE layer.
        top_k: experts per token.
        every, first_dense: which blocks become MoE layers (``MoEPlacementConfig``).
        noise_std: relative Gaussian noise added to each expert copy (0 keeps exact copies).
        granularity: split each FFN into this many experts along the hidden dimension.
        router: router options (default: softmax top-k with renormalisation).
        seed: seeds the router initialisation and the noise.
    """
    config = dense.config
    if config.is_moe:
        raise ValueError("upcycle takes a dense model (moe.num_experts == 0)")
    if granularity < 1 or config.ffn_hidden % granularity or num_experts % granularity:
        raise ValueError(
            f"granularity={granularity} must divide ffn_hidden={config.ffn_hidden} and "
            f"num_experts={num_experts}"
        )
    layer = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        experts=ExpertConfig(hidden=config.ffn_hidden // granularity, activation=config.activation),
        router=router or TopKRouterConfig(gating=Gating.SOFTMAX_TOPK, normalize_weights=True),
    )
    placement = MoEPlacementConfig(layer=layer, every=every, first_dense=first_dense)
    moe_config = dataclasses.replace(config, moe=placement)
    torch.manual_seed(seed)
    model = TransformerLM(moe_config)
    state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing = model.load_state_dict(state, strict=False).missing_keys
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for src_block, dst_block in zip(dense.blocks, model.blocks, strict=True):
            src, dst = cast(Block, src_block).ffn, cast(Block, dst_block).ffn
            if isinstance(dst, MoE):
                _fill_experts(cast(FeedForward, src), dst, granularity, noise_std, generator)
            elif dst is not None and src is not None:  # a dense FFN stays; no FFN: nothing
                dst.load_state_dict(src.state_dict())
    unexpected_missing = [k for k in missing if ".ffn." not in k]
    if unexpected_missing:
        raise ValueError(f"upcycling left parameters uninitialised: {unexpected_missing}")
    return model


def _fill_experts(
    ffn: FeedForward, moe: MoE, granularity: int, noise_std: float, generator: torch.Generator
) -> None:
    bank = cast(ExpertBank, moe.experts)
    H = ffn.hidden // granularity
    gated = ffn.activation.is_gated
    for e in range(bank.num_experts):
        part = e % granularity
        cols = slice(part * H, (part + 1) * H)
        if gated:
            gate, up = ffn.w_in_DH.chunk(2, dim=1)
            w_in = torch.cat([gate[:, cols], up[:, cols]], dim=1)
        else:
            w_in = ffn.w_in_DH[:, cols]
        w_out = ffn.w_out_HD[cols]
        for dst, src in ((bank.w_in_EDH[e], w_in), (bank.w_out_EHD[e], w_out)):
            dst.copy_(src)
            if noise_std:
                noise = torch.randn(src.shape, generator=generator) * noise_std * src.std()
                dst.add_(noise.to(dst.dtype))
