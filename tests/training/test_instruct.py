"""Instruction data: templates, responses-only targets, packing, the embedded set, bad files."""

import json

import pytest
import torch

from moekit.training.data import ByteTokenizer
from moekit.training.instruct import (
    IGNORE_INDEX,
    InstructionStream,
    pack,
    read_instructions,
    render,
    split_by_source,
    standard_library_instructions,
)


def test_only_response_tokens_are_targets():
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    tokens, trained = render(messages, tok)
    text = tok.decode(tokens)
    assert text == "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
    trained_text = tok.decode([t for t, m in zip(tokens, trained, strict=True) if m])
    assert trained_text == "4<|end|>\n"
    rows = pack([(tokens, trained)], seq_len=len(tokens) + 3)
    _, y, seg = InstructionStream(rows)._batch(torch.tensor([0]))
    targets = [int(t) for t in y[0] if t != IGNORE_INDEX]
    assert tok.decode(targets) == "4<|end|>\n"
    assert seg[0, : len(tokens)].eq(1).all() and seg[0, len(tokens) :].eq(0).all()


def test_packing_keeps_examples_apart():
    a = ([1, 2, 3], [False, True, True])
    b = ([4, 5], [False, True])
    rows = pack([a, b], seq_len=5)  # width 6: both fit in one row
    assert rows.tokens.shape == (1, 6)
    _, y, seg = InstructionStream(rows)._batch(torch.tensor([0]))
    assert seg.tolist() == [[1, 1, 1, 2, 2]] or seg.tolist() == [[1, 1, 2, 2, 2]]
    # no target crosses from one example into the next
    for i in range(5):
        if seg[0, i] != rows.segments[0, i + 1]:
            assert y[0, i] == IGNORE_INDEX


def test_jsonl_formats_and_bad_files(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"prompt": "p", "response": "r"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
        )
        + "\n"
    )
    assert len(read_instructions(good)) == 2
    for record, message in [
        ({"prompt": "p"}, 'needs "prompt" and "response"'),
        ({"messages": [{"role": "user", "content": "u"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "u"}]}, "role in"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=message):
            read_instructions(bad)


def test_the_embedded_set_is_real_stdlib_functions_split_by_file():
    examples = standard_library_instructions()
    assert len(examples) > 200
    name, messages = examples[0]
    source, function = name.split(":")
    assert source.endswith(".py")
    assert messages[0]["content"].startswith(f"Complete this function:\ndef {function}(")
    assert '"""' in messages[0]["content"] or "'''" in messages[0]["content"]  # the docstring
    assert messages[1]["content"].strip() and '"""' not in messages[1]["content"][:10]
    train, val = split_by_source(examples, 0.1)
    train_files = {n.split(":")[0] for n, _ in train}
    assert train_files.isdisjoint({n.split(":")[0] for n, _ in val})
