"""LoRA adapters of a model imported from Hugging Face, exported in the PEFT format.

``export_peft_adapter`` writes a folder that ``peft.PeftModel.from_pretrained`` loads onto the
``transformers`` model of the source folder, computing what the moekit model computes. Attention
projections map to PEFT ``target_modules`` (``lora_A`` ``(R, in)``, ``lora_B`` ``(out, R)``,
the layout moekit's ``LoRALinear`` uses). The routed experts, which ``transformers`` stores
stacked (``mlp.experts.gate_up_proj`` ``(E, 2I, D)``, ``mlp.experts.down_proj`` ``(E, D, I)``),
map to PEFT ``target_parameters``. Their wrapper keeps ``lora_A`` as ``(E·R, in)`` with expert
``e``'s rows at ``e·R .. e·R+R-1``, and ``lora_B`` as ``(out, R·E)`` with column ``j·E + e``
for rank ``j`` of expert ``e``. moekit's ``[gate | up]`` columns are HF's ``[gate; up]`` rows,
so each expert's update is transposed and nothing else.

PEFT is built by PEFT itself (``get_peft_model``, then ``save_pretrained``), so its file
format is whatever the installed ``peft`` writes. Only adapters on ``attention`` (or single
projections) and ``experts`` can be exported; the base weights must be the source's unchanged
(a LoRA-only fine-tune). Export the merged model with ``to_hf`` otherwise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from moekit.adapters.lora import ExpertLoRA, LoRALinear, lora_parameters
from moekit.experts.bank import ExpertBank
from moekit.experts.quantized import QuantizedExpertBank, quantization_error_bound
from moekit.interop.adapter_layouts import (
    ExpertAdapterLayout,
    convert_adapter,
    installed_peft_layout,
    read_adapter,
    write_adapter,
)
from moekit.interop.ernie4_5_moe import interleave_heads
from moekit.interop.hf import from_hf
from moekit.interop.qwen3_next import _grouped_layout, gated_deltanet_of

#: families whose ``transformers`` models stack the routed experts as gate_up_proj ``(E, 2I, D)``
#: and down_proj ``(E, D, I)``, with the module path of the stack
STACKED_EXPERT_FAMILIES = {
    **dict.fromkeys(
        (
            "mixtral",
            "qwen3_moe",
            "qwen2_moe",
            "olmoe",
            "dots1",
            "glm4_moe",
            "deepseek_v2",
            "hunyuan_v1_moe",
            "minimax_m2",
            "ernie4_5_moe",
            "phimoe",
            "flex_olmo",
        ),
        "mlp.experts",
    ),
    "lfm2_moe": "feed_forward.experts",
    "jamba": "feed_forward.experts",
    "gemma4_text": "experts",
    "qwen3_next": "mlp.experts",
    "glm4_moe_lite": "mlp.experts",
    "qwen3_5_moe": "mlp.experts",
    "qwen3_5_moe_text": "mlp.experts",
    "granitemoe": "block_sparse_moe.experts",
    "granitemoeshared": "block_sparse_moe.experts",
    "granitemoehybrid": "block_sparse_moe.experts",
}
#: families whose attention LoRA exports but whose experts do not (Llama 4 stacks them
#: ``(E, D, 2I)``, the transpose of what PEFT's parameter wrapper is written for here)
ATTENTION_ONLY = ("llama4_text", "nemotron_h")  # Nemotron-H's experts: non-gated up_proj
#: families with multi-head latent attention, whose projections PEFT names otherwise: their
#: expert LoRA exports, their attention LoRA does not yet
MLA_FAMILIES = ("deepseek_v2", "glm4_moe_lite")
#: families whose query/key rows moekit stores de-interleaved per head (interleaved rotary)
INTERLEAVED_QK = ("ernie4_5_moe", "llama4_text")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: hybrids: the HF module of the attention and of the recurrent mixer, and HF names of moekit's
#: attention projections where they differ (their targets are matched by full path, since a
#: recurrent mixer has projections of the same names)
HYBRID_MODULES = {
    "lfm2_moe": ("self_attn", "conv", {"o_proj": "out_proj"}),
    "qwen3_next": ("self_attn", "linear_attn", {}),
    "qwen3_5_moe": ("self_attn", "linear_attn", {}),
    "qwen3_5_moe_text": ("self_attn", "linear_attn", {}),
    "granitemoehybrid": ("self_attn", "mamba", {}),
    "jamba": ("self_attn", "mamba", {}),
    "nemotron_h": ("mixer", "mixer", {}),  # attention and Mamba2 share the module name
}
_QWEN3_5_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
RECURRENT_PROJECTIONS = {
    "lfm2_moe": ("in_proj", "out_proj"),
    "qwen3_next": ("in_proj_qkvz", "in_proj_ba", "out_proj"),
    "qwen3_5_moe": _QWEN3_5_PROJECTIONS,
    "qwen3_5_moe_text": _QWEN3_5_PROJECTIONS,
    "granitemoehybrid": ("in_proj", "out_proj"),
    "jamba": ("in_proj", "x_proj", "out_proj"),
}
#: families whose recurrent mixers PEFT refuses to adapt (its Mamba list: out_proj, conv1d)
PEFT_REFUSES_RECURRENT = ("nemotron_h",)


def _moekit_rows(family: str, model: Any, projection: str) -> tuple[str, slice]:
    """The moekit projection (and its rows) an HF recurrent projection is part of: Qwen3.5
    stores apart what moekit joins (``in_proj_qkv`` + ``in_proj_z``, ``in_proj_b`` +
    ``in_proj_a``); a LoRA on the joined rows is the two LoRAs with ``A`` shared."""
    if not family.startswith("qwen3_5_moe") or projection == "out_proj":
        return projection, slice(None)

    mixer = gated_deltanet_of(model.config)
    assert mixer is not None
    qkv = 2 * mixer.n_key_heads * mixer.key_head_dim + mixer.n_value_heads * mixer.value_head_dim
    heads = mixer.n_value_heads
    return {
        "in_proj_qkv": ("in_proj_qkvz", slice(0, qkv)),
        "in_proj_z": ("in_proj_qkvz", slice(qkv, None)),
        "in_proj_b": ("in_proj_ba", slice(0, heads)),
        "in_proj_a": ("in_proj_ba", slice(heads, None)),
    }[projection]


def _hf_rows(family: str, model: Any, projection: str, B: torch.Tensor) -> torch.Tensor:
    """A recurrent projection's LoRA ``B`` ``(out, R)`` in HF's row order (Qwen3-Next groups
    its Gated DeltaNet projections by key head, moekit by kind)."""
    if family != "qwen3_next" or projection not in ("in_proj_qkvz", "in_proj_ba"):
        return B

    mixer = gated_deltanet_of(model.config)
    assert mixer is not None
    _, qkvz_to_hf, _, ba_to_hf = _grouped_layout(mixer)
    return qkvz_to_hf(B) if projection == "in_proj_qkvz" else ba_to_hf(B)


def _hybrid_targets(family: str, modules: list[str]) -> str:
    """A PEFT ``target_modules`` regex for a hybrid: attention projections under the attention
    module, ``recurrent:<name>`` entries under the recurrent mixer's."""
    attention, recurrent, renamed = HYBRID_MODULES[family]
    wanted = [m for m in modules if not m.startswith("recurrent:")]
    mixer = [m.split(":", 1)[1] for m in modules if m.startswith("recurrent:")]
    parts = []
    if wanted:
        names = "|".join(renamed.get(m, m) for m in wanted)
        parts.append(rf"{attention}\.({names})")
    if mixer:
        parts.append(rf"{recurrent}\.({'|'.join(mixer)})")
    return rf".*\.({'|'.join(parts)})"


def _peft_targets(config: Any, family: str) -> tuple[list[str], list[str], dict[str, int]]:
    modules: list[str] = []
    parameters: list[str] = []
    ranks: dict[str, int] = {}
    for target in config.targets:
        projections = ATTENTION_PROJECTIONS if target == "attention" else (target,)
        if target == "experts":
            if family in ATTENTION_ONLY:
                raise ValueError(
                    f"expert LoRA of {family!r} cannot be exported in the PEFT format yet "
                    "(attention can); export the merged model with to_hf instead"
                )
            stack = STACKED_EXPERT_FAMILIES[family]
            for name in (f"{stack}.gate_up_proj", f"{stack}.down_proj"):
                parameters.append(name)
                ranks[name] = config.rank_of(target)  # PEFT matches the parameter's key
        elif target == "recurrent_mixers" and family in PEFT_REFUSES_RECURRENT:
            raise ValueError(
                f"PEFT refuses LoRA on {family!r}'s Mamba layers (out_proj and conv1d are on its "
                "list of modules incompatible with Mamba models); export the merged model with "
                "to_hf instead"
            )
        elif target == "recurrent_mixers" and family in RECURRENT_PROJECTIONS:
            names = RECURRENT_PROJECTIONS[family]
            modules += [f"recurrent:{n}" for n in names]
            ranks.update({n: config.rank_of(target) for n in names})
        elif family in MLA_FAMILIES:
            raise ValueError(
                f"attention LoRA of {family!r} (multi-head latent attention) cannot be exported "
                "in the PEFT format yet (expert LoRA can); export the merged model with to_hf"
            )
        elif all(p in ATTENTION_PROJECTIONS for p in projections):
            modules += [p for p in projections if p not in modules]
            renamed = HYBRID_MODULES[family][2] if family in HYBRID_MODULES else {}
            ranks.update({renamed.get(p, p): config.rank_of(target) for p in projections})
        else:
            raise ValueError(
                f"LoRA target {target!r} cannot be exported in the PEFT format yet (attention "
                "projections and experts can); export the merged model with to_hf instead"
            )
    return modules, parameters, ranks


def _check_base_unchanged(model: torch.nn.Module, hf_model: torch.nn.Module) -> None:

    source = from_hf(hf_model).state_dict()
    adapters = set(lora_parameters(model))
    changed = [
        name
        for name, value in model.state_dict().items()
        if name not in adapters and name in source and not torch.equal(value.cpu(), source[name])
    ]
    # QLoRA: a quantised bank must be the source's experts quantised (within the format's bound)
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedExpertBank):
            continue
        for weight, dequantized in zip(
            ("w_in_EDH", "w_out_EHD"), module.dequantized_weights(torch.float32), strict=True
        ):
            original = source.get(f"{name}.{weight}")
            if original is None:
                continue
            bound = quantization_error_bound(original, module.quantization)
            if (dequantized.cpu() - original).abs().max() > bound:
                changed.append(f"{name}.{weight} (quantised)")
    if changed:
        raise ValueError(
            f"the base weights differ from the source's ({', '.join(changed[:3])}"
            f"{' ...' if len(changed) > 3 else ''}): a PEFT adapter would not reproduce this "
            "model; export the merged model with to_hf instead"
        )


def export_peft_adapter(
    model: torch.nn.Module,
    hf_folder: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    layout: str = "peft",
) -> Path:
    """Write ``model``'s LoRA adapters as a PEFT adapter folder for the model in ``hf_folder``.

    Args:
        model: a moekit model with LoRA adapters, imported from ``hf_folder``.
        hf_folder: the Hugging Face folder the model came from (unchanged base weights).
        directory: the adapter folder to write.
        layout: the expert factors' layout (``moekit.interop.adapter_layouts``): ``peft``
            (PEFT 0.19.1 and later), ``peft-0.18`` (PEFT 0.18.0–0.19.0) or ``per-expert``
            (each expert's projections as modules, what vLLM serves).
    """

    try:
        wanted = ExpertAdapterLayout(layout)
    except ValueError:
        choices = ", ".join(x.value for x in ExpertAdapterLayout)
        raise ValueError(f"layout must be one of {choices}, got {layout!r}") from None

    import peft  # noqa: PLC0415 (optional: peft)
    import transformers  # noqa: PLC0415 (optional: transformers)
    from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: PLC0415 (optional: peft)
    from peft.tuners.lora.layer import ParamWrapper  # noqa: PLC0415 (optional: peft)

    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters (moekit.adapters.add_lora)")
    family = json.loads((Path(hf_folder) / "config.json").read_text()).get("model_type")
    if family == "switch_transformers":
        return _export_switch(model, config, hf_folder, Path(directory))
    if family not in STACKED_EXPERT_FAMILIES and family not in ATTENTION_ONLY:
        raise ValueError(
            f"PEFT export supports {', '.join([*STACKED_EXPERT_FAMILIES, *ATTENTION_ONLY])}, "
            f"not {family!r}"
        )
    modules, parameters, ranks = _peft_targets(config, family)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    _check_base_unchanged(model, hf_model)
    lora_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,  # dropout is training-only, and PEFT's expert wrapper refuses it
        target_modules=(
            _hybrid_targets(family, modules) if family in HYBRID_MODULES and modules else None
        )
        or modules
        or None,
        target_parameters=parameters or None,
        rank_pattern={k: v for k, v in ranks.items() if v != config.rank},
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(hf_model, lora_config)
    blocks: Any = model.blocks
    filled = 0
    used: set[int] = set()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            layer = re.search(r"layers\.(\d+)\.", name)
            if layer is None:
                continue
            block = blocks[int(layer.group(1))]
            if isinstance(module, ParamWrapper):
                bank = getattr(block.ffn, "moe", block.ffn).experts  # dense beside: its MoE
                assert isinstance(bank, ExpertBank | QuantizedExpertBank)
                assert isinstance(bank.adapter, ExpertLoRA)
                A, B = _stacked_factors(bank.adapter, module.parameter_name)
                _set_factors(module, A, B)
                filled += 1
                used.add(id(bank))
            elif isinstance(module, PeftLinear) and not isinstance(module, ParamWrapper):
                parent, projection = name.rsplit(".", 2)[-2:]
                rows = slice(None)
                recurrent = family in HYBRID_MODULES and parent == HYBRID_MODULES[family][1]
                if family in HYBRID_MODULES and parent == HYBRID_MODULES[family][0]:
                    back = {v: k for k, v in HYBRID_MODULES[family][2].items()}
                    projection = back.get(projection, projection)
                elif recurrent:
                    projection, rows = _moekit_rows(family, model, projection)
                ours = getattr(block.attn, projection)
                assert isinstance(ours, LoRALinear)
                B = ours.lora_B
                if recurrent:
                    B = _hf_rows(family, model, projection, B)[rows]
                if family in INTERLEAVED_QK and projection in ("q_proj", "k_proj"):
                    B = interleave_heads(B, block.attn.head_dim)  # HF's row order
                _set_factors(module, ours.lora_A, B)
                filled += 1
                used.add(id(ours))
    if not filled:
        raise ValueError("no adapter of this model has a place in the PEFT model")
    adapted = [
        name
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
        or (isinstance(m, ExpertBank | QuantizedExpertBank) and isinstance(m.adapter, ExpertLoRA))
    ]
    lost = [name for name, m in model.named_modules() if name in adapted and id(m) not in used]
    if lost:  # never a silently smaller adapter
        raise ValueError(
            f"the adapters of {', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''} have no "
            "place in the PEFT model; export the merged model with to_hf instead"
        )
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    _relayout(directory, wanted, family)
    return directory


def _relayout(directory: Path, wanted: Any, family: str) -> None:
    """Rewrite the adapter PEFT just saved in ``wanted``'s expert layout (a no-op when the
    installed PEFT writes that one, or there are no expert factors)."""

    adapter = read_adapter(directory)
    written = installed_peft_layout()
    if wanted is written or not adapter.target_parameters:
        return
    write_adapter(convert_adapter(adapter, wanted, family=family, source=written), directory)


def _set_factors(peft_layer: Any, A: torch.Tensor, B: torch.Tensor) -> None:
    peft_layer.lora_A["default"].weight.copy_(A)
    peft_layer.lora_B["default"].weight.copy_(B)


def _stacked_factors(adapter: ExpertLoRA, parameter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(E·R, in)`` and ``(out, R·E)`` factors of ``gate_up_proj`` or ``down_proj``."""
    if parameter == "gate_up_proj":  # HF (E, 2I, D) = moekit (E, D, 2I) transposed
        A_EDR, B_ERW = adapter.A_in_EDR, adapter.B_in_ERW
    elif parameter == "down_proj":  # HF (E, D, I) = moekit (E, I, D) transposed
        A_EDR, B_ERW = adapter.A_out_EHR, adapter.B_out_ERD
    else:
        raise ValueError(f"no moekit adapter for the expert parameter {parameter!r}")
    E, n_in, R = A_EDR.shape
    n_out = B_ERW.shape[2]
    A = A_EDR.transpose(1, 2).reshape(E * R, n_in)
    B = B_ERW.permute(2, 1, 0).reshape(n_out, R * E)
    return A, B


#: Switch Transformer module names: ``{encoder,decoder}.block.{i}.layer.{j}.<module>``
_SWITCH_MODULE = re.compile(
    r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\."
    r"(?:(SelfAttention|EncDecAttention)\.([qkvo])|mlp\.experts\.expert_(\d+)\.(wi|wo))$"
)


def _export_switch(
    model: torch.nn.Module, config: Any, hf_folder: str | os.PathLike, directory: Path
) -> Path:
    """PEFT adapters for a Switch Transformer: self- and cross-attention projections
    (``q``, ``k``, ``v``, ``o``) and each expert's ``wi``/``wo`` (``nn.Linear`` modules in
    ``transformers``, so per-expert ``lora_A``/``lora_B`` are slices of moekit's stacked
    adapters)."""
    import peft  # noqa: PLC0415 (optional: peft)
    import transformers  # noqa: PLC0415 (optional: transformers)
    from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: PLC0415 (optional: peft)

    patterns = []
    for target in config.targets:
        if target == "attention":
            patterns.append(r".*(SelfAttention|EncDecAttention)\.(q|k|v|o)")
        elif target == "experts":
            patterns.append(r".*mlp\.experts\.expert_\d+\.(wi|wo)")
        else:
            raise ValueError(
                f"LoRA target {target!r} of a Switch Transformer cannot be exported in the PEFT "
                "format yet (attention and experts can); export the merged model with to_hf"
            )
    if any(config.rank_of(t) != config.rank for t in config.targets):
        raise ValueError("per-target LoRA ranks of a Switch Transformer do not export to PEFT yet")
    hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_folder, dtype=torch.float32)
    _check_base_unchanged(model, hf_model)
    lora_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules="|".join(f"({p})" for p in patterns),
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(hf_model, lora_config)
    filled = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            found = _SWITCH_MODULE.search(name)
            if found is None or not isinstance(module, PeftLinear):
                continue
            stack, block_index, attention, projection, expert, expert_projection = found.groups()
            block: Any = getattr(model, stack).blocks[int(block_index)]
            if attention is not None:
                owner = block.attn if attention == "SelfAttention" else block.cross_attn
                ours = getattr(owner, f"{projection}_proj")
                assert isinstance(ours, LoRALinear)
                _set_factors(module, ours.lora_A, ours.lora_B)
            else:
                adapter = block.ffn.experts.adapter
                assert isinstance(adapter, ExpertLoRA)
                e = int(expert)
                if expert_projection == "wi":  # HF (H, D) = moekit (D, H) transposed
                    A, B = adapter.A_in_EDR[e].t(), adapter.B_in_ERW[e].t()
                else:
                    A, B = adapter.A_out_EHR[e].t(), adapter.B_out_ERD[e].t()
                _set_factors(module, A, B)
            filled += 1
    if not filled:
        raise ValueError("no adapter of this model has a place in the PEFT model")
    peft_model.save_pretrained(str(directory))
    return directory
