"""The training objective and its evaluation: next-token cross-entropy of a decoder or an
encoder–decoder window, the validation loss, and the per-layer MoE record of a step."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.analysis.inspect import load_summary
from moekit.layers.switches import serving
from moekit.training.instruct import IGNORE_INDEX
from moekit.training.seq2seq import is_seq2seq_batch


def to_device(batch: tuple, device: torch.device) -> tuple:
    """``(x, y, segment_ids or None)`` on ``device`` from a 2- or 3-tuple batch."""
    x, y, *rest = batch
    segments = rest[0] if rest else None
    if device.type == "cuda":  # pinned host memory: the copies are truly asynchronous
        x, y = x.pin_memory(), y.pin_memory()
        segments = None if segments is None else segments.pin_memory()
    segments = None if segments is None else segments.to(device, non_blocking=True)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), segments


def _token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the targets that are not ``IGNORE_INDEX`` (a batch with
    none gives 0, not NaN)."""
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if reduction == "sum":
        return total
    return total / (y != IGNORE_INDEX).sum().clamp(min=1)


def model_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None
) -> tuple[Any, torch.Tensor]:
    """``(output, mean cross-entropy)`` of one batch: next-token prediction for a decoder-only
    model; for an encoder–decoder, either T5's prefix-LM split of a text window
    (``EncoderDecoderLM.split_window``) or, when the third element is a bool source mask, an
    instruction example read as source and targets (``moekit.training.seq2seq``)."""
    source, decoder_tokens, targets, mask = encoder_decoder_inputs(model, x, y, segments)
    if source is None:
        out = model(x) if segments is None else model(x, segment_ids=segments)
        return out, _token_loss(out.logits, y)
    out = model(source, decoder_tokens=decoder_tokens, attention_mask=mask)
    return out, _token_loss(out.logits, targets)


def encoder_decoder_inputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, third: torch.Tensor | None
) -> tuple[Any, Any, torch.Tensor, Any]:
    """``(encoder tokens, decoder tokens, targets, source mask)`` of a batch for an
    encoder–decoder; ``(None, None, y, None)`` for a decoder-only model."""
    split = getattr(model, "split_window", None)
    if split is None:
        return None, None, y, None
    if is_seq2seq_batch(third):
        return x, model.shift_right(y), y, third  # type: ignore[operator]
    if third is not None:
        raise ValueError(
            "packed instruction data (segment ids) trains decoder-only models; an encoder–decoder "
            "reads plain text windows or source/target examples (moekit.training.seq2seq)"
        )
    source, decoder_tokens, targets = split(x, y)
    return source, decoder_tokens, targets, None


def evaluate(model: nn.Module, stream: Any, batches: int, batch_size: int, seq_len: int) -> float:
    """Mean next-token cross-entropy (nats) over fixed validation windows (over the response
    tokens only for instruction data)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    # no autograd graph, and no auxiliary losses or routing statistics: nothing reads them
    with torch.no_grad(), serving(model):
        for batch in stream.eval_batches(batches, batch_size, seq_len):
            x, y, segments = to_device(batch, device)
            _, loss = model_loss(model, x, y, segments)
            targets = encoder_decoder_inputs(model, x, y, segments)[2]
            n = int((targets != IGNORE_INDEX).sum())
            total += loss.item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def moe_record(outputs) -> list[dict[str, Any]]:
    records = []
    for o in outputs:
        record: dict[str, Any] = {
            "losses": {k: round(float(v.detach()), 6) for k, v in o.losses.items()}
        }
        if o.stats is not None:  # statistics may be off (MoEConfig.statistics)
            record["tokens_per_expert"] = o.stats.tokens_per_expert.tolist()
            record["load"] = load_summary(o.stats.tokens_per_expert)  # x ideal; dead experts
            record["dropped_fraction"] = round(float(o.stats.dropped_fraction), 6)
            record["router_entropy"] = round(float(o.stats.router_entropy), 6)
        records.append(record)
    return records
