"""A new user's journeys, end to end through the CLI on tiny models (issue 30).

Each failed before the tokenizer story: ``generate`` always read byte tokens, ``eval`` scored
byte ids of BPE models, a run stored its tokenizer as the relative path that was typed, and
``quantize`` with defaults failed on widths not divisible by 128.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from moekit.cli.main import main  # noqa: E402
from moekit.training.data import standard_library_files  # noqa: E402

VOCAB = 120


def _bpe_tokenizer(folder: Path, text: str) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``VOCAB`` tokens trained offline on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(folder)
    return fast


@pytest.fixture
def hf_moe_with_bpe(tmp_path):
    """A tiny random Qwen3-MoE with its own BPE tokenizer (widths not divisible by 128), and a
    small corpus."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = ""
    for path in standard_library_files()[:4]:
        body = path.read_text(encoding="utf-8", errors="replace")
        (corpus / path.name).write_text(body)
        text += body
    source = tmp_path / "hf"
    tokenizer = _bpe_tokenizer(source, text)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(source)
    return source, corpus, tokenizer


def _finetune(tmp_path, source, corpus) -> Path:
    run = tmp_path / "runs" / "ft"
    args = ["finetune", "--from-hf", str(source), "--data", str(corpus), "--out-dir", str(run)]
    args += ["--steps", "3", "--quiet", "--set", "data.seq_len=32", "--set", "data.batch_size=2"]
    args += ["--set", "eval_batches=1", "--export-hf", str(tmp_path / "exported")]
    assert main(args) == 0
    return run


def test_a_bpe_model_fine_tuned_generates_and_evaluates_with_its_tokenizer_from_anywhere(
    tmp_path, hf_moe_with_bpe, capsys, monkeypatch
):
    source, corpus, tokenizer = hf_moe_with_bpe
    run = _finetune(tmp_path, source, corpus)
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # the run holds its own copy
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the path typed at training time no longer resolves
    os.rename(source, tmp_path / "gone")  # nor does the source folder exist any more
    capsys.readouterr()
    prompt = "def main"
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(prompt)
    # the continuation is the model's greedy BPE tokens, decoded by the BPE tokenizer
    from moekit.models.transformer.generate import generate
    from moekit.training.finetune import load_source

    model = load_source(str(run)).eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = generate(model, torch.tensor(ids), 8)
    assert printed == prompt + tokenizer.decode(out[len(ids) :].tolist())
    for target in (run, run / "checkpoints" / "latest"):  # checkpoints/latest is accepted too
        assert main(["eval", str(target), "--data", str(corpus), "--batches", "1",
                     "--batch-size", "2", "--seq-len", "32"]) == 0  # fmt: skip
        captured = capsys.readouterr()
        assert "nats/token" in captured.out and "windows of 32 tokens" in captured.err
    # a byte-level read of a BPE model is refused by name, not printed as garbage
    assert main(["generate", str(run), "--tokenizer", "bytes"]) == 2
    refusal = capsys.readouterr().err
    assert f"the model has vocab_size {len(tokenizer)}, not the 256 of byte tokens" in refusal


def test_quantize_with_defaults_carries_the_tokenizer_and_generates(
    tmp_path, hf_moe_with_bpe, capsys
):
    source, corpus, tokenizer = hf_moe_with_bpe
    run = _finetune(tmp_path, source, corpus)
    quantized = tmp_path / "q4"
    assert main(["quantize", str(run), str(quantized)]) == 0  # widths 48 and 24: group 24
    err = capsys.readouterr().err
    assert "group size 24" in err
    assert (quantized / "tokenizer.json").is_file()
    assert main(["eval", str(quantized), "--data", str(corpus), "--batches", "1",
                 "--batch-size", "2", "--seq-len", "32"]) == 0  # fmt: skip
    assert "nats/token" in capsys.readouterr().out
    assert main(["generate", str(quantized), "--chat", "--prompt", "hi", "--max-new-tokens",
                 "4", "--temperature", "0"]) == 0  # fmt: skip
    # the export reloads in transformers with the tokenizer beside it
    exported = tmp_path / "exported"
    assert (exported / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert reloaded.config.vocab_size == len(tokenizer)


def test_a_second_stage_fine_tune_reads_the_first_stages_tokenizer(
    tmp_path, hf_moe_with_bpe, capsys
):
    source, corpus, _ = hf_moe_with_bpe
    first = _finetune(tmp_path, source, corpus)
    second = tmp_path / "runs" / "second"
    args = ["finetune", "--from", str(first), "--data", str(corpus), "--out-dir", str(second)]
    args += ["--steps", "2", "--quiet", "--set", "data.seq_len=32", "--set", "data.batch_size=2"]
    args += ["--set", "eval_batches=1"]
    assert main(args) == 0, capsys.readouterr().err
    assert (second / "tokenizer" / "tokenizer.json").is_file()
    state = json.loads(next((second / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["train_config"]["data"]["tokenizer"]


def test_exports_that_conflict_are_refused_before_training(tmp_path, hf_moe_with_bpe, capsys):
    source, corpus, _ = hf_moe_with_bpe
    run = tmp_path / "runs" / "x"
    args = ["finetune", "--from-hf", str(source), "--data", str(corpus), "--out-dir", str(run)]
    args += ["--preset", "router", "--lora-rank", "4", "--export-hf", str(tmp_path / "a")]
    args += ["--export-peft", str(tmp_path / "b"), "--steps", "3"]
    assert main(args) == 2
    assert "--export-peft writes LoRA adapters only" in capsys.readouterr().err
    assert not run.exists()  # nothing was trained


def test_a_hybrid_qwen3_5_moe_fine_tunes_and_exports_to_transformers(tmp_path, hf_moe_with_bpe):
    """Issue 31's journey: ``finetune --from-hf`` a tiny Qwen3.5-MoE (Gated DeltaNet + gated
    attention), then ``--export-hf``; transformers reloads the export with moekit's logits."""
    _, corpus, tokenizer = hf_moe_with_bpe
    source = tmp_path / "qwen3_5"
    tokenizer.save_pretrained(source)
    config = transformers.Qwen3_5MoeTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.Qwen3_5MoeForCausalLM(config).save_pretrained(source)
    run = _finetune(tmp_path, source, corpus)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    from moekit.training.finetune import load_source

    ours = load_source(str(run)).eval()
    tokens = torch.tensor([tokenizer.encode("def main():\n    return 1")])
    with torch.no_grad():
        assert (exported(tokens).logits - ours(tokens).logits).abs().max() <= 1e-5
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    assert main(["generate", str(run), "--prompt", "def", "--max-new-tokens", "4"]) == 0
