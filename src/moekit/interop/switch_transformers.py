"""Switch Transformer (Fedus et al. 2021; Hugging Face ``switch_transformers``) <-> moekit's
``EncoderDecoderLM``.

The checkpoints are T5 encoder–decoders: relative position bias in block 0 of each stack, no
attention scaling, ReLU FFNs ``wi``/``wo``, and in the sparse blocks a top-1 router (softmax,
the chosen expert's probability as the weight, multiplicative jitter in training, float32) over
experts ``expert_{e}.wi/wo`` with a fixed ``expert_capacity`` per sequence: a sequence's tokens
claim their expert in order and those over the capacity ride the residual (zero FFN output).

Sparse blocks: with ``step = num_layers // num_sparse_encoder_layers`` (the decoder likewise),
block ``i`` is sparse when ``i % step == 1`` or ``step == 1`` (``transformers``' rule, kept as
is: blocks 1, 3, 5, ... for half-sparse stacks).

Training-only differences: Hugging Face computes one Switch loss and one z-loss over every
sparse layer's tokens concatenated; moekit sums per-layer losses with the same coefficients.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from moekit.dispatch.config import CapacityScope, DispatchMode, DropPriority
from moekit.dispatch.dispatcher import DispatchConfig
from moekit.experts.activations import Activation
from moekit.experts.bank import ExpertConfig
from moekit.interop import expressible
from moekit.interop import keymap as km
from moekit.interop.expressible import (
    HFFields,
    any_value,
    check_hf_config,
    function_fields,
)
from moekit.interop.keymap import Entry, Experts, Rename
from moekit.layers import MoEConfig
from moekit.losses.config import AuxLossConfig
from moekit.models.common.placement import MoEPlacementConfig
from moekit.models.encoder_decoder.model import EncoderDecoderConfig
from moekit.routing import Gating, TopKRouterConfig

MODEL_TYPE = "switch_transformers"


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t()


def _t_split(w: torch.Tensor) -> tuple[torch.Tensor]:
    return (w.t(),)


def stack_keymap(*, decoder: bool, router_bias: bool) -> list[Entry]:
    """One stack's entries (``{layer}`` is the block), HF names relative to the model."""
    stack = "decoder" if decoder else "encoder"
    ours, hf = f"{stack}.blocks.{{layer}}", f"{stack}.block.{{layer}}"
    ff = f"{hf}.layer.{2 if decoder else 1}"
    entries: list[Entry] = [
        Rename(f"{ours}.attn_norm.weight", f"{hf}.layer.0.layer_norm.weight"),
        Rename(f"{ours}.ffn_norm.weight", f"{ff}.layer_norm.weight"),
        Rename(f"{ours}.ffn.w_in_DH", f"{ff}.mlp.wi.weight", _t, _t, layers="dense"),
        Rename(f"{ours}.ffn.w_out_HD", f"{ff}.mlp.wo.weight", _t, _t, layers="dense"),
        Rename(f"{ours}.ffn.router.weight_ED", f"{ff}.mlp.router.classifier.weight", layers="moe"),
        Experts(
            f"{ours}.ffn.experts.w_in_EDH",
            (f"{ff}.mlp.experts.expert_{{expert}}.wi.weight",),
            join=_t,
            split=_t_split,
        ),
        Experts(
            f"{ours}.ffn.experts.w_out_EHD",
            (f"{ff}.mlp.experts.expert_{{expert}}.wo.weight",),
            join=_t,
            split=_t_split,
        ),
        Rename(
            f"{stack}.relative_bias.embedding.weight",
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            layers="none",
        ),
        Rename(f"{stack}.norm.weight", f"{stack}.final_layer_norm.weight", layers="none"),
    ]
    for proj in "qkvo":
        entries.append(
            Rename(f"{ours}.attn.{proj}_proj.weight", f"{hf}.layer.0.SelfAttention.{proj}.weight")
        )
        if decoder:
            entries.append(
                Rename(
                    f"{ours}.cross_attn.{proj}_proj.weight",
                    f"{hf}.layer.1.EncDecAttention.{proj}.weight",
                )
            )
    if decoder:
        entries.append(Rename(f"{ours}.cross_norm.weight", f"{hf}.layer.1.layer_norm.weight"))
    if router_bias:
        entries.append(
            Rename(f"{ours}.ffn.router.bias_E", f"{ff}.mlp.router.classifier.bias", layers="moe")
        )
    return entries


def model_keymap(config: EncoderDecoderConfig) -> list[Entry]:
    """The model-level entries: the shared embedding and, untied, the head."""
    entries: list[Entry] = [Rename("embed.weight", "shared.weight", layers="none")]
    if not config.tie_embeddings:
        entries.append(Rename("lm_head.weight", "lm_head.weight", layers="none"))
    return entries


def sparse_blocks(n_layers: int, num_sparse: int) -> list[int]:
    """The sparse blocks ``transformers`` builds for ``num_sparse`` of ``n_layers``."""
    step = n_layers // num_sparse if num_sparse > 0 else n_layers
    if step <= 0:
        return []
    return [i for i in range(n_layers) if i % step == 1 or step == 1]


HF_FIELDS = HFFields(
    mapped=frozenset(
        {
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "expert_capacity",
            "num_layers",
            "num_sparse_encoder_layers",
            "num_decoder_layers",
            "num_sparse_decoder_layers",
            "num_heads",
            "num_experts",
            "router_bias",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "layer_norm_epsilon",
            "decoder_start_token_id",
        }
    ),
    fixed={
        "dense_act_fn": ("relu",),
        # untied, transformers gives the encoder, the decoder and the head three embeddings
        "tie_word_embeddings": (True,),
        "router_dtype": ("float32",),
        "is_gated_act": (False, None),
        "feed_forward_proj": ("relu", None),
        # derived from num_sparse_*_layers by transformers itself
        "encoder_sparse_step": (any_value,),
        "decoder_sparse_step": (any_value,),
        # training only, or unused by the forward
        "dropout_rate": (any_value,),
        "router_ignore_padding_tokens": (any_value,),
        "add_router_probs": (any_value,),
        "initializer_factor": (any_value,),
        "is_decoder": (False,),
        "add_cross_attention": (any_value,),
        "tie_encoder_decoder": (any_value,),
        "max_length": (any_value,),
        "n_positions": (any_value,),
    },
)


def _placement(n_layers: int, num_sparse: int, layer: MoEConfig | None) -> MoEPlacementConfig:
    blocks = sparse_blocks(n_layers, num_sparse)
    if not blocks or layer is None:
        return MoEPlacementConfig()
    return MoEPlacementConfig(layer=layer, layers=blocks)


def config_from_hf(hf: dict[str, Any], strict: bool = True) -> EncoderDecoderConfig:
    """The moekit config of a ``switch_transformers`` ``config.json`` (``strict=False``:
    accounting only)."""
    check_hf_config(hf, "Switch Transformer", HF_FIELDS, strict)
    d_ff = hf.get("d_ff", 2048)
    layer = MoEConfig(
        num_experts=hf.get("num_experts", 8),
        top_k=1,
        experts=ExpertConfig(hidden=d_ff, activation=Activation.RELU),
        router=TopKRouterConfig(
            gating=Gating.SOFTMAX_TOPK,
            normalize_weights=False,
            jitter_eps=float(hf.get("router_jitter_noise", 0.01) or 0.0),
            bias=bool(hf.get("router_bias", False)),
        ),
        dispatch=DispatchConfig(
            mode=DispatchMode.CAPACITY,
            expert_capacity=int(hf.get("expert_capacity", 64)),
            capacity_scope=CapacityScope.SEQUENCE,
            drop_priority=DropPriority.TOKEN,
        ),
        aux_loss=AuxLossConfig(
            switch=float(hf.get("router_aux_loss_coef", 0.001)),
            z_loss=float(hf.get("router_z_loss_coef", 0.001)),
        ),
    )
    n_enc = hf.get("num_layers", 12)
    n_dec = hf.get("num_decoder_layers") or n_enc
    return EncoderDecoderConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        n_heads=hf.get("num_heads", 12),
        head_dim=hf.get("d_kv", 64),
        ffn_hidden=d_ff,
        activation=Activation.RELU,
        n_encoder_layers=n_enc,
        n_decoder_layers=n_dec,
        relative_attention_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        tie_embeddings=True,
        max_seq_len=max(int(hf.get("n_positions") or 512), 512),
        decoder_start_token_id=int(hf.get("decoder_start_token_id") or 0),
        encoder_moe=_placement(n_enc, hf.get("num_sparse_encoder_layers", 3), layer),
        decoder_moe=_placement(n_dec, hf.get("num_sparse_decoder_layers", 3), layer),
    )


def _num_sparse(n_layers: int, blocks: list[int]) -> int | None:
    """The ``num_sparse_*_layers`` whose rule gives ``blocks``, or ``None``."""
    for count in range(n_layers + 1):
        if sparse_blocks(n_layers, count) == blocks:
            return count
    return None


def config_to_hf(config: EncoderDecoderConfig) -> dict[str, Any]:
    """The HF config (expressibility is checked by :func:`export_problems`)."""
    layer = config.encoder_moe.layer or config.decoder_moe.layer
    if layer is None:
        raise ValueError("Switch Transformer export needs MoE layers in a stack")
    router = cast(TopKRouterConfig, layer.router)
    counts = []
    for placement, n in (
        (config.encoder_moe, config.n_encoder_layers),
        (config.decoder_moe, config.n_decoder_layers),
    ):
        blocks = placement.moe_layer_indices(n)
        count = _num_sparse(n, blocks)
        counts.append(0 if count is None else count)
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.head_dim,
        "d_ff": layer.experts.hidden,
        "num_heads": config.n_heads,
        "num_layers": config.n_encoder_layers,
        "num_decoder_layers": config.n_decoder_layers,
        "num_sparse_encoder_layers": counts[0],
        "num_sparse_decoder_layers": counts[1],
        "num_experts": layer.num_experts,
        "expert_capacity": layer.dispatch.expert_capacity,
        "router_bias": router.bias,
        "router_jitter_noise": router.jitter_eps,
        "router_dtype": "float32",
        "router_z_loss_coef": layer.aux_loss.z_loss,
        "router_aux_loss_coef": layer.aux_loss.switch,
        "relative_attention_num_buckets": config.relative_attention_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.norm_eps,
        "dense_act_fn": "relu",
        "tie_word_embeddings": config.tie_embeddings,
        "decoder_start_token_id": config.decoder_start_token_id,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def _not_function(name: str) -> bool:
    """Options that do not change a trained model's function (training-only, numerics, the
    cache length): the decoder-only families' list, applied to each stack."""

    as_decoder_only = name.replace("encoder_moe.", "moe.").replace("decoder_moe.", "moe.")
    return name == "max_seq_len" or as_decoder_only.startswith(expressible._NOT_FUNCTION)


def export_problems(config: EncoderDecoderConfig) -> list[str]:
    """Every function-changing option of ``config`` a Switch Transformer checkpoint cannot
    express (the round trip through ``config_to_hf``/``config_from_hf`` must give it back)."""
    for placement in (config.encoder_moe, config.decoder_moe):
        layer = placement.layer
        if layer is not None and layer.router.kind.value != "top_k":
            return [f"router kind {layer.router.kind.value!r} (Switch routes top-1)"]
    try:
        back = config_from_hf(config_to_hf(config))
    except ValueError as error:
        return [str(error)]
    want, got = function_fields(config), function_fields(back)
    return [
        f"{name}={want[name]!r} (the family gives {got.get(name)!r})"
        for name in want
        if want[name] != got.get(name) and not _not_function(name)
    ]


def _stacks(config: EncoderDecoderConfig) -> list[tuple[str, bool, int, list[int]]]:
    return [
        (
            "encoder",
            False,
            config.n_encoder_layers,
            config.encoder_moe.moe_layer_indices(config.n_encoder_layers),
        ),
        (
            "decoder",
            True,
            config.n_decoder_layers,
            config.decoder_moe.moe_layer_indices(config.n_decoder_layers),
        ),
    ]


def _router_bias(config: EncoderDecoderConfig) -> bool:
    layer = config.encoder_moe.layer or config.decoder_moe.layer
    return layer is not None and bool(getattr(layer.router, "bias", False))


def _num_experts(config: EncoderDecoderConfig) -> int:
    layer = config.encoder_moe.layer or config.decoder_moe.layer
    return 0 if layer is None else layer.num_experts


def _translate(
    config: EncoderDecoderConfig, state: dict[str, torch.Tensor], convert: Any
) -> dict[str, torch.Tensor]:
    """``convert`` (``keymap.to_moekit`` or ``keymap.to_hf``) applied to each stack's keys with
    that stack's key map and MoE blocks, then to the model-level keys. Both directions name
    the stacks' keys by their ``encoder.``/``decoder.`` prefix."""
    rest = dict(state)
    out: dict[str, torch.Tensor] = {}
    for stack, decoder, n_layers, moe_layers in _stacks(config):
        part = {k: rest.pop(k) for k in list(rest) if k.startswith(f"{stack}.")}
        keymap = stack_keymap(decoder=decoder, router_bias=_router_bias(config))
        out.update(
            convert(
                part,
                keymap,
                n_layers=n_layers,
                moe_layers=moe_layers,
                num_experts=_num_experts(config),
            )
        )
    out.update(convert(rest, model_keymap(config), n_layers=0, moe_layers=[], num_experts=0))
    return out


def state_to_moekit(
    config: EncoderDecoderConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The moekit state dict of an HF Switch Transformer state dict (every key used once; the
    tied copies of the shared embedding are checked and dropped)."""

    state = dict(state)
    shared = state.get("shared.weight")
    tied = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    if config.tie_embeddings:
        tied.append("lm_head.weight")
    for key in tied:
        copy = state.pop(key, None)
        if copy is not None and shared is not None and not torch.equal(copy, shared):
            raise ValueError(f"{key} differs from shared.weight: moekit ties them")
    return _translate(config, state, km.to_moekit)


def state_to_hf(
    config: EncoderDecoderConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The HF state dict (per-expert layout) of a moekit ``EncoderDecoderLM`` state dict."""

    return _translate(config, state, km.to_hf)
