"""Expert LoRA adapters in the layouts their consumers read, and merged into the base weights.

``transformers`` 5 stores a layer's routed experts as 3-D parameters (``gate_up_proj``
``(E, 2I, D)``, ``down_proj`` ``(E, D, I)``: ``(E, out, in)``). PEFT (0.18 and later) adapts
them through ``target_parameters``: a parameter wrapper with ``lora_A`` ``(E·r, a)`` (expert
slowest: expert ``e``'s rows at ``e·r .. e·r+r-1``) and ``lora_B`` ``(b, r·E)`` (expert
fastest: rank ``j`` of expert ``e`` in column ``j·E + e``). Which of the parameter's two trailing
dimensions ``a`` and ``b`` are changed between versions:

- **peft-0.18** (PEFT 0.18.0 to 0.19.0): the parameter ``(E, d1, d2)`` is read positionally as
  ``(E, in, out)``: ``lora_A`` is ``(E·r, d1)``, ``lora_B`` ``(d2, r·E)`` and the update is
  ``ΔP[e] = (B_e A_e)ᵀ``;
- **peft** (PEFT 0.19.1 and later, what moekit's installed PEFT writes): ``(E, out, in)`` as
  ``nn.Linear`` stores it: ``lora_A`` is ``(E·r, d2)``, ``lora_B`` ``(d1, r·E)`` and
  ``ΔP[e] = B_e A_e``.

Both files have the same tensor names and, where ``2I ≠ D``, different shapes; a file of one
read as the other is refused by PEFT or, when the widths happen to match, silently transposed.
The folder's ``adapter_config.json`` records ``peft_version``; :func:`detect_layout` reads it,
or the shapes against the base's ``hidden_size`` when it is absent.

- **per-expert** (vLLM-servable): each expert's ``gate_proj``/``up_proj``/``down_proj`` (the
  family's per-expert checkpoint names) as its own ``target_modules`` LoRA, ``lora_A`` ``(r, in)``
  and ``lora_B`` ``(out, r)``: the layout vLLM's fused-MoE LoRA loader stacks into its
  ``w13``/``w2`` kernels without the 3-D ``target_parameters`` path (vLLM PR 52198, which reads
  PEFT 3-D files by transposing, was still open in 2026-12). ``gate_up_proj``'s factors split
  exactly: ``gate`` and ``up`` share ``A_e`` and take ``B_e``'s first and last ``I`` rows.

:func:`merge_adapter` adds every target's update (attention modules and expert parameters, in
any layout) to a Hugging Face state dict: ``W + (alpha / r)·B A`` (``alpha / √r`` with rsLoRA),
written out it is the merged model ``transformers`` loads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moekit.utils.serialization import atomic_write_json, write_folder_atomically

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$")
#: per-expert checkpoint names of (gate, up, down) where they are not gate_proj/up_proj/down_proj
_PARAMETER_ORDER = {"gate_up_proj": 0, "up_proj": 1, "down_proj": 2}
_PER_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "phimoe": ("w1", "w3", "w2")}


class ExpertAdapterLayout(str, Enum):
    """How an adapter file stores expert LoRA factors (see the module docstring)."""

    PEFT = "peft"
    PEFT_0_18 = "peft-0.18"
    PER_EXPERT = "per-expert"


@dataclass
class LoRAAdapter:
    """A PEFT adapter folder's ``adapter_config.json`` and tensors (names as saved)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def target_parameters(self) -> list[str]:
        return list(self.config.get("target_parameters") or [])


def read_adapter(folder: str | os.PathLike) -> LoRAAdapter:
    """The adapter in ``folder`` (``adapter_config.json`` and ``adapter_model.safetensors``)."""

    folder = Path(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a PEFT adapter folder: it has no {name}")
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type={config.get('peft_type')!r}; only LORA adapters")
    return LoRAAdapter(config, load_file(str(folder / "adapter_model.safetensors")))


def write_adapter(adapter: LoRAAdapter, folder: str | os.PathLike) -> Path:
    """Write ``adapter`` as a PEFT adapter folder (replaced atomically)."""

    def write(staging: Path) -> None:
        tensors = {k: v.contiguous() for k, v in adapter.tensors.items()}
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(staging / "adapter_config.json", adapter.config)

    return write_folder_atomically(folder, write)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def installed_peft_layout() -> ExpertAdapterLayout:
    """The 3-D layout the installed ``peft`` writes."""
    import peft  # noqa: PLC0415 (optional: peft)

    return layout_of_version(peft.__version__)


def layout_of_version(version: str) -> ExpertAdapterLayout:
    """The 3-D expert layout PEFT ``version`` writes (0.18.0–0.19.0: peft-0.18; later: peft)."""
    return (
        ExpertAdapterLayout.PEFT_0_18
        if _version_tuple(version) < (0, 19, 1)
        else ExpertAdapterLayout.PEFT
    )


def _parameter_keys(adapter: LoRAAdapter) -> dict[str, tuple[str, str]]:
    """Tensor name → (module path, wrapped parameter) for every expert-parameter factor.
    PEFT nests one wrapper per adapted parameter of a module, wrapping them in the module's
    parameter order with the first innermost (``experts.base_layer.lora_A`` is ``gate_up_proj``
    beside ``down_proj``'s ``experts.lora_A``); ``target_parameters`` in the saved config comes
    from a set, in no fixed order, so it cannot say which is which."""
    per_module: dict[str, list[str]] = {}
    for target in adapter.target_parameters:
        module_suffix, parameter = target.rsplit(".", 1)
        per_module.setdefault(module_suffix, []).append(parameter)
    for parameters in per_module.values():  # transformers registers gate_up_proj first
        parameters.sort(key=lambda p: (_PARAMETER_ORDER.get(p, len(_PARAMETER_ORDER)), p))
    found: dict[str, tuple[str, str]] = {}
    for key in adapter.tensors:
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        module = match.group("module")
        for suffix, parameters in per_module.items():
            if module == suffix or module.endswith("." + suffix):
                depth = match.group("nest").count("base_layer.")
                if depth >= len(parameters):
                    raise ValueError(f"{key}: nested deeper than its {len(parameters)} parameters")
                found[key] = (module, parameters[len(parameters) - 1 - depth])
    return found


def detect_layout(adapter: LoRAAdapter, *, hidden_size: int | None = None) -> ExpertAdapterLayout:
    """The layout of ``adapter``'s expert factors: per-expert without ``target_parameters``;
    otherwise by the recorded ``peft_version``, or by shapes: ``gate_up_proj``'s ``lora_A``
    reads ``hidden_size`` inputs in the peft layout."""
    keys = _parameter_keys(adapter)
    if not keys:
        return ExpertAdapterLayout.PER_EXPERT
    version = adapter.config.get("peft_version")
    if version:
        return layout_of_version(str(version))
    for key, (_, parameter) in keys.items():
        if key.endswith("lora_A.weight") and parameter in ("gate_up_proj", "down_proj"):
            if hidden_size is None:
                break
            reads_hidden = adapter.tensors[key].shape[1] == hidden_size
            return (
                ExpertAdapterLayout.PEFT
                if reads_hidden == (parameter == "gate_up_proj")
                else ExpertAdapterLayout.PEFT_0_18
            )
    raise ValueError(
        "the adapter records no peft_version: give the base model's hidden_size to tell "
        "its expert layout"
    )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matching the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _rank_and_scale(adapter: LoRAAdapter, module: str) -> tuple[int, float]:
    cfg = adapter.config
    r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
    return r, alpha / (r**0.5 if cfg.get("use_rslora") else r)


def _expert_factors(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's flat ``(E·r, a)`` and ``(b, r·E)`` as ``A_ERa`` and ``B_EbR``."""
    E = A.shape[0] // r
    return A.reshape(E, r, A.shape[1]), B.reshape(B.shape[0], r, E).permute(2, 0, 1)


def _flat_factors(A_ERa: torch.Tensor, B_EbR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    E, r, a = A_ERa.shape
    return A_ERa.reshape(E * r, a), B_EbR.permute(1, 2, 0).reshape(B_EbR.shape[1], r * E)


def expert_updates(
    adapter: LoRAAdapter, layout: ExpertAdapterLayout
) -> dict[tuple[str, str], torch.Tensor]:
    """``(module path, parameter) → ΔP (E, d1, d2)``, scaled, for every expert parameter of a
    3-D layout (``peft`` or ``peft-0.18``), in the parameter's own orientation."""
    if layout is ExpertAdapterLayout.PER_EXPERT:
        raise ValueError("a per-expert adapter has no 3-D expert parameters")
    keys = _parameter_keys(adapter)
    updates = {}
    for key, (module, parameter) in keys.items():
        if not key.endswith("lora_A.weight"):
            continue
        A = adapter.tensors[key].float()
        B = adapter.tensors[key[: -len("lora_A.weight")] + "lora_B.weight"].float()
        r, scale = _rank_and_scale(adapter, module)
        A_ERa, B_EbR = _expert_factors(A, B, r)
        delta = B_EbR @ A_ERa  # (E, b, a)
        if layout is ExpertAdapterLayout.PEFT_0_18:
            delta = delta.transpose(1, 2)  # (B_e A_e)ᵀ: the parameter read as (E, in, out)
        updates[(module, parameter)] = delta * scale
    return updates


def convert_adapter(
    adapter: LoRAAdapter,
    to: ExpertAdapterLayout,
    *,
    family: str,
    source: ExpertAdapterLayout | None = None,
    hidden_size: int | None = None,
) -> LoRAAdapter:
    """``adapter`` re-laid in layout ``to``; attention and other module factors unchanged.

    Args:
        adapter: a PEFT adapter (:func:`read_adapter`).
        to: the layout to write.
        family: the base model's ``model_type`` (per-expert names: ``gate_proj`` … or
            Mixtral's ``w1``/``w3``/``w2``).
        source: the adapter's layout; ``None``: :func:`detect_layout`.
        hidden_size: the base's ``d_model``, for :func:`detect_layout` without a recorded
            ``peft_version``.

    Returns:
        A new adapter; its ``peft_version`` says the layout (``0.18.0`` for peft-0.18, the
        installed PEFT's otherwise).
    """
    source = source or detect_layout(adapter, hidden_size=hidden_size)
    if source is ExpertAdapterLayout.PER_EXPERT and to is not ExpertAdapterLayout.PER_EXPERT:
        raise ValueError(
            "a per-expert adapter converts to the merged model or stays per-expert; 3-D layouts "
            "are written from a moekit run (moekit finetune --export-peft)"
        )
    if source is to:
        return LoRAAdapter(dict(adapter.config), dict(adapter.tensors))
    keys = _parameter_keys(adapter)
    tensors = {k: v for k, v in adapter.tensors.items() if k not in keys}
    config = dict(adapter.config)
    for key, (module, parameter) in keys.items():
        if not key.endswith("lora_A.weight"):
            continue
        stem = key[: -len("lora_A.weight")]
        r, _ = _rank_and_scale(adapter, module)
        A_ERa, B_EbR = _expert_factors(
            adapter.tensors[key], adapter.tensors[stem + "lora_B.weight"], r
        )
        if to is ExpertAdapterLayout.PER_EXPERT:
            tensors.update(_per_expert(module, parameter, A_ERa, B_EbR, source, family))
            continue
        # between the two 3-D layouts: (B_e A_e)ᵀ = A_eᵀ B_eᵀ, so A and B trade places
        A_new, B_new = B_EbR.transpose(1, 2), A_ERa.transpose(1, 2)
        A_flat, B_flat = _flat_factors(A_new.contiguous(), B_new.contiguous())
        tensors[key], tensors[stem + "lora_B.weight"] = A_flat, B_flat
    if to is ExpertAdapterLayout.PER_EXPERT:
        names = _PER_EXPERT_NAMES.get(family, ("gate_proj", "up_proj", "down_proj"))
        modules = config.get("target_modules") or []
        if isinstance(modules, str):
            raise ValueError(
                "a regex target_modules cannot take the per-expert modules; give a list"
            )
        config["target_modules"] = sorted({*modules, *names})
        config["target_parameters"] = None
    config["peft_version"] = "0.18.0" if to is ExpertAdapterLayout.PEFT_0_18 else _peft_version()
    return LoRAAdapter(config, tensors)


def _peft_version() -> str:
    try:
        import peft  # noqa: PLC0415 (optional: peft)

        return str(peft.__version__)
    except ImportError:
        return "0.19.1"


def _per_expert(
    module: str,
    parameter: str,
    A_ERa: torch.Tensor,
    B_EbR: torch.Tensor,
    source: ExpertAdapterLayout,
    family: str,
) -> dict[str, torch.Tensor]:
    """One 3-D parameter's factors as per-expert ``nn.Linear`` LoRA ``(r, in)``/``(out, r)``."""
    if source is ExpertAdapterLayout.PEFT_0_18:  # to the peft (out, in) orientation first
        A_ERa, B_EbR = B_EbR.transpose(1, 2), A_ERa.transpose(1, 2)
    gate, up, down = _PER_EXPERT_NAMES.get(family, ("gate_proj", "up_proj", "down_proj"))
    out: dict[str, torch.Tensor] = {}
    E = A_ERa.shape[0]
    for e in range(E):
        if parameter == "gate_up_proj":
            half = B_EbR.shape[1] // 2
            parts = {gate: B_EbR[e, :half], up: B_EbR[e, half:]}
        elif parameter == "down_proj":
            parts = {down: B_EbR[e]}
        else:
            raise ValueError(f"{module}.{parameter}: no per-expert modules for this parameter")
        for name, B in parts.items():
            out[f"{module}.{e}.{name}.lora_A.weight"] = A_ERa[e].clone()  # own storage
            out[f"{module}.{e}.{name}.lora_B.weight"] = B.contiguous()
    return out


def merge_adapter(
    state: dict[str, torch.Tensor],
    adapter: LoRAAdapter,
    *,
    layout: ExpertAdapterLayout | None = None,
    hidden_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict ``state`` with every update of ``adapter`` added (modules:
    ``W + scale·B A``; expert parameters: ``P + ΔP``); refuses factors with no weight to go to.

    Args:
        state: the base model's state dict (``transformers`` names).
        adapter: a PEFT adapter in any layout.
        layout: its expert layout; ``None``: :func:`detect_layout`.
        hidden_size: the base's ``d_model`` (layout detection without ``peft_version``).
    """
    layout = layout or detect_layout(adapter, hidden_size=hidden_size)
    merged = dict(state)

    def target(module: str, leaf: str) -> str:
        name = module.removeprefix(_PREFIX) + "." + leaf
        if name not in merged:
            raise ValueError(f"the adapter changes {name}, which the base model does not have")
        return name

    parameter_keys = _parameter_keys(adapter)
    if layout is not ExpertAdapterLayout.PER_EXPERT:
        for (module, parameter), delta in expert_updates(adapter, layout).items():
            name = target(module, parameter)
            if merged[name].shape != delta.shape:
                raise ValueError(
                    f"{name} is {tuple(merged[name].shape)} but the adapter's update is "
                    f"{tuple(delta.shape)}: another layout (peft vs peft-0.18)?"
                )
            merged[name] = (merged[name].float() + delta).to(merged[name].dtype)
    for key, A in adapter.tensors.items():
        match = _LORA_KEY.match(key)
        if match is None or key in parameter_keys or match.group("ab") != "A":
            continue
        module = match.group("module")
        B = adapter.tensors[key[: -len("lora_A.weight")] + "lora_B.weight"]
        _, scale = _rank_and_scale(adapter, module)
        delta = (B.float() @ A.float()) * scale
        name, rows = _weight_of(module, merged)
        weight = merged[name].clone()
        view = weight if rows is None else weight[rows]
        if view.shape != delta.shape:
            raise ValueError(f"{key}: an update of {tuple(delta.shape)} for {tuple(view.shape)}")
        view += delta.to(weight.dtype)
        merged[name] = weight
    return merged


_PER_EXPERT_MODULE = re.compile(r"^(?P<stack>.+)\.(?P<e>\d+)\.(?P<proj>\w+)$")


def _weight_of(module: str, state: dict[str, torch.Tensor]) -> tuple[str, Any]:
    """The state-dict weight a LoRA module adapts, and the rows of it: a module's own
    ``.weight``, or one expert's part of a stacked ``gate_up_proj``/``down_proj``."""
    path = module.removeprefix(_PREFIX)
    if path + ".weight" in state:
        return path + ".weight", None
    match = _PER_EXPERT_MODULE.match(path)
    if match is not None:
        stack, e, proj = match.group("stack"), int(match.group("e")), match.group("proj")
        gates = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up"}
        if proj in gates and stack + ".gate_up_proj" in state:
            half = state[stack + ".gate_up_proj"].shape[1] // 2
            rows = slice(0, half) if gates[proj] == "gate" else slice(half, 2 * half)
            return stack + ".gate_up_proj", (e, rows)
        if proj in ("down_proj", "w2") and stack + ".down_proj" in state:
            return stack + ".down_proj", e
    raise ValueError(f"the adapter changes {path}, which the base model does not have")
