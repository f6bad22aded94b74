"""Text data for language-model training: the embedded default corpus, user files, byte tokens.

The default corpus is real text nobody on this project wrote and every Python installation has:
the top-level modules of the Python standard library (found with ``sysconfig``). Documents are
split into train and validation by a hash of their name, so the split is deterministic and does
not depend on file order. Tokens are bytes (vocabulary 256): nothing is downloaded or trained.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.utils.validation import check_fields

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".csv", ".html", ".tex"}


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how batches are cut.

    Args:
        path: a text file, a folder of text files, or a JSON-lines file (one ``{"text": ...}``
            per line); ``None`` uses the Python standard library's modules.
        val_fraction: share of documents held out for validation.
        seq_len: tokens per training sequence.
        batch_size: sequences per micro-batch.
        instruction: the data are instruction examples (``moekit.training.instruct``: JSON
            lines of prompt/response or messages; ``path=None``: the embedded standard-library
            set), rendered with a chat template, packed, and trained on the responses only.
        tokenizer: ``None`` for byte tokens, or a folder holding a Hugging Face tokenizer (a
            model imported from Hugging Face keeps its own vocabulary).
    """

    path: str | None = None
    val_fraction: float = 0.1
    seq_len: int = 128
    batch_size: int = 16
    instruction: bool = False
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("data.seq_len and data.batch_size must be >= 1")
        if self.path is not None and not Path(self.path).exists():
            raise FileNotFoundError(f"data.path {self.path!r} does not exist")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes)."""
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int]) -> str:
        """The text of byte tokens (invalid UTF-8 replaced)."""
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def standard_library_files() -> list[Path]:
    """The top-level ``*.py`` modules of this interpreter's standard library, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1} is not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{i + 1} needs a "text" string field')
        docs.append((f"{path.name}:{i}", record["text"]))
    return docs


def _refuse_binary(file: Path) -> None:
    """Refuse a file that is not text (NUL bytes or mostly invalid UTF-8 in its first 8 KiB):
    training on a checkpoint or an archive by mistake would otherwise run without complaint."""
    with file.open("rb") as f:
        head = f.read(8192)
    invalid = head.decode("utf-8", errors="replace").count("\ufffd")
    if b"\x00" in head or invalid > max(8, len(head) // 20):
        raise ValueError(f"data file {file} looks binary, not text; give text, folders or .jsonl")


def read_documents(path: str | None) -> list[tuple[str, str]]:
    """``(name, text)`` documents from ``path`` (see ``DataConfig.path``)."""
    if path is None:
        files = standard_library_files()
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"data path {path!r} does not exist")
        files = (
            sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if root.is_dir()
            else [root]
        )
    docs: list[tuple[str, str]] = []
    for file in files:
        _refuse_binary(file)
        if file.suffix == ".jsonl":
            docs.extend(_read_jsonl(file))
        else:
            docs.append((str(file.name), file.read_text(encoding="utf-8", errors="replace")))
    docs = [(name, text) for name, text in docs if text]
    if not docs:
        raise ValueError(f"the corpus at {path or 'the standard library'} holds no text")
    return docs


def split_documents(
    docs: list[tuple[str, str]], val_fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic train/validation split by a CRC32 hash of each document's name."""
    if len(docs) == 1:  # one document: hold out its tail
        name, text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        return [(name, text[:cut])], [(name, text[cut:])]
    threshold = int(val_fraction * 10_000)
    val = [d for d in docs if zlib.crc32(d[0].encode()) % 10_000 < threshold]
    train = [d for d in docs if zlib.crc32(d[0].encode()) % 10_000 >= threshold]
    if not val:
        val, train = train[-1:], train[:-1]
    if not train:
        train, val = val[:-1], val[-1:]
    return train, val


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder, with the byte tokenizer's interface."""

    def __init__(self, folder: str) -> None:
        try:
            from transformers import AutoTokenizer  # noqa: PLC0415 (optional: transformers)
        except ImportError:
            raise ValueError(
                "data.tokenizer needs transformers: pip install 'moekit[hf]'"
            ) from None
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"data.tokenizer {folder!r} is not a folder")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.vocab_size = len(self.tokenizer)
        self.chat_template = getattr(self.tokenizer, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = True):
        return self.tokenizer.apply_chat_template(messages, tokenize=tokenize)


def load_tokenizer(folder: str | None) -> ByteTokenizer | HFTokenizer:
    """Bytes for ``None``, else the Hugging Face tokenizer in ``folder``."""
    return ByteTokenizer() if folder is None else HFTokenizer(folder)


class TokenStream:
    """All documents' tokens concatenated (documents separated by a newline): ``uint8`` bytes,
    or ``int32`` ids of a larger vocabulary."""

    def __init__(self, docs: list[tuple[str, str]], tokenizer: ByteTokenizer | HFTokenizer) -> None:
        text = "\n".join(text for _, text in docs)
        if isinstance(tokenizer, ByteTokenizer):
            self.tokens = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        else:
            self.tokens = torch.tensor(tokenizer.encode(text), dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(
        self, index: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch number ``index``: random windows drawn from a generator seeded by
        ``(seed, index)``, so the data position is just the index (exact resume)."""
        self._check(seq_len)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - seq_len, (batch_size,), generator=generator)
        return self._windows(starts, seq_len)

    def eval_batches(self, count: int, batch_size: int, seq_len: int):
        """``count`` fixed batches of windows spread evenly over the stream."""
        self._check(seq_len)
        total = count * batch_size
        starts = torch.linspace(0, len(self.tokens) - seq_len - 1, total).long()
        for i in range(count):
            yield self._windows(starts[i * batch_size : (i + 1) * batch_size], seq_len)

    def _windows(self, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = starts.unsqueeze(1) + torch.arange(seq_len + 1)
        chunk = self.tokens[offsets].long()
        return chunk[:, :-1], chunk[:, 1:]

    def _check(self, seq_len: int) -> None:
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(
                f"the text holds {len(self.tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}"
            )


def load_corpus(config: DataConfig) -> tuple[TokenStream, TokenStream]:
    """Train and validation token streams for ``config`` (plain text)."""
    tokenizer = load_tokenizer(config.tokenizer)
    train_docs, val_docs = split_documents(read_documents(config.path), config.val_fraction)
    train, val = TokenStream(train_docs, tokenizer), TokenStream(val_docs, tokenizer)
    for name, stream in (("training", train), ("validation", val)):
        if len(stream) <= config.seq_len + 1:
            raise ValueError(
                f"the {name} split holds {len(stream)} tokens, fewer than seq_len + 2 = "
                f"{config.seq_len + 2}; give more text or a shorter data.seq_len"
            )
    return train, val


def calibration_batches(
    path: str | None,
    tokenizer: ByteTokenizer | HFTokenizer,
    count: int,
    batch_size: int,
    seq_len: int,
) -> list[torch.Tensor]:
    """``count`` fixed ``(batch_size, seq_len)`` batches of token ids spread over the text at
    ``path`` (``None``: the embedded corpus's validation split, which training holds out)."""
    docs = read_documents(path)
    if path is None:
        docs = split_documents(docs, DataConfig().val_fraction)[1]
    stream = TokenStream(docs, tokenizer)
    return [x for x, _ in stream.eval_batches(count, batch_size, seq_len)]
