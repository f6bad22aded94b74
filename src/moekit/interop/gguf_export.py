"""GGUF export for llama.cpp (and Ollama, LM Studio): a moekit model as the file llama.cpp's own
``convert_hf_to_gguf.py`` would write for the same Hugging Face checkpoint.

The path is moekit → Hugging Face family (``moekit.interop.hf.hf_state``, in memory: the same
refusals as ``moekit convert``) → GGUF, written with the ``gguf`` package (the format's own
library, ``pip install moekit[gguf]``):

- tensor names come from ``gguf``'s ``TensorNameMap`` for the architecture, after stacking each
  layer's per-expert matrices into one ``(E, out, in)`` tensor (``ffn_{gate,up,down}_exps``), as
  llama.cpp's converter does;
- the ``llama`` architecture (Mixtral) rotates pairs of adjacent channels (GPT-J style) where
  Hugging Face rotates halves, so ``q_proj``/``k_proj`` rows are permuted per head, as there;
- norms, biases and routers stay float32 (llama.cpp's converter keeps ``ffn_gate_inp`` in
  float32 too); matrices take the requested type, and a matrix whose rows do not split into the
  type's blocks falls back to float16, logged;
- the tokenizer goes in as ``tokenizer.ggml.*``: a Hugging Face byte-level BPE
  (``tokenizer.json``) with its merges and special tokens, or moekit's byte tokenizer as a BPE
  of the 256 byte symbols with no merges (the same ids).

- DeepSeek's latent attention goes in as llama.cpp's absorbed form (``kv_b_proj`` split per
  head into ``attn_k_b``, transposed, and ``attn_v_b``), GPT-OSS's interleaved gate/up
  columns as separate ``ffn_gate_exps``/``ffn_up_exps`` (``_family_tensors``).

What llama.cpp's graph hard-codes is checked, and a model that differs is refused by name:
``qwen3moe`` and ``llama`` renormalise the top-k weights and ``qwen2moe`` and ``olmoe`` do not;
``deepseek2`` scores expert groups by their two best experts; ``gpt-oss`` slides its window
on even layers and clamps SwiGLU at 7; only ``deepseek2`` and ``gpt-oss`` read YaRN.

Quantised types: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q5_0``, ``q5_1``, ``q4_0``, ``q4_1``
(those the ``gguf`` package can quantise). K-quants (``q4_k`` …) need llama.cpp's own
``llama-quantize``; they are refused with that command.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.interop.hf import hf_state
from moekit.models.transformer.model import TransformerLM
from moekit.utils.serialization import _with_user_mode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFArch:
    """How one Hugging Face family is written for llama.cpp.

    Attributes:
        name: llama.cpp's architecture name (``general.architecture``).
        norm_topk: whether llama.cpp's graph renormalises the top-k weights (hard-coded there);
            ``None`` where the file says (``expert_weights_norm``) or the family fixes it.
        rope_permute: ``llama``'s GPT-J-style rotary pairs (permute q/k rows per head).
        pre_tokenizer: ``tokenizer.ggml.pre`` for a Hugging Face BPE tokenizer.
        yarn: whether llama.cpp reads YaRN rope scaling for this architecture from the file.
    """

    name: str
    norm_topk: bool | None
    rope_permute: bool = False
    pre_tokenizer: str = "default"
    yarn: bool = False


# Hugging Face family -> llama.cpp architecture
GGUF_ARCHS: dict[str, GGUFArch] = {
    "qwen3_moe": GGUFArch("qwen3moe", norm_topk=True, pre_tokenizer="qwen2"),
    "qwen2_moe": GGUFArch("qwen2moe", norm_topk=False, pre_tokenizer="qwen2"),
    "mixtral": GGUFArch("llama", norm_topk=True, rope_permute=True),
    "olmoe": GGUFArch("olmoe", norm_topk=False, pre_tokenizer="olmo"),
    "deepseek_v3": GGUFArch("deepseek2", None, pre_tokenizer="deepseek-v3", yarn=True),
    "deepseek_v2": GGUFArch("deepseek2", None, pre_tokenizer="deepseek-llm", yarn=True),
    "gpt_oss": GGUFArch("gpt-oss", None, pre_tokenizer="gpt-4o", yarn=True),
}
DEEPSEEK = ("deepseek_v3", "deepseek_v2")

# types the gguf package can write (name -> GGMLQuantizationType name)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
_K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q4_k_s", "q5_k_m", "q3_k_m")

_NO_SYMBOL = "\u4e00"  # not among GPT-2's 256 byte symbols
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def _gguf() -> Any:
    try:
        import gguf  # noqa: PLC0415 (optional: gguf)
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install 'moekit[gguf]'") from e
    return gguf


def check_type(file_type: str) -> str:
    """``file_type`` lower-cased if the exporter can write it; a clear refusal otherwise."""
    kind = file_type.lower()
    if kind in _K_QUANTS:
        raise ValueError(
            f"--type {file_type}: K-quants are computed by llama.cpp's own tool; export q8_0 or "
            f"f16 and run `llama-quantize OUT.gguf OUT-{kind}.gguf {kind.upper()}`"
        )
    if kind not in GGUF_TYPES:
        raise ValueError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {file_type!r}")
    return kind


def gguf_problems(family: str, hf_config: dict[str, Any]) -> list[str]:
    """What llama.cpp's ``family`` architecture cannot run in this model (empty: it can)."""
    arch = GGUF_ARCHS[family]
    problems = []
    norm = hf_config.get("norm_topk_prob", family == "mixtral")
    if arch.norm_topk is not None and bool(norm) != arch.norm_topk:
        problems.append(
            f"norm_topk_prob={norm} (llama.cpp's {arch.name} "
            f"{'always renormalises' if arch.norm_topk else 'never renormalises'} the top-k "
            "weights)"
        )
    rope = _rope(hf_config)
    if rope.get("rope_type", "default") not in (("default", "yarn") if arch.yarn else ("default",)):
        problems.append(f"rope_scaling={rope} (not written for {arch.name})")
    if hf_config.get("use_sliding_window") or (
        family in ("mixtral",) and hf_config.get("sliding_window")
    ):
        problems.append(f"sliding_window={hf_config.get('sliding_window')}")
    if family == "qwen2_moe" and hf_config.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={hf_config['mlp_only_layers']}")
    if family in ("qwen2_moe", "qwen3_moe") and int(hf_config.get("decoder_sparse_step", 1)) != 1:
        problems.append(
            f"decoder_sparse_step={hf_config['decoder_sparse_step']} (llama.cpp's {arch.name} "
            "has an MoE in every layer)"
        )
    if family == "olmoe" and hf_config.get("clip_qkv"):
        problems.append(f"clip_qkv={hf_config['clip_qkv']}")
    problems += _deepseek_problems(hf_config) if family in DEEPSEEK else []
    if family == "gpt_oss":
        pattern = ["sliding_attention", "full_attention"] * (hf_config["num_hidden_layers"] // 2)
        types = hf_config.get("layer_types")
        if types is not None and list(types) != pattern[: len(types)]:
            problems.append(
                f"layer_types={types} (llama.cpp's gpt-oss slides the window on even layers)"
            )
        if float(hf_config.get("swiglu_limit", 7.0)) != 7.0:
            problems.append(f"swiglu_limit={hf_config['swiglu_limit']} (llama.cpp's is 7.0)")
    heads, kv_heads = hf_config["num_attention_heads"], hf_config.get("num_key_value_heads")
    if family == "olmoe" and kv_heads not in (None, heads):
        problems.append(
            f"num_key_value_heads={kv_heads} with num_attention_heads={heads} (llama.cpp's olmoe "
            "normalises keys over d_model: multi-head attention only)"
        )
    return problems


def _deepseek_problems(hf: dict[str, Any]) -> list[str]:
    """DeepSeek routing llama.cpp's deepseek2 graph does not compute."""
    problems = []
    method = hf.get("topk_method", "greedy")
    groups = int(hf.get("n_group") or 1)
    if groups > 1 and method != "noaux_tc":
        problems.append(
            f"topk_method={method!r} with n_group={groups} (llama.cpp scores a group by its "
            "two best experts, DeepSeek-V3's noaux_tc; V2's group_limited_greedy takes the best "
            "one)"
        )
    if hf.get(
        "scoring_func", "sigmoid" if hf["model_type"] == "deepseek_v3" else "softmax"
    ) not in (
        "sigmoid",
        "softmax",
    ):
        problems.append(f"scoring_func={hf['scoring_func']!r}")
    return problems


def _rope(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of a ``config.json`` (transformers 5 nests them, 4 keeps them flat)."""
    nested = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    return {"rope_theta": hf_config.get("rope_theta"), **nested}


def _stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert ``…experts.{e}.{proj}.weight`` → one ``…experts.{proj}.weight`` of shape
    ``(E, out, in)`` per layer and projection; other tensors unchanged, order kept."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _EXPERT_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        merged = f"{match.group(1)}.{match.group(3)}.weight"
        if merged not in groups:
            groups[merged] = {}
            out[merged] = value  # placeholder keeps the order
        groups[merged][int(match.group(2))] = value
    for merged, experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"{merged}: experts {sorted(experts)} are not 0..E-1")
        out[merged] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection from halves-rotation order to adjacent-pairs order, per head
    (what llama.cpp's converter does for the ``llama`` architecture)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(
    family: str, hf_config: dict[str, Any], state: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(gguf name, float32 tensor)`` for every tensor of a Hugging Face state dict of
    ``family``, in llama.cpp's names and layouts."""
    gguf = _gguf()
    arch = GGUF_ARCHS[family]
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
    names = gguf.get_tensor_name_map(arch_enum, int(hf_config["num_hidden_layers"]))
    n_head = int(hf_config["num_attention_heads"])
    n_kv = int(hf_config.get("num_key_value_heads") or n_head)
    for key, value in _family_tensors(family, hf_config, _stack_experts(state)):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{key}: no GGUF name for it in llama.cpp's {arch.name} architecture")
        tensor = value.detach().float()
        if arch.rope_permute and key.endswith("q_proj.weight"):
            tensor = _permute_rope(tensor, n_head)
        elif arch.rope_permute and key.endswith("k_proj.weight"):
            tensor = _permute_rope(tensor, n_kv)
        if key.endswith("shared_expert_gate.weight"):
            tensor = tensor.reshape(-1)  # llama.cpp reads it as a vector of d_model
        yield name, tensor


def _family_tensors(
    family: str, hf: dict[str, Any], state: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors as llama.cpp's converter renames and splits them:

    - DeepSeek: ``kv_b_proj`` ``(H·(nope+v), kv_rank)`` split per head into ``k_b_proj``
      ``(H, kv_rank, nope)`` (transposed, for the absorbed-MLA product) and ``v_b_proj``
      ``(H, v, kv_rank)``; ``e_score_correction_bias`` as a bias tensor;
    - GPT-OSS: ``gate_up_proj`` ``(E, D, 2I)`` with gate and up interleaved in its columns
      split into ``gate_proj``/``up_proj`` ``(E, I, D)``, ``down_proj`` ``(E, I, D)``
      transposed, the biases split alike, ``sinks`` as a weight.
    """
    for key, value in state.items():
        if family in DEEPSEEK and key.endswith("kv_b_proj.weight"):
            heads, nope, v = hf["num_attention_heads"], hf["qk_nope_head_dim"], hf["v_head_dim"]
            kv_b = value.view(heads, nope + v, value.shape[-1])
            k_b, v_b = torch.split(kv_b, [nope, v], dim=1)
            yield key.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2).contiguous()
            yield key.replace("kv_b_proj", "v_b_proj"), v_b.contiguous()
        elif family in DEEPSEEK and key.endswith("e_score_correction_bias"):
            yield key.replace("e_score_correction_bias", "e_score_correction.bias"), value
        elif family == "gpt_oss" and key.endswith("experts.gate_up_proj"):
            both = value.transpose(-1, -2)  # (E, 2I, D), rows gate, up, gate, up, ...
            yield key.replace("gate_up_proj", "gate_proj.weight"), both[:, ::2].contiguous()
            yield key.replace("gate_up_proj", "up_proj.weight"), both[:, 1::2].contiguous()
        elif family == "gpt_oss" and key.endswith("experts.gate_up_proj_bias"):
            yield key.replace("gate_up_proj_bias", "gate_proj.bias"), value[..., ::2].contiguous()
            yield key.replace("gate_up_proj_bias", "up_proj.bias"), value[..., 1::2].contiguous()
        elif family == "gpt_oss" and key.endswith("experts.down_proj"):
            yield key + ".weight", value.transpose(-1, -2).contiguous()
        elif family == "gpt_oss" and key.endswith("experts.down_proj_bias"):
            yield key.replace("down_proj_bias", "down_proj.bias"), value
        elif family == "gpt_oss" and key.endswith("sinks"):
            yield key + ".weight", value
        else:
            yield key, value


def _tensor_type(name: str, tensor: torch.Tensor, file_type: str) -> tuple[np.ndarray, Any]:
    """The array to write and its ``GGMLQuantizationType`` (norms, biases and routers float32;
    rows that do not split into the type's blocks float16)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    array = tensor.numpy().astype(np.float32)
    if tensor.ndim == 1 or name.endswith("ffn_gate_inp.weight") or file_type == "f32":
        return array, q.F32
    kind = q[file_type.upper()]
    if kind == q.F16:
        return array.astype(np.float16), q.F16
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    if array.shape[-1] % block:
        logger.info(
            "%s: rows of %d do not split into %s blocks of %d; float16",
            name,
            array.shape[-1],
            file_type,
            block,
        )
        return array.astype(np.float16), q.F16
    return gguf.quants.quantize(array, kind), kind


def _write_metadata(writer: Any, family: str, hf: dict[str, Any], file_type: str) -> None:
    gguf = _gguf()
    n_head = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // n_head)
    writer.add_block_count(int(hf["num_hidden_layers"]))
    writer.add_context_length(int(hf.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(int(hf["hidden_size"]))
    writer.add_feed_forward_length(int(hf.get("intermediate_size") or 0))
    writer.add_head_count(n_head)
    if family not in DEEPSEEK:  # latent attention writes its own (_deepseek_metadata)
        writer.add_head_count_kv(int(hf.get("num_key_value_heads") or n_head))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(hf).get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(hf.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(hf["vocab_size"]))
    experts = int(hf.get("num_experts") or hf.get("n_routed_experts") or hf["num_local_experts"])
    writer.add_expert_count(experts)
    writer.add_expert_used_count(int(hf["num_experts_per_tok"]))
    if hf.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(hf["moe_intermediate_size"]))
    if hf.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(int(hf["shared_expert_intermediate_size"]))
    if family in ("mixtral", "gpt_oss"):
        writer.add_expert_feed_forward_length(int(hf["intermediate_size"]))
    rope = _rope(hf)
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
        ):
            if rope.get(key) is not None:
                add(float(rope[key]))
    if family in DEEPSEEK:
        _deepseek_metadata(writer, hf)
    if family == "gpt_oss":
        writer.add_sliding_window(int(hf["sliding_window"]))
    kinds = gguf.LlamaFileType
    writer.add_file_type(
        kinds.ALL_F32 if file_type == "f32" else kinds[f"MOSTLY_{file_type.upper()}"]
    )


def _deepseek_metadata(writer: Any, hf: dict[str, Any]) -> None:
    """deepseek2's keys: MLA written as multi-query attention over the latent (``head_count_kv``
    1, keys of ``kv_rank + rope`` and values of ``kv_rank``, decompressed by ``k_b``/``v_b``),
    the leading dense blocks, shared experts, groups, gating, scaling."""
    gguf = _gguf()
    rope = int(hf["qk_rope_head_dim"])
    kv_rank = int(hf["kv_lora_rank"])
    writer.add_head_count_kv(1)
    writer.add_key_length(kv_rank + rope)
    writer.add_value_length(kv_rank)
    writer.add_rope_dimension_count(rope)
    writer.add_key_length_mla(int(hf["qk_nope_head_dim"]) + rope)
    writer.add_value_length_mla(int(hf["v_head_dim"]))
    writer.add_kv_lora_rank(kv_rank)
    writer.add_q_lora_rank(int(hf.get("q_lora_rank") or 0))  # 0: a plain q projection
    writer.add_leading_dense_block_count(int(hf.get("first_k_dense_replace") or 0))
    writer.add_expert_shared_count(int(hf.get("n_shared_experts") or 0))
    if hf.get("routed_scaling_factor") is not None:
        writer.add_expert_weights_scale(float(hf["routed_scaling_factor"]))
    if hf.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    if int(hf.get("n_group") or 1) > 1:
        writer.add_expert_group_count(int(hf["n_group"]))
        writer.add_expert_group_used_count(int(hf["topk_group"]))
    scoring = hf.get("scoring_func", "sigmoid" if hf["model_type"] == "deepseek_v3" else "softmax")
    gating = gguf.ExpertGatingFuncType
    writer.add_expert_gating_func(gating.SIGMOID if scoring == "sigmoid" else gating.SOFTMAX)
    rope_params = _rope(hf)
    if rope_params.get("rope_type") == "yarn" and rope_params.get("mscale_all_dim"):
        # llama.cpp divides this by 0.1 again (its converter's legacy, kept for old files)
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(rope_params["mscale_all_dim"]))


def _write_tokenizer(
    writer: Any, arch: GGUFArch, tokenizer_folder: Path | None, vocab_size: int
) -> str:
    """``tokenizer.ggml.*`` from the model's tokenizer; returns what was written."""
    gguf = _gguf()
    if tokenizer_folder is None:
        if vocab_size != 256:
            raise ValueError(
                f"the model has vocab_size={vocab_size} but no tokenizer files were found: "
                "pass the folder with tokenizer.json"
            )
        # moekit's ByteTokenizer: token b is byte b; GPT-2's byte symbols with no merges
        symbols = _bytes_to_unicode()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([symbols[b] for b in range(256)])
        writer.add_token_types([gguf.TokenType.NORMAL] * 256)
        # llama.cpp requires a BPE's merges and gguf cannot write an empty array: one merge of
        # a symbol no byte maps to, so it never fires
        writer.add_token_merges([f"{_NO_SYMBOL} {_NO_SYMBOL}"])
        return "bytes (256 symbols)"
    if not (tokenizer_folder / "tokenizer.json").exists():
        raise ValueError(
            f"{tokenizer_folder}: GGUF export writes byte-level BPE tokenizers (tokenizer.json); "
            "this folder has none"
        )
    vocab = gguf.vocab.BpeVocab(tokenizer_folder)
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise ValueError(
            f"{tokenizer_folder}: the tokenizer has {len(tokens)} tokens, more than the model's "
            f"vocab_size={vocab_size}"
        )
    for i in range(len(tokens), vocab_size):  # rows beyond the tokenizer: padding, as there
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(arch.pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer)
    return f"BPE ({len(tokens)} tokens, {len(special.merges)} merges)"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable symbol table (the symbols byte-level BPE vocabularies
    are written in)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def choose_family(model: TransformerLM) -> str:
    """The first of ``GGUF_ARCHS``'s families that can express ``model`` and whose llama.cpp
    architecture runs it; a refusal naming each family's first problem otherwise."""
    reasons = []
    for family in GGUF_ARCHS:
        try:
            hf_config, _ = hf_state(model, family)
        except ValueError as e:
            reasons.append(f"{family}: {str(e).splitlines()[0]}")
            continue
        problems = gguf_problems(family, hf_config)
        if not problems:
            return family
        reasons.append(f"{family}: {problems[0]}")
    raise ValueError(
        "no llama.cpp architecture moekit writes can run this model:\n  " + "\n  ".join(reasons)
    )


def export_gguf(
    model: TransformerLM,
    path: str | os.PathLike,
    *,
    family: str = "auto",
    file_type: str = "f16",
    tokenizer_folder: str | os.PathLike | None = None,
    name: str = "moekit",
) -> Path:
    """Write ``model`` as a GGUF file llama.cpp runs (atomically: a temporary file renamed).

    Args:
        model: a moekit decoder-only model.
        path: the ``.gguf`` file to write.
        family: the Hugging Face family whose llama.cpp architecture to write
            (one of ``GGUF_ARCHS``: qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3,
            deepseek_v2, gpt_oss); ``"auto"``:
            :func:`choose_family`.
        file_type: one of ``GGUF_TYPES``.
        tokenizer_folder: a folder with the model's ``tokenizer.json``; ``None`` for moekit's
            byte tokenizer (vocab_size 256).
        name: ``general.name``.

    Returns:
        The path written.
    """
    gguf = _gguf()
    if family == "auto":
        family = choose_family(model)
    if family not in GGUF_ARCHS:
        raise ValueError(
            f"family={family!r}: GGUF export writes {', '.join(GGUF_ARCHS)} (llama.cpp "
            "architectures moekit checks against llama.cpp)"
        )
    kind = check_type(file_type)
    arch = GGUF_ARCHS[family]
    hf_config, state = hf_state(model, family)
    problems = gguf_problems(family, hf_config)
    if problems:
        raise ValueError(
            f"llama.cpp's {arch.name} architecture cannot run this model: " + "; ".join(problems)
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(staging), arch.name)
    writer.add_name(name)
    _write_metadata(writer, family, hf_config, kind)
    folder = Path(tokenizer_folder) if tokenizer_folder is not None else None
    _write_tokenizer(writer, arch, folder, int(hf_config["vocab_size"]))
    for tensor_name, tensor in gguf_tensors(family, hf_config, state):
        array, qtype = _tensor_type(tensor_name, tensor, kind)
        writer.add_tensor(tensor_name, array, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    _with_user_mode(path, folder=False)  # the mode open() gives under the user's umask
    return path
