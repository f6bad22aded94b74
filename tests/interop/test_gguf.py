"""GGUF export: every tensor read back with the ``gguf`` reader equals its source; refusals by
name; and (slow, needs ``pip install 'moekit[llama-cpp]'``) llama.cpp itself runs the files with
moekit's logits and greedy tokens."""

import numpy as np
import pytest
import torch

from moekit.interop.gguf_export import (
    GGUF_ARCHS,
    _permute_rope,
    _stack_experts,
    check_type,
    choose_family,
    export_gguf,
    gguf_problems,
)
from moekit.interop.hf import from_hf, hf_state
from tests.interop.tiny_families import deepseek_v2
from tests.interop.tiny_hf import deepseek_v3, gpt_oss, mixtral, qwen_or_olmoe

gguf = pytest.importorskip("gguf")

# each family's tiny model in a shape its llama.cpp architecture runs
RUNNABLE = {
    "qwen3_moe": {},
    "qwen2_moe": {"decoder_sparse_step": 1},
    "olmoe": {"num_key_value_heads": 4},
    "mixtral": {},
    "deepseek_v3": {},
    "deepseek_v2": {"n_group": 1, "topk_group": 1, "topk_method": "greedy"},
    "gpt_oss": {},
}
BUILDERS = {
    "mixtral": mixtral,
    "deepseek_v3": deepseek_v3,
    "deepseek_v2": deepseek_v2,
    "gpt_oss": gpt_oss,
}


def tiny(family: str, **options):
    options = {**RUNNABLE[family], **options}
    if family in BUILDERS:
        return from_hf(BUILDERS[family](vocab_size=256, **options)).eval()
    return from_hf(qwen_or_olmoe(family, vocab_size=256, **options)).eval()


def read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {
        t.name: (gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type)
        for t in reader.tensors
    }
    return reader, tensors


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("family", list(RUNNABLE))
def test_every_tensor_reads_back_as_its_source(tmp_path, family):
    model = tiny(family)
    path = export_gguf(model, tmp_path / "m.gguf", family=family, file_type="f32")
    reader, tensors = read(path)
    hf_config, state = hf_state(model, family)
    n_head, n_kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    expected = {}
    experts = {}
    for key, value in state.items():  # an independent map of the HF names we expect to see
        parts = key.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            layer, e = int(parts[2]), int(parts[parts.index("experts") + 1])
            proj = parts[parts.index("experts") + 2]
            kind = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up"}.get(
                proj, "down"
            )
            experts.setdefault(f"blk.{layer}.ffn_{kind}_exps.weight", {})[e] = value
    for name, stacked in experts.items():
        expected[name] = torch.stack([stacked[e] for e in sorted(stacked)])
    if family == "gpt_oss":  # stacked (E, D, 2I), gate and up interleaved in the columns
        for layer in range(2):
            both = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"].transpose(1, 2)
            expected[f"blk.{layer}.ffn_gate_exps.weight"] = both[:, ::2]
            expected[f"blk.{layer}.ffn_up_exps.weight"] = both[:, 1::2]
            expected[f"blk.{layer}.ffn_down_exps.weight"] = state[
                f"model.layers.{layer}.mlp.experts.down_proj"
            ].transpose(1, 2)
    else:
        assert experts, "no expert tensors found"
    for name, want in expected.items():
        got, kind = tensors[name]
        assert kind == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(got, want.float().numpy())
    # every tensor: the element count matches and nothing is missing or extra
    assert sum(int(np.prod(t.shape)) for t in reader.tensors) == sum(
        v.numel() for v in state.values()
    )
    np.testing.assert_array_equal(
        tensors["token_embd.weight"][0], state["model.embed_tokens.weight"].numpy()
    )
    arch = GGUF_ARCHS[family].name
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.expert_used_count") == 2
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == 256
    if family.startswith("deepseek"):  # kv_b_proj split per head into k_b (transposed), v_b
        heads, nope = hf_config["num_attention_heads"], hf_config["qk_nope_head_dim"]
        kv_b = state["model.layers.1.self_attn.kv_b_proj.weight"].view(
            heads, -1, 8 if family == "deepseek_v2" else 16
        )
        np.testing.assert_array_equal(
            tensors["blk.1.attn_k_b.weight"][0], kv_b[:, :nope].transpose(1, 2).numpy()
        )
        np.testing.assert_array_equal(tensors["blk.1.attn_v_b.weight"][0], kv_b[:, nope:].numpy())
        assert field(reader, f"{arch}.attention.head_count_kv") == 1
        assert field(reader, f"{arch}.leading_dense_block_count") == 1
        return
    q = state["model.layers.0.self_attn.q_proj.weight"]
    k = state["model.layers.0.self_attn.k_proj.weight"]
    if GGUF_ARCHS[family].rope_permute:  # llama's GPT-J pairs: rows permuted per head
        q, k = _permute_rope(q, n_head), _permute_rope(k, n_kv)
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"][0], q.numpy())
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"][0], k.numpy())
    assert field(reader, f"{arch}.expert_count") == 4
    assert field(reader, f"{arch}.block_count") == 2


@pytest.mark.parametrize("file_type", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantised_types_read_back_within_their_step(tmp_path, file_type):
    model = tiny("qwen3_moe")
    path = export_gguf(model, tmp_path / "m.gguf", family="qwen3_moe", file_type=file_type)
    _, tensors = read(path)
    _, state = hf_state(model, "qwen3_moe")
    stacked = torch.stack(
        [state[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] for e in range(4)]
    ).numpy()
    got, kind = tensors["blk.1.ffn_up_exps.weight"]
    assert kind == gguf.GGMLQuantizationType[file_type.upper()]
    # within one step of each 32-value block (f16/bf16: the block maximum's ulp; q4_0 clips)
    rel = {"f16": 2**-10, "bf16": 2**-7, "q8_0": 1 / 127, "q4_0": 1 / 8}[file_type]  # a step
    blocks = np.abs(stacked).reshape(-1, 32).max(axis=1, keepdims=True)
    err = np.abs(got - stacked).reshape(-1, 32)
    assert (err <= blocks * rel + 1e-12).all()
    assert np.abs(got - stacked).max() > 0 or file_type == "f16"
    # the router and the norms stay float32 whatever the type
    assert tensors["blk.0.ffn_gate_inp.weight"][1] == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_norm.weight"][1] == gguf.GGMLQuantizationType.F32


def test_expert_stacking_keeps_expert_order():
    state = {
        "m.layers.0.mlp.experts.1.up_proj.weight": torch.full((2, 3), 1.0),
        "m.layers.0.mlp.experts.0.up_proj.weight": torch.full((2, 3), 0.0),
        "m.norm.weight": torch.ones(3),
    }
    out = _stack_experts(state)
    assert list(out) == ["m.layers.0.mlp.experts.up_proj.weight", "m.norm.weight"]
    assert out["m.layers.0.mlp.experts.up_proj.weight"][:, 0, 0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"not 0\.\.E-1"):
        _stack_experts({"a.experts.1.w1.weight": torch.ones(1)})


def test_refusals_name_what_llama_cpp_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="llama-quantize"):
        check_type("q4_k_m")
    with pytest.raises(ValueError, match="--type must be one of"):
        check_type("int3")
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        export_gguf(tiny("olmoe", num_key_value_heads=2), tmp_path / "o.gguf", family="olmoe")
    with pytest.raises(ValueError, match="decoder_sparse_step=2"):
        export_gguf(
            tiny("qwen2_moe", decoder_sparse_step=2), tmp_path / "q.gguf", family="qwen2_moe"
        )
    with pytest.raises(ValueError, match="group_limited_greedy"):
        export_gguf(
            tiny("deepseek_v2", n_group=4, topk_group=2, topk_method="group_limited_greedy"),
            tmp_path / "d.gguf",
            family="deepseek_v2",
        )
    with pytest.raises(ValueError, match="family='gpt2'"):
        export_gguf(tiny("qwen3_moe"), tmp_path / "x.gguf", family="gpt2")
    assert gguf_problems("qwen3_moe", {"num_attention_heads": 4, "norm_topk_prob": False})
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".*partial"))


def test_auto_family_picks_one_that_runs():
    assert choose_family(tiny("qwen3_moe")) == "qwen3_moe"
    assert choose_family(tiny("qwen2_moe")) == "qwen2_moe"
    assert choose_family(tiny("gpt_oss")) == "gpt_oss"
    assert choose_family(tiny("deepseek_v3")) == "deepseek_v3"


def _bpe_folder(folder):
    """A byte-level BPE tokenizer (about 300 tokens) trained offline, saved as HF files;
    returns the ``tokenizers.Tokenizer``."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["the cat sat on the mat " * 20, "a dog and the cat"], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return bpe


def test_hf_bpe_tokenizer_goes_in_with_its_merges(tmp_path):
    folder = tmp_path / "tok"
    bpe = _bpe_folder(folder)
    vocab = bpe.get_vocab_size()
    model = from_hf(qwen_or_olmoe("qwen3_moe", vocab_size=vocab + 4)).eval()
    path = export_gguf(model, tmp_path / "m.gguf", family="qwen3_moe", tokenizer_folder=folder)
    reader, _ = read(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == vocab + 4  # padded to the model's rows
    assert tokens[bpe.token_to_id("the")] == "the"
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    small = from_hf(qwen_or_olmoe("qwen3_moe", vocab_size=vocab - 1)).eval()
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        export_gguf(small, tmp_path / "s.gguf", family="qwen3_moe", tokenizer_folder=folder)


# ---------------------------------------------------------------- llama.cpp itself (slow)


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install 'moekit[llama-cpp]'")
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0
    )


def _greedy_llama(llm, prompt, steps):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _greedy_moekit(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNNABLE))
def test_llama_cpp_runs_the_file_with_moekits_logits_and_tokens(tmp_path, family):
    model = tiny(family)
    path = export_gguf(model, tmp_path / "m.gguf", family=family, file_type="f32")
    llm = _llama(path)
    prompt = list(b"the cat sat")
    assert llm.tokenize(b"the cat sat", add_bos=False) == prompt  # the byte tokenizer
    llm.reset()
    llm.eval(prompt)
    got = np.array(llm.scores[: len(prompt)])
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=5e-4, rtol=0)
    assert _greedy_llama(llm, prompt, 8) == _greedy_moekit(model, prompt, 8)


@pytest.mark.slow
def test_quantised_files_logit_error_in_llama_cpp(tmp_path):
    """The q8_0 and q4_0 files' logit error against moekit's float32 logits (printed; bounded)."""
    model = tiny("qwen3_moe")
    prompt = list(b"the cat sat on")
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
    errors = {}
    for kind in ("f16", "q8_0", "q4_0"):
        llm = _llama(
            export_gguf(model, tmp_path / f"{kind}.gguf", family="qwen3_moe", file_type=kind)
        )
        llm.reset()
        llm.eval(prompt)
        errors[kind] = float(np.abs(np.array(llm.scores[: len(prompt)]) - want).max())
    print("max |logit error| vs moekit fp32:", errors, "logit scale", float(np.abs(want).max()))
    assert errors["f16"] < errors["q8_0"] < errors["q4_0"] < 0.5 * float(np.abs(want).max())


def _finetuned_qwen3_moe_run(tmp_path, capsys, lora: bool):
    """A tiny Qwen3-MoE Hub folder (with a BPE tokenizer) fine-tuned for 3 steps with moekit."""
    from moekit.cli.main import main

    source = tmp_path / "hf"
    bpe = _bpe_folder(source)
    qwen_or_olmoe("qwen3_moe", vocab_size=bpe.get_vocab_size()).save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 200)
    args = [
        "finetune",
        "--from-hf",
        str(source),
        "--data",
        str(text),
        "--steps",
        "3",
        "--out-dir",
        str(tmp_path / "run"),
        "--set",
        "data.seq_len=16",
        "--set",
        "data.batch_size=4",
        "--set",
        "eval_batches=1",
        "--set",
        "optim.lr=0.05",
        "--quiet",
    ]
    if lora:
        args += ["--lora-rank", "2"]
    assert main(args) == 0, capsys.readouterr().err
    return tmp_path / "run"


def test_export_gguf_command_writes_a_finetuned_run(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.training.finetune import load_source

    run = _finetuned_qwen3_moe_run(tmp_path, capsys, lora=True)
    out = tmp_path / "model.gguf"
    assert main(["export-gguf", str(run), str(out), "--type", "q8_0"]) == 0
    assert "qwen3moe (qwen3_moe), q8_0" in capsys.readouterr().out
    _, tensors = read(out)
    model = load_source(str(run))
    from moekit.adapters.lora import remove_lora

    remove_lora(model)  # what llama.cpp gets: the adapters merged
    _, state = hf_state(model, "qwen3_moe")
    want = torch.stack(
        [state[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(4)]
    ).numpy()
    assert np.abs(tensors["blk.0.ffn_gate_exps.weight"][0] - want).max() < 0.01
    with pytest.raises(SystemExit):
        main(["export-gguf", str(run), str(out), "--family", "gpt2"])
    capsys.readouterr()
    assert main(["export-gguf", str(run), str(out), "--type", "q4_k_m"]) == 2
    assert "llama-quantize OUT.gguf OUT-q4_k_m.gguf Q4_K_M" in capsys.readouterr().err


@pytest.mark.slow
def test_finetuned_qwen3_moe_runs_in_llama_cpp_with_moekits_greedy_tokens(tmp_path, capsys):
    """The journey of docs/gguf.md: fine-tune a Hub Qwen3-MoE with moekit, export, run."""
    from moekit.cli.main import main
    from moekit.training.finetune import load_source

    run = _finetuned_qwen3_moe_run(tmp_path, capsys, lora=False)
    out = tmp_path / "model.gguf"
    assert main(["export-gguf", str(run), str(out), "--type", "f32"]) == 0
    model = load_source(str(run)).eval()
    llm = _llama(out)
    prompt = llm.tokenize(b"the cat sat", add_bos=False)
    from moekit.training.tokenizer_files import resolve_tokenizer

    assert prompt == resolve_tokenizer(str(run), model.config.vocab_size).encode("the cat sat")
    assert _greedy_llama(llm, prompt, 12) == _greedy_moekit(model, prompt, 12)


@pytest.mark.slow
def test_tied_embeddings_run_in_llama_cpp_without_an_output_tensor(tmp_path):
    model = tiny("qwen3_moe", tie_word_embeddings=True)
    path = export_gguf(model, tmp_path / "m.gguf", family="qwen3_moe", file_type="f32")
    _, tensors = read(path)
    assert "output.weight" not in tensors  # llama.cpp falls back to token_embd
    llm = _llama(path)
    prompt = list(b"the cat")
    llm.reset()
    llm.eval(prompt)
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[: len(prompt)]), want, atol=5e-4, rtol=0)
