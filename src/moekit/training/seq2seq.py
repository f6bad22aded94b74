"""Instruction data for an encoder–decoder: the prompt goes in, the response comes out.

A decoder-only model reads an instruction example as one packed row and trains on the response
tokens (:mod:`moekit.training.instruct`). An encoder–decoder (T5, the Switch Transformer,
ST-MoE) reads it as T5 and Flan-T5 do: the encoder reads the prompt, and the decoder predicts
the response from the start token (Raffel et al. 2020; Chung et al. 2022). Examples are rendered
with the same template as for a decoder; the source is everything before the last assistant
turn's first trained token, the target is that turn's trained tokens (its end marker included).

A batch is ``(source (B, S), targets (B, T), source_mask (B, S))``: sources padded on the right
with ``pad_id`` and masked (``True`` for real tokens), targets padded with ``IGNORE_INDEX``.
:func:`moekit.training.objective.model_loss` tells it from a packed decoder batch by the third
element's dtype (a bool mask, not integer segment ids).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moekit.training.instruct import (
    IGNORE_INDEX,
    read_instructions,
    render,
    split_by_source,
    standard_library_instructions,
)

Seq2SeqBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def split_example(tokens: Sequence[int], trained: Sequence[bool]) -> tuple[list[int], list[int]]:
    """``(source, target)`` of a rendered example: the target is the last run of trained
    tokens, the source everything before it.

    Example: tokens ``[u, u, a, a, e]`` with trained ``[F, F, T, T, T]`` give source
    ``[u, u]`` and target ``[a, a, e]``."""
    if len(tokens) != len(trained):
        raise ValueError(f"tokens ({len(tokens)}) and trained ({len(trained)}) differ in length")
    end = max((i + 1 for i, t in enumerate(trained) if t), default=0)
    if end == 0:
        raise ValueError("the example has no trained (assistant) tokens")
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return list(tokens[:start]), list(tokens[start:end])


@dataclass
class Seq2SeqRows:
    """Every example padded to the longest: sources ``(N, S)`` with their mask, targets
    ``(N, T)`` (``IGNORE_INDEX`` past each target's end)."""

    sources: torch.Tensor
    source_mask: torch.Tensor
    targets: torch.Tensor


def pad_examples(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, pad_id: int = 0
) -> Seq2SeqRows:
    """Pad ``(source, target)`` pairs, each cut to ``max_len`` tokens (a source keeps its
    last ``max_len`` tokens, where the question usually ends; a target its first); an empty
    source keeps one pad token, masked, so that every row has a position to attend to."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not examples:
        raise ValueError("no examples to pad")
    cut = [(list(s)[-max_len:], list(t)[:max_len]) for s, t in examples]
    width_s = max(1, max(len(s) for s, _ in cut))
    width_t = max(len(t) for _, t in cut)
    sources = torch.full((len(cut), width_s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width_s), dtype=torch.bool)
    targets = torch.full((len(cut), width_t), IGNORE_INDEX, dtype=torch.long)
    for i, (s, t) in enumerate(cut):
        if s:
            sources[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        else:
            mask[i, 0] = True  # nothing to read: one pad token stands in
        targets[i, : len(t)] = torch.tensor(t)
    return Seq2SeqRows(sources, mask, targets)


class Seq2SeqStream:
    """Batches ``(source, targets, source_mask)`` of instruction examples for an
    encoder–decoder, with the same ``batch`` / ``eval_batches`` interface as the other
    streams. Each batch is trimmed to its own longest source and target."""

    def __init__(self, rows: Seq2SeqRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        """Trained target tokens."""
        return int((self.rows.targets != IGNORE_INDEX).sum())

    def _batch(self, index: torch.Tensor) -> Seq2SeqBatch:
        sources, mask = self.rows.sources[index], self.rows.source_mask[index]
        targets = self.rows.targets[index]
        width_s = int(mask.any(dim=0).nonzero().max()) + 1
        width_t = int((targets != IGNORE_INDEX).any(dim=0).nonzero().max()) + 1
        return sources[:, :width_s], targets[:, :width_t], mask[:, :width_s]

    def batch(self, index: int, batch_size: int, seq_len: int, seed: int) -> Seq2SeqBatch:
        """Micro-batch ``index``: examples drawn by a generator seeded by ``(seed, index)``
        (``seq_len`` was applied when the rows were padded)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        rows = torch.randint(0, len(self.rows.sources), (batch_size,), generator=generator)
        return self._batch(rows)

    def eval_batches(self, count: int, batch_size: int, seq_len: int) -> Iterator[Seq2SeqBatch]:
        """Every example once (at most ``count`` batches), in order."""
        total = len(self.rows.sources)
        for start in range(0, min(total, count * batch_size), batch_size):
            yield self._batch(torch.arange(start, min(start + batch_size, total)))


def load_seq2seq(
    path: str | None, tokenizer: Any, seq_len: int, val_fraction: float
) -> tuple[Seq2SeqStream, Seq2SeqStream]:
    """Train and validation streams from an instruction file (``None``: the embedded
    standard-library set), rendered for ``tokenizer``; sources and targets are each cut to
    ``seq_len`` tokens."""
    examples = standard_library_instructions() if path is None else read_instructions(path)
    train, val = split_by_source(examples, val_fraction)
    streams = []
    for part in (train, val):
        pairs = [split_example(*render(messages, tokenizer)) for _, messages in part]
        streams.append(Seq2SeqStream(pad_examples(pairs, seq_len)))
    return streams[0], streams[1]


def is_seq2seq_batch(third: torch.Tensor | None) -> bool:
    """Whether a batch's third element is an encoder–decoder batch's source mask (bool), not
    a packed decoder batch's segment ids (integers)."""
    return third is not None and third.dtype == torch.bool
