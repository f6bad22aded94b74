"""Which parameters a fine-tuning run trains: named presets over a model's parameter groups.

The ST-MoE paper (Zoph et al. 2022, "ST-MoE: Designing Stable and Transferable Sparse Expert
Models", section 4) fine-tuned five subsets: **all** parameters, only the **non_moe** ones, only
the **moe** ones, only **attention**, and only the dense **ffn** layers between the MoE layers.
moekit adds ``router``, ``shared_experts``, ``embeddings``, ``norms`` and ``experts:<selection>``:
a subset of the routed experts, either listed (``experts:0,3,5``) or, as ESFT does (Wang et al.
2024, "Let the Expert Stick to His Last"), the ``top=N`` experts of each layer by how often they
are routed to on the fine-tuning data. Presets compose with ``+`` (``attention+router``).

A frozen tensor has ``requires_grad=False``, so it gets no gradient and no optimizer state. A
stacked expert tensor with only some experts selected stays trainable as a whole, with a gradient
hook that zeroes the other experts' rows and no weight decay (AdamW then leaves those rows exactly
unchanged: zero gradients keep its moments at zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.experts.bank import ExpertBank
from moekit.experts.dense import FeedForward
from moekit.experts.quantized import QuantizedExpertBank
from moekit.layers import MoE
from moekit.models.encoder_decoder.relative_position import RelativePositionBias

#: the groups every parameter belongs to exactly one of
GROUPS = (
    "embeddings",
    "attention",
    "recurrent_mixers",
    "norms",
    "ffn",
    "router",
    "experts",
    "shared_experts",
    "lora",
    "other",
)
#: preset -> the groups it trains (``experts:<selection>`` is handled on its own)
PRESETS: dict[str, tuple[str, ...]] = {
    "all": GROUPS,
    "non_moe": ("embeddings", "attention", "recurrent_mixers", "norms", "ffn", "other"),
    "moe": ("router", "experts", "shared_experts"),
    "attention": ("attention",),
    "recurrent_mixers": ("recurrent_mixers",),
    "token_mixers": ("attention", "recurrent_mixers"),
    "ffn": ("ffn",),
    "router": ("router",),
    "shared_experts": ("shared_experts",),
    "embeddings": ("embeddings",),
    "norms": ("norms",),
    "lora": ("lora",),
}
#: the attribute a partly trained stacked expert tensor carries: its ``(E,)`` bool mask
EXPERT_MASK = "moekit_expert_mask"


def parameter_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """``group -> {name: parameter}`` for every parameter of ``model`` (each in one group)."""

    owner: dict[int, str] = {}

    def claim(module: nn.Module, group: str) -> None:
        for p in module.parameters():
            owner.setdefault(id(p), group)

    for module in model.modules():  # LoRA first: its tensors sit inside the modules it adapts
        if type(module).__name__ in ("LoRALinear",):
            for name in ("lora_A", "lora_B"):
                owner[id(getattr(module, name))] = "lora"
        adapter = getattr(module, "adapter", None)
        if isinstance(adapter, nn.Module):
            claim(adapter, "lora")
    for module in model.modules():
        if isinstance(module, MoE):
            claim(module.router, "router")
            claim(module.experts, "experts")
            if module.shared_experts is not None:
                claim(module.shared_experts, "shared_experts")
    for module in model.modules():
        # T5Attention: an encoder–decoder's self- and cross-attention; the relative position
        # bias is part of attention, not an embedding of tokens
        mixer = getattr(type(module), "token_mixer", None)  # the marker, not a class list
        if mixer == "attention" or isinstance(module, RelativePositionBias):
            claim(module, "attention")
        elif mixer == "recurrent":
            claim(module, "recurrent_mixers")
        elif isinstance(module, nn.Embedding):
            claim(module, "embeddings")
        elif isinstance(module, nn.RMSNorm | nn.LayerNorm):
            claim(module, "norms")
        elif isinstance(module, FeedForward):
            claim(module, "ffn")
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        claim(head, "embeddings")
    groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in GROUPS}
    for name, p in model.named_parameters():
        groups[owner.get(id(p), "other")][name] = p
    return groups


def check_preset(preset: str) -> None:
    """Raise for an unknown name or a malformed ``experts:<selection>`` (no model needed)."""
    for part in preset.split("+"):
        part = part.strip()
        if part.startswith("experts:"):
            _parse_expert_selection(part[len("experts:") :])
        elif part not in PRESETS:
            raise ValueError(
                f"unknown preset {part!r}; choose from {', '.join(PRESETS)} or "
                "experts:<selection>, joined by '+'"
            )


def _parse_expert_selection(spec: str) -> tuple[list[int] | None, int | None]:
    """``"0,3,5"`` -> ([0, 3, 5], None); ``"top=2"`` -> (None, 2)."""
    try:
        if spec.startswith("top="):
            top = int(spec[4:])
            if top < 1:
                raise ValueError
            return None, top
        experts = [int(v) for v in spec.split(",")]
        if not experts or min(experts) < 0:
            raise ValueError
        return experts, None
    except ValueError:
        raise ValueError(
            f"experts:<selection> must list expert indices (experts:0,3,5) or name the most "
            f"routed ones (experts:top=2), got experts:{spec}"
        ) from None


def _ffn_hint(empty_groups: list[str]) -> str:
    if any("ffn" in g or "dense" in g for g in empty_groups):
        return ": every block is an MoE block, so there is no dense FFN"
    return ""


@dataclass
class Selection:
    """What a preset trains: whole tensors, and stacked expert tensors with an ``(E,)`` mask."""

    whole: dict[str, nn.Parameter] = field(default_factory=dict)
    partial: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)


def select_parameters(
    model: nn.Module,
    preset: str,
    *,
    routing_counts: dict[str, torch.Tensor] | None = None,
) -> Selection:
    """The parameters ``preset`` trains.

    Args:
        model: a moekit model (also one imported from Hugging Face).
        preset: preset names joined by ``+`` (see ``PRESETS``; ``experts:<selection>`` too).
        routing_counts: ``{MoE layer name: (E,) tokens routed to each expert}`` on the
            fine-tuning data, for ``experts:top=N`` (see :func:`count_routing`).
    """
    groups = parameter_groups(model)
    selection = Selection()
    for part in preset.split("+"):
        part = part.strip()
        if part.startswith("experts:"):
            _select_experts(model, part[len("experts:") :], routing_counts, selection)
            continue
        check_preset(part)
        chosen = {n: p for g in PRESETS[part] for n, p in groups[g].items()}
        if not chosen:
            useful = [name for name, gs in PRESETS.items() if any(groups[g] for g in gs)]
            empty = [g for g in PRESETS[part] if not groups[g]]
            raise ValueError(
                f"preset {part!r} matches no parameter of this model (it has no "
                f"{' or '.join(empty)} parameters{_ffn_hint(empty)}); presets that train "
                f"something here: {', '.join(useful)}"
            )
        selection.whole.update(chosen)
    for name in selection.whole:
        selection.partial.pop(name, None)
    return selection


def _select_experts(
    model: nn.Module,
    spec: str,
    routing_counts: dict[str, torch.Tensor] | None,
    selection: Selection,
) -> None:
    listed, top = _parse_expert_selection(spec)
    found = False
    for layer_name, module in model.named_modules():
        if not (isinstance(module, MoE) and isinstance(module.experts, ExpertBank)):
            continue
        found = True
        E = module.experts.num_experts
        if listed is not None:
            if max(listed) >= E:
                raise ValueError(
                    f"experts:{spec} names expert {max(listed)}, but {layer_name} has {E}"
                )
            chosen = listed
        else:
            if routing_counts is None or layer_name not in routing_counts:
                raise ValueError(
                    f"experts:top={top} needs routing counts on the fine-tuning data "
                    f"(count_routing), none for {layer_name}"
                )
            chosen = routing_counts[layer_name].topk(min(int(top or 1), E)).indices.tolist()
        mask_E = torch.zeros(E, dtype=torch.bool)
        mask_E[chosen] = True
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, p in module.experts.named_parameters():
            if p.dim() >= 2 and p.shape[0] == E and ".adapter." not in f".{name}":
                full = prefix + name
                if full in selection.partial:
                    mask_E = mask_E | selection.partial[full][1]
                selection.partial[full] = (p, mask_E)
    if not found:
        raise ValueError(f"experts:{spec} matches no parameter: the model has no routed experts")


def apply_selection(
    model: nn.Module, selection: Selection
) -> list[torch.utils.hooks.RemovableHandle]:
    """Freeze everything ``selection`` does not train; returns the gradient-mask hooks."""
    trainable = {id(p) for p in selection.whole.values()}
    trainable |= {id(p) for p, _ in selection.partial.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        if hasattr(p, EXPERT_MASK):
            delattr(p, EXPERT_MASK)
    handles = []
    for p, mask_E in selection.partial.values():
        keep = mask_E.to(p.device, p.dtype).view(-1, *[1] * (p.dim() - 1))
        setattr(p, EXPERT_MASK, mask_E)
        handles.append(p.register_hook(lambda g, keep=keep: g * keep))
    return handles


def trainable_summary(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(group, trainable, total)`` parameter counts per non-empty group, then ``all``; a
    partly trained expert tensor counts only its selected experts, and quantised experts (QLoRA:
    frozen codes and scales, buffers rather than parameters) count the weights they stand for."""
    quantized = sum(
        m.logical_weight_count() for m in model.modules() if isinstance(m, QuantizedExpertBank)
    )
    rows, trainable_all, total_all = [], 0, 0
    for group, params in parameter_groups(model).items():
        frozen = quantized if group == "experts" else 0
        if not params and not frozen:
            continue
        total = sum(p.numel() for p in params.values()) + frozen
        trainable = 0
        for p in params.values():
            if p.requires_grad:
                mask = getattr(p, EXPERT_MASK, None)
                trainable += p.numel() if mask is None else p[0].numel() * int(mask.sum())
        rows.append((group, trainable, total))
        trainable_all, total_all = trainable_all + trainable, total_all + total
    rows.append(("all", trainable_all, total_all))
    return rows


def format_summary(rows: list[tuple[str, int, int]]) -> str:
    lines = [f"{'group':<16}{'trainable':>14}{'total':>14}"]
    lines += [f"{g:<16}{t:>14,}{n:>14,}" for g, t, n in rows]
    return "\n".join(lines)
