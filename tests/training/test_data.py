import json

import pytest
import torch

from moekit.training.data import (
    ByteTokenizer,
    DataConfig,
    TokenStream,
    load_corpus,
    read_documents,
    split_documents,
    standard_library_files,
)


def test_default_corpus_is_the_standard_library_and_split_is_deterministic():
    files = standard_library_files()
    assert len(files) > 50 and all(f.suffix == ".py" for f in files)
    docs = read_documents(None)
    train_a, val_a = split_documents(docs, 0.1)
    _, val_b = split_documents(list(reversed(docs)), 0.1)
    assert sorted(n for n, _ in val_a) == sorted(n for n, _ in val_b)  # order-independent
    assert 0.03 < len(val_a) / len(docs) < 0.2
    assert not {n for n, _ in train_a} & {n for n, _ in val_a}


def test_jsonl_folder_and_single_file(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(10)))
    assert len(read_documents(str(jsonl))) == 10
    (tmp_path / "a.txt").write_text("hello " * 100)
    assert len(read_documents(str(tmp_path))) == 11
    train, val = load_corpus(DataConfig(path=str(tmp_path / "a.txt"), seq_len=16))
    assert len(train) > len(val) > 17
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match='needs a "text" string field'):
        read_documents(str(bad))


def test_batches_are_a_pure_function_of_index():
    stream = TokenStream([("a", "abcdefghij" * 50)], ByteTokenizer())
    x1, y1 = stream.batch(7, 3, 16, seed=1)
    x2, _ = stream.batch(7, 3, 16, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    assert not torch.equal(stream.batch(8, 3, 16, seed=1)[0], x1)


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DataConfig(path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(DataConfig(path=str(tmp_path / "empty")))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_corpus(DataConfig(path=str(tmp_path / "short.txt"), seq_len=64))
