"""Instruction data: chat examples rendered with a template, loss on the responses only, packed.

Files are JSON lines, one example per line, either ``{"prompt": ..., "response": ...}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``, with an
optional ``"source"`` (``"file:anything"``): train and validation are split by the part before
``:``. Byte-level models use :data:`BYTE_CHAT_TEMPLATE`; a Hugging Face tokenizer with a chat
template uses its own (``apply_chat_template``). Only the assistant turns (and their end
marker) are trained on.

The embedded default set is real text that ships with Python: for every documented top-level
function of the standard library's modules, the instruction is its signature and docstring and
the response is its body. Examples are split into train and validation by source file, as the
default corpus is.

Examples are packed greedily into rows of ``seq_len + 1`` tokens; each example keeps its own
segment id, so with ``TransformerLM(tokens, segment_ids=...)`` no token attends across examples
and positions restart in each example.
"""

from __future__ import annotations

import ast
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from moekit.training.data import standard_library_files

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
#: the byte-level chat template: a header line per turn, an end marker after each turn
BYTE_CHAT_TEMPLATE = {"header": "<|{role}|>\n", "end": "<|end|>\n"}

Messages = list[dict[str, str]]


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


def _messages_of(record: Any, where: str) -> Messages:
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f'{where}: "messages" must be a non-empty list')
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ValueError(f"{where}: every message needs a role in {ROLES}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f'{where}: every message needs a "content" string')
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant message, so nothing to train on")
        return messages
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(
            f'{where} needs "prompt" and "response" strings, or a "messages" list of '
            '{"role", "content"}'
        )
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def read_instructions(path: str | Path) -> list[tuple[str, Messages]]:
    """``(name, messages)`` examples from a JSON-lines file (or every ``*.jsonl`` in a folder)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"instruction data {str(path)!r} does not exist")
    files = sorted(root.rglob("*.jsonl")) if root.is_dir() else [root]
    examples = []
    for file in files:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{i + 1} is not valid JSON: {e}") from None
            messages = _messages_of(record, f"{file}:{i + 1}")
            # an optional "source" ("file.py:function") splits train/validation by source file
            source = record.get("source")
            examples.append((source if isinstance(source, str) else f"{file.name}:{i}", messages))
    if not examples:
        raise ValueError(f"no instruction examples in {path}")
    return examples


@dataclass
class DocumentedFunction:
    """A documented top-level function of a Python file, cut into its parts."""

    name: str
    header: str  # the ``def`` line(s) and the docstring, as written
    body: str  # the code after the docstring
    docstring: str  # the docstring's text
    code: str  # the whole function without its docstring


def documented_functions(path: Path) -> Iterator[DocumentedFunction]:
    """Every top-level function of ``path`` with a docstring and at least one statement after
    it (none for a file that does not parse)."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    lines = source.splitlines()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or len(node.body) < 2:
            continue
        docstring = ast.get_docstring(node)
        doc_node, first_statement = node.body[0], node.body[1]
        if docstring is None or doc_node.end_lineno is None or node.end_lineno is None:
            continue
        yield DocumentedFunction(
            name=node.name,
            header="\n".join(lines[node.lineno - 1 : doc_node.end_lineno]),
            body="\n".join(lines[doc_node.end_lineno : node.end_lineno]),
            docstring=docstring,
            code="\n".join(
                lines[node.lineno - 1 : doc_node.lineno - 1]
                + lines[first_statement.lineno - 1 : node.end_lineno]
            ),
        )


def standard_library_instructions(max_chars: int = 2000) -> list[tuple[str, Messages]]:
    """The embedded set: each documented top-level function of the standard library's modules,
    instruction = ``def`` line and docstring, response = the body after the docstring.
    Examples are named ``<file>:<function>`` (split by file); longer ones are left out."""
    examples = []
    for path in standard_library_files():
        for function in documented_functions(path):
            prompt, response = function.header, function.body
            if not response.strip() or len(prompt) + len(response) > max_chars:
                continue
            examples.append(
                (
                    f"{path.name}:{function.name}",
                    [
                        {"role": "user", "content": f"Complete this function:\n{prompt}"},
                        {"role": "assistant", "content": response + "\n"},
                    ],
                )
            )
    return examples


def split_by_source(
    examples: list[tuple[str, Messages]], val_fraction: float
) -> tuple[list[tuple[str, Messages]], list[tuple[str, Messages]]]:
    """Train/validation by a CRC32 hash of each example's source (the name before ``:``)."""
    threshold = int(val_fraction * 10_000)

    def is_val(name: str) -> bool:
        return zlib.crc32(name.split(":")[0].encode()) % 10_000 < threshold

    val = [e for e in examples if is_val(e[0])]
    train = [e for e in examples if not is_val(e[0])]
    if not val or not train:  # too few sources to split by source: split by example
        cut = max(1, int(len(examples) * (1 - val_fraction)))
        train, val = examples[:cut], examples[cut:] or examples[-1:]
    return train, val


def render(messages: Messages, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Tokens and a per-token "train on this" mask (the assistant turns and their end marker).

    A tokenizer with a ``chat_template`` (Hugging Face) renders with it, turn by turn, and the
    trained tokens are what each assistant turn adds; otherwise :data:`BYTE_CHAT_TEMPLATE`."""
    if getattr(tokenizer, "chat_template", None):
        tokens: list[int] = []
        trained: list[bool] = []
        for i in range(len(messages)):
            prefix = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True)
            if hasattr(prefix, "input_ids"):
                prefix = prefix["input_ids"]
            prefix = list(prefix)
            if prefix[: len(tokens)] != tokens:
                raise ValueError("the tokenizer's chat template does not render turn by turn")
            added = prefix[len(tokens) :]
            trained += [messages[i]["role"] == "assistant"] * len(added)
            tokens = prefix
        return tokens, trained
    tokens, trained = [], []
    for message in messages:
        header = tokenizer.encode(BYTE_CHAT_TEMPLATE["header"].format(role=message["role"]))
        body = tokenizer.encode(message["content"] + BYTE_CHAT_TEMPLATE["end"])
        is_answer = message["role"] == "assistant"
        tokens += header + body
        trained += [False] * len(header) + [is_answer] * len(body)
    return tokens, trained


@dataclass
class PackedRows:
    """``(R, seq_len + 1)`` tokens, targets-to-train mask and segment ids (0: padding)."""

    tokens: torch.Tensor
    trained: torch.Tensor
    segments: torch.Tensor


def pack(
    examples: list[tuple[list[int], list[bool]]], seq_len: int, seed: int = 0, pad_id: int = 0
) -> PackedRows:
    """Greedy first-fit packing (in a seeded order) into rows of ``seq_len + 1`` tokens; an
    example longer than a row is cut to fit, and one whose response would be cut off entirely
    is left out (it has nothing left to train on)."""
    width = seq_len + 1
    kept = [e for e in examples if any(e[1][1:width])]
    if not kept:
        raise ValueError(
            f"no example's response starts within data.seq_len + 1 = {width} tokens; raise "
            "data.seq_len"
        )
    examples = kept
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[tuple[list[int], list[bool]]]] = []
    space: list[int] = []
    for i in order:
        tokens, trained = examples[i]
        tokens, trained = tokens[:width], trained[:width]
        slot = next((r for r, free in enumerate(space) if free >= len(tokens)), None)
        if slot is None:
            rows.append([])
            space.append(width)
            slot = len(rows) - 1
        rows[slot].append((tokens, trained))
        space[slot] -= len(tokens)
    tok = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    seg = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, (tokens, trained) in enumerate(row, start=1):
            tok[r, at : at + len(tokens)] = torch.tensor(tokens)
            mask[r, at : at + len(tokens)] = torch.tensor(trained)
            seg[r, at : at + len(tokens)] = s
            at += len(tokens)
    return PackedRows(tok, mask, seg)


class InstructionStream:
    """Batches of packed instruction rows: ``(x, y, segment_ids)`` with ``y = IGNORE_INDEX``
    wherever the next token is not part of a response (prompts, headers, padding, and across
    an example boundary)."""

    def __init__(self, rows: PackedRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.trained.sum())

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, trained = self.rows.tokens[index], self.rows.trained[index]
        segments = self.rows.segments[index]
        x, seg = tokens[:, :-1], segments[:, :-1]
        same_example = segments[:, 1:] == seg
        y = torch.where(trained[:, 1:] & same_example, tokens[:, 1:], IGNORE_INDEX)
        return x, y, seg

    def batch(
        self, index: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Micro-batch ``index``: rows drawn by a generator seeded by ``(seed, index)``."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        rows = torch.randint(0, len(self.rows.tokens), (batch_size,), generator=generator)
        return self._batch(rows)

    def eval_batches(self, count: int, batch_size: int, seq_len: int):
        """Every row once (at most ``count`` batches), in order."""
        total = len(self.rows.tokens)
        for start in range(0, min(total, count * batch_size), batch_size):
            yield self._batch(torch.arange(start, min(start + batch_size, total)))


def load_instructions(
    path: str | None, tokenizer: Any, seq_len: int, val_fraction: float, seed: int
) -> tuple[InstructionStream, InstructionStream]:
    """Train and validation streams from ``path`` (``None``: the embedded standard-library
    set), rendered for ``tokenizer`` and packed into rows of ``seq_len + 1``."""
    examples = standard_library_instructions() if path is None else read_instructions(path)
    train, val = split_by_source(examples, val_fraction)
    streams = []
    for part in (train, val):
        rendered = [render(messages, tokenizer) for _, messages in part]
        streams.append(InstructionStream(pack(rendered, seq_len, seed)))
    return streams[0], streams[1]
