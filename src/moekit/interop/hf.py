"""Import Hugging Face MoE causal LMs into moekit and export them back.

    model = moekit.interop.from_hf("path/to/mixtral")       # or an in-memory transformers model
    moekit.interop.to_hf(model, "out/mixtral-export")        # loads in transformers as is

Families live in one module each (``moekit.interop.mixtral``); each provides its config
translation and declarative key maps for the per-expert checkpoint layout and the stacked
in-memory layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moekit.interop import (
    dbrx,
    deepseek_v2,
    deepseek_v3,
    dense_llama,
    dots1,
    ernie4_5_moe,
    flex_olmo,
    gemma4,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    granitemoe,
    granitemoehybrid,
    granitemoeshared,
    hunyuan_v1_moe,
    jamba,
    jetmoe,
    lfm2_moe,
    llama4,
    minimax_m2,
    mixtral,
    nemotron_h,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
    switch_transformers,
)
from moekit.interop import keymap as km
from moekit.interop.expressible import (
    export_problems,
    export_refusal,
    fold_uniform_expert_counts,
)
from moekit.models.encoder_decoder.model import EncoderDecoderLM
from moekit.models.transformer.model import TransformerLM
from moekit.utils.serialization import (
    atomic_write_json,
    read_config_file,
    write_folder_atomically,
)

FAMILIES: dict[str, ModuleType] = {
    module.MODEL_TYPE: module
    for module in (
        mixtral,
        qwen2_moe,
        qwen3_moe,
        olmoe,
        deepseek_v3,
        deepseek_v2,
        gpt_oss,
        dots1,
        glm4_moe,
        hunyuan_v1_moe,
        minimax_m2,
        ernie4_5_moe,
        granitemoe,
        granitemoeshared,
        phimoe,
        llama4,
        flex_olmo,
        jetmoe,
        lfm2_moe,
        qwen3_next,
        qwen3_5_moe,
        glm4_moe_lite,
        granitemoehybrid,
        nemotron_h,
        jamba,
        gemma4,
    )
}
FAMILIES[qwen3_5_moe.TEXT_MODEL_TYPE] = qwen3_5_moe  # a text-only checkpoint
FAMILIES[gemma4.MULTIMODAL_MODEL_TYPE] = gemma4  # its text model
FAMILIES.update({t: dense_llama.family(t) for t in dense_llama.MODEL_TYPES})  # dense sources

# One config parser per family, for converters and accounting alike (``moekit params``);
# DBRX is parsed for accounting only.
CONFIG_PARSERS: dict[str, Callable[..., Any]] = {
    **{name: module.config_from_hf for name, module in FAMILIES.items()},
    "dbrx": dbrx.config_from_hf,
    switch_transformers.MODEL_TYPE: switch_transformers.config_from_hf,
}
# encoder–decoder families: their own model class and state translation
SEQ2SEQ_FAMILIES: dict[str, ModuleType] = {switch_transformers.MODEL_TYPE: switch_transformers}


def _family(model_type: str | None) -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} has no moekit converter yet; supported: "
            f"{', '.join([*FAMILIES, *SEQ2SEQ_FAMILIES])}"
        )
    return FAMILIES[model_type]


INDEX_FILE = "model.safetensors.index.json"


# integer fields of the Hugging Face MoE configs (the minimum each may take)
HF_INTEGER_KEYS = {
    "hidden_size": 1,
    "intermediate_size": 1,
    "moe_intermediate_size": 1,
    "shared_expert_intermediate_size": 0,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 1,
    "vocab_size": 1,
    "max_position_embeddings": 1,
    "num_local_experts": 1,
    "num_experts": 1,
    "n_routed_experts": 1,
    "n_shared_experts": 0,
    "num_experts_per_tok": 1,
    "moe_topk": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "decoder_sparse_step": 1,
    "sliding_window": 0,
}


def check_hf_integers(config: dict[str, Any], source: str) -> None:
    """Refuse a non-integer or too small value of a known integer field, naming the Hugging
    Face key (``num_local_experts``), before it is mapped to moekit's names."""
    for key, minimum in HF_INTEGER_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{source}: {key} must be >= {minimum}, got {value}")
    top_k = config.get("num_experts_per_tok")
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        experts = config.get(key)
        if isinstance(experts, int) and isinstance(top_k, int) and experts and top_k > experts:
            raise ValueError(f"{source}: num_experts_per_tok={top_k} exceeds {key}={experts}")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a local HF checkpoint folder, with errors that name the file."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {Path(path)}")
    return read_config_file(config_path)


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the index names when there is one (stray
    consolidated files beside a sharded checkpoint are ignored), else every one."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a valid safetensors index: {error!r}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards named in {index} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder} (pickle weights are refused)")
    return files


# Tensor names that only quantised checkpoints hold (FP8 block scales, MXFP4 blocks, GPTQ/AWQ
# packed weights, bitsandbytes statistics).
_QUANTISED_SUFFIXES = (
    "weight_scale_inv",
    "_blocks",
    "_scales",
    ".qweight",
    ".qzeros",
    ".scales",
    ".SCB",
    ".absmax",
    ".quant_map",
)


def read_hf_folder(
    path: str | os.PathLike, *, quantised_experts: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and every tensor of a local HF checkpoint (sharded or not).
    ``quantised_experts``: the experts' MXFP4 blocks and scales are expected (GPT-OSS); any
    other quantised tensor is still refused."""
    folder = Path(path)
    config = read_hf_config(folder)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    state[key] = f.get_tensor(key)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {error}"
            ) from None
    _refuse_quantised(state, folder, quantised_experts)
    return config, state


def _is_quantised_expert(key: str) -> bool:
    return ".experts." in key and key.endswith(("_blocks", "_scales"))


def _refuse_quantised(
    state: dict[str, torch.Tensor], where: Path | str, quantised_experts: bool = False
) -> None:
    def allowed(key: str) -> bool:
        return quantised_experts and _is_quantised_expert(key)

    quantised = sorted(k for k in state if k.endswith(_QUANTISED_SUFFIXES) and not allowed(k))
    low_bit = sorted(
        k
        for k, v in state.items()
        if (v.dtype in (torch.uint8, torch.int8, torch.int32) or "float8" in str(v.dtype))
        and not allowed(k)
    )
    if quantised or low_bit:
        example = (quantised or low_bit)[0]
        raise ValueError(
            f"the checkpoint in {where} is quantised (e.g. {example!r}, "
            f"{state[example].dtype}); moekit loads float weights only: dequantise it first "
            "(load it in transformers and save_pretrained in bf16/fp32)"
        )


def _layout(maps: dict[str, list[km.Entry]], state: dict[str, torch.Tensor]) -> list[km.Entry]:
    """The key map whose first expert tensor is present (per-expert or stacked layout)."""
    for entries in maps.values():
        experts = next((e for e in entries if isinstance(e, km.Experts)), None)
        if experts is None:
            return entries
        if any(h.format(layer=i, expert=0) in state for h in experts.hf for i in range(64)):
            return entries
    return next(iter(maps.values()))  # reports every missing key


def _from_hf_seq2seq(source: nn.Module | str | os.PathLike) -> EncoderDecoderLM:
    if isinstance(source, nn.Module):
        hf_config = cast(Any, source).config.to_dict()
        family = SEQ2SEQ_FAMILIES[hf_config["model_type"]]
        config = family.config_from_hf(hf_config)
        state = {k: v.detach() for k, v in source.state_dict().items()}
        _refuse_quantised(state, type(source).__name__)
    else:
        hf_config = read_hf_config(source)
        family = SEQ2SEQ_FAMILIES[hf_config["model_type"]]
        config = family.config_from_hf(hf_config)
        _, state = read_hf_folder(source)
    model = EncoderDecoderLM(config)
    moekit_state = family.state_to_moekit(config, state)
    expected = model.state_dict()
    wrong = [
        f"{name}: checkpoint {tuple(v.shape)}, config.json implies {tuple(expected[name].shape)}"
        for name, v in moekit_state.items()
        if name in expected and v.shape != expected[name].shape
    ]
    if wrong:
        raise ValueError(
            "the checkpoint's tensors do not match its config.json: " + "; ".join(wrong[:5])
        )
    dtype = next(v.dtype for v in moekit_state.values() if v.is_floating_point())
    model.to(dtype).load_state_dict(moekit_state, strict=True)
    return model


def _model_type_of(source: nn.Module | str | os.PathLike) -> Any:
    if isinstance(source, nn.Module):
        return getattr(getattr(source, "config", None), "model_type", None)
    return read_hf_config(source).get("model_type")


def from_hf(source: nn.Module | str | os.PathLike) -> TransformerLM | EncoderDecoderLM:
    """A moekit model with the weights of an HF model (in memory or a folder): a
    ``TransformerLM`` for the decoder-only families, an ``EncoderDecoderLM`` for
    ``switch_transformers``."""
    if _model_type_of(source) in SEQ2SEQ_FAMILIES:
        return _from_hf_seq2seq(source)
    return _from_hf_decoder(source)


def _from_hf_decoder(source: nn.Module | str | os.PathLike) -> TransformerLM:
    if isinstance(source, nn.Module):
        hf_config = cast(Any, source).config.to_dict()
        family = _family(hf_config.get("model_type"))
        check_hf_integers(hf_config, f"{hf_config.get('model_type')} config")
        config = family.config_from_hf(hf_config)
        state = {k: v.detach() for k, v in source.state_dict().items()}
        _refuse_quantised(state, type(source).__name__)
        if hasattr(family, "checkpoint_state"):  # a family's own checkpoint naming
            state = family.checkpoint_state(hf_config, state)
    else:  # the config first: an unsupported family or option fails before any tensor is read
        hf_config = read_hf_config(source)
        family = _family(hf_config.get("model_type"))
        check_hf_integers(hf_config, str(Path(source) / "config.json"))
        config = family.config_from_hf(hf_config)
        layer = config.moe.layer
        hf_config, state = read_hf_folder(
            source,
            quantised_experts=layer is not None and layer.experts.quantization is not None,
        )
        if hasattr(family, "checkpoint_state"):  # a family's own checkpoint naming
            state = family.checkpoint_state(hf_config, state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    moe_layers = [i for i in range(config.n_layers) if config.moe.is_moe_layer(i)]
    sources: dict[str, list[str]] = {}
    moekit_state = km.to_moekit(
        state,
        _layout(family.keymaps(config), state),
        n_layers=config.n_layers,
        moe_layers=moe_layers,
        num_experts=config.moe.num_experts,
        sources=sources,
    )
    model = TransformerLM(config)
    expected = model.state_dict()
    wrong = [
        f"{', '.join(sources[name])} gives {tuple(value.shape)}, config.json implies "
        f"{tuple(expected[name].shape)}"
        for name, value in moekit_state.items()
        if name in expected and value.shape != expected[name].shape
    ]
    if wrong:
        raise ValueError(
            "the checkpoint's tensors do not match its config.json: "
            + "; ".join(wrong[:5])
            + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    dtype = next(v.dtype for v in moekit_state.values() if v.is_floating_point())
    for name, value in expected.items():  # run-time buffers HF does not store
        if name.endswith(km.RUNTIME_BUFFERS):
            moekit_state.setdefault(name, value)
    model.to(dtype).load_state_dict(moekit_state, strict=True)
    return model


def _to_hf_seq2seq(model: EncoderDecoderLM, directory: str | os.PathLike, family: str) -> Path:
    fam = SEQ2SEQ_FAMILIES.get(family)
    if fam is None:
        raise ValueError(
            f"an encoder–decoder exports as {', '.join(SEQ2SEQ_FAMILIES)}, not {family!r}"
        )
    config = fold_uniform_expert_counts(model.config)
    problems = fam.export_problems(config)
    if problems:
        raise ValueError(export_refusal(family, problems))
    hf_config = fam.config_to_hf(config)
    state = fam.state_to_hf(config, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    state = {k: v.contiguous() for k, v in state.items()}

    def write(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(folder / "config.json", hf_config)

    return write_folder_atomically(directory, write)


def hf_state(model: TransformerLM, family: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``model`` as decoder family ``family``'s ``config.json`` dict and per-expert state dict
    (CPU tensors), in memory; refused by name (``export_refusal``) where the family cannot
    express the model."""
    fam = _family(family)
    config = fold_uniform_expert_counts(model.config)  # a uniformly pruned model is a family's
    problems = export_problems(config, fam.config_to_hf, fam.config_from_hf)
    if problems:
        raise ValueError(export_refusal(family, problems))
    hf_config = fam.config_to_hf(config)
    moe_layers = [i for i in range(config.n_layers) if config.moe.is_moe_layer(i)]
    state = km.to_hf(
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        next(iter(fam.keymaps(config).values())),  # the first layout is the checkpoints' one
        n_layers=config.n_layers,
        moe_layers=moe_layers,
        num_experts=config.moe.num_experts,
    )
    return hf_config, state


def to_hf(
    model: TransformerLM | EncoderDecoderLM, directory: str | os.PathLike, family: str
) -> Path:
    """Write ``model`` as an HF checkpoint of ``family`` (per-expert layout, safetensors)."""
    if isinstance(model, EncoderDecoderLM):
        return _to_hf_seq2seq(model, directory, family)
    if family in SEQ2SEQ_FAMILIES:
        raise ValueError(f"{family!r} is an encoder–decoder family; this model is decoder-only")
    hf_config, state = hf_state(model, family)

    def write(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(folder / "config.json", hf_config)

    return write_folder_atomically(directory, write)
