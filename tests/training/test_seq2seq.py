"""Instruction data for an encoder–decoder: the prompt in, the response out. The batched loss
must equal each example's own loss computed alone, without padding; the training loop and
``moekit finetune --instruction`` must run it with the ST-MoE presets."""

import json

import pytest
import torch
import torch.nn.functional as F

from moekit.cli.main import main
from moekit.models.checkpoint import from_pretrained
from moekit.models.encoder_decoder import EncoderDecoderLM
from moekit.training import load_train_config, train
from moekit.training.checkpoint import resolve_checkpoint
from moekit.training.data import ByteTokenizer
from moekit.training.instruct import IGNORE_INDEX, render
from moekit.training.objective import evaluate, model_loss
from moekit.training.seq2seq import (
    Seq2SeqStream,
    load_seq2seq,
    pad_examples,
    split_example,
)
from tests.models.test_encoder_decoder import tiny


def test_split_example_takes_the_last_trained_run_as_the_target():
    tokens = [1, 2, 3, 4, 5, 6, 7]
    trained = [False, True, False, False, True, True, False]
    assert split_example(tokens, trained) == ([1, 2, 3, 4], [5, 6])
    with pytest.raises(ValueError, match="no trained"):
        split_example([1, 2], [False, False])
    with pytest.raises(ValueError, match="differ in length"):
        split_example([1, 2], [True])


def test_rendered_prompt_goes_in_and_the_response_comes_out():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tokenizer = ByteTokenizer()
    source, target = split_example(*render(messages, tokenizer))
    text = tokenizer.decode
    assert text(source) == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert text(target) == "yo<|end|>\n"


def test_padding_cuts_sources_from_the_left_and_targets_from_the_right():
    rows = pad_examples([([1, 2, 3, 4], [5, 6, 7]), ([], [8])], max_len=2, pad_id=0)
    assert rows.sources.tolist() == [[3, 4], [0, 0]]
    assert rows.source_mask.tolist() == [[True, True], [True, False]]
    assert rows.targets.tolist() == [[5, 6], [8, IGNORE_INDEX]]


def _examples(count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        s = int(torch.randint(1, 9, (), generator=generator))
        t = int(torch.randint(1, 6, (), generator=generator))
        out.append(
            (
                torch.randint(1, 256, (s,), generator=generator).tolist(),
                torch.randint(1, 256, (t,), generator=generator).tolist(),
            )
        )
    return out


def test_batched_loss_equals_each_example_alone():
    """Padding in sources and targets changes no example's loss: the batch's mean token loss
    equals the token-weighted mean of each example run alone at its own length."""
    torch.manual_seed(0)
    model = EncoderDecoderLM(tiny()).eval()
    examples = _examples(5)
    stream = Seq2SeqStream(pad_examples(examples, max_len=16))
    (source, targets, mask), *_ = stream.eval_batches(1, 5, 16)
    with torch.no_grad():
        _, batched = model_loss(model, source, targets, mask)
        total, count = 0.0, 0
        for s, t in examples:
            target = torch.tensor([t])
            logits = model(torch.tensor([s]), decoder_tokens=model.shift_right(target)).logits
            total += F.cross_entropy(logits[0], target[0], reduction="sum").item()
            count += len(t)
    torch.testing.assert_close(batched.item(), total / count, rtol=1e-5, atol=1e-6)


def test_stream_batches_are_seeded_and_trimmed():
    stream = Seq2SeqStream(pad_examples(_examples(12), max_len=16))
    a, b = stream.batch(3, 4, 16, seed=7), stream.batch(3, 4, 16, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    source, targets, mask = a
    assert source.shape == mask.shape
    assert mask[:, -1].any() and (targets[:, -1] != IGNORE_INDEX).any()  # no all-padding column
    assert len(stream) == sum(len(t) for _, t in _examples(12))


def test_the_embedded_set_loads_as_source_target_pairs():
    train_stream, val_stream = load_seq2seq(None, ByteTokenizer(), 96, 0.1)
    assert len(train_stream.rows.sources) > 100 and len(val_stream.rows.sources) > 5
    assert train_stream.rows.sources.shape[1] <= 96 and train_stream.rows.targets.shape[1] <= 96


@pytest.fixture
def instruction_file(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"copy {i}", "response": f"{i}"}) + "\n" for i in range(60))
    )
    return data


def _encoder_decoder_run(tmp_path, data, steps: int):
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f"""
steps = {steps}
eval_every = {steps}
eval_batches = 4
out_dir = "{tmp_path / "pre"}"
[data]
path = "{data}"
instruction = true
seq_len = 24
batch_size = 8
[optim]
lr = 0.01
[model]
vocab_size = 256
d_model = 32
n_heads = 4
ffn_hidden = 64
n_encoder_layers = 2
n_decoder_layers = 2
max_seq_len = 32
[model.encoder_moe]
every = 2
[model.encoder_moe.layer]
num_experts = 4
top_k = 1
experts = {{hidden = 64, activation = "relu"}}
"""
    )
    return load_train_config(str(config_file))


def test_an_encoder_decoder_learns_instruction_pairs_in_the_loop(tmp_path, instruction_file):
    config = _encoder_decoder_run(tmp_path, instruction_file, steps=40)
    from moekit.training.finetune import load_streams

    torch.manual_seed(config.seed)  # the loop's initialisation
    train_stream, validation = load_streams(config)
    assert isinstance(train_stream, Seq2SeqStream)
    before = evaluate(config.model.build(), validation, 4, 8, 24)
    result = train(config, progress=False)
    assert result.evals[-1][1] < before - 0.5


def test_finetune_presets_on_seq2seq_pairs_train_only_their_parameters(tmp_path, instruction_file):
    train(_encoder_decoder_run(tmp_path, instruction_file, steps=2), progress=False)
    source = tmp_path / "pre"
    before = dict(from_pretrained(resolve_checkpoint(str(source))).state_dict())
    out = tmp_path / "moe_only"
    args = ["finetune", "--from", str(source), "--instruction", "--data", str(instruction_file)]
    args += ["--preset", "moe", "--steps", "2", "--out-dir", str(out), "--quiet"]
    assert main([*args, "--set", "data.seq_len=24", "--set", "data.batch_size=4"]) == 0
    after = dict(from_pretrained(resolve_checkpoint(str(out))).state_dict())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".ffn." in n and "encoder" in n for n in changed), changed
    assert any("experts" in n for n in changed)
