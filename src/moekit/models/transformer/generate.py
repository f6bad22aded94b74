"""Autoregressive generation: greedy, temperature, top-k and top-p sampling, with a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moekit.layers import serving
from moekit.models.common.attention import KVCache
from moekit.models.common.sampling import filter_logits, sample_tokens
from moekit.models.transformer.model import TransformerLM


def left_pad(
    prompts: list[torch.Tensor] | list[list[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded ``(B, S)`` batch and its bool mask."""
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    S = max(len(r) for r in rows)
    tokens = torch.full((len(rows), S), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros(len(rows), S, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        tokens[i, S - len(row) :] = row
        mask[i, S - len(row) :] = True
    return tokens, mask


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt: torch.Tensor | list[torch.Tensor] | list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    compile_step: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Extend ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a ``TransformerLM`` (put in eval mode by the caller for deterministic routing).
        prompt: ``(B, S)`` or ``(S,)`` token ids, or a list of prompts of different lengths
            (left-padded into one batch; the result is then a list, one row per prompt without
            its padding).
        max_new_tokens: how many tokens to add at most (also capped by ``max_seq_len``).
        temperature: 0 for greedy decoding, else logits are divided by it before sampling.
        top_k, top_p: sampling filters.
        stop_token: a sequence that emits it stops; finished sequences are padded with it and
            generation ends when every sequence has stopped.
        use_cache: reuse keys/values (False recomputes the whole prefix each step).
        generator: random generator for sampling (best on the model's device).
        attention_mask: ``(B, S)`` bool, ``True`` for real prompt tokens (left padding).
        compile_step: decode with a fixed-shape cache and the step compiled once
            (:func:`decode_step`: ``torch.compile``, CUDA graphs on CUDA).

    Returns:
        ``(B, S + n)`` (or ``(S + n,)``) token ids, ``n <= max_new_tokens``; a list for a list.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    as_list = isinstance(prompt, list | tuple)
    if as_list:
        if attention_mask is not None:
            raise ValueError("pass either a list of prompts or an attention_mask, not both")
        prompt, attention_mask = left_pad(list(prompt))
    assert isinstance(prompt, torch.Tensor)
    device = model.embed.weight.device  # list prompts are built on the CPU: move them
    prompt = prompt.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    squeeze = prompt.dim() == 1
    tokens = prompt.unsqueeze(0) if squeeze else prompt
    if tokens.shape[1] < 1:
        raise ValueError("prompt must hold at least one token")
    mask = None if attention_mask is None else attention_mask.reshape(tokens.shape).bool()
    pad_width = tokens.shape[1] - (
        mask.sum(dim=1)
        if mask is not None
        else torch.full((len(tokens),), tokens.shape[1], device=tokens.device)
    )
    steps = min(max_new_tokens, model.config.max_seq_len - tokens.shape[1])
    cache = model.new_kv_cache(tokens.shape[0], fixed_shapes=compile_step) if use_cache else None
    step = None if cache is None or not compile_step else decode_step(model, cache, compile=True)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    next_input, next_mask = tokens, mask
    with serving(model):  # no auxiliary losses or statistics while generating
        for i in range(steps):
            if step is not None and i > 0:  # after the prompt: the compiled fixed-shape step
                logits = step(next_input)
            elif use_cache:
                logits = model(next_input, attention_mask=next_mask, kv_cache=cache).logits
            else:
                logits = model(tokens, attention_mask=mask).logits
            logits = logits[:, -1].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1)
            else:
                logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
                next_token = sample_tokens(logits.softmax(-1), generator)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            tokens = torch.cat([tokens, next_token.unsqueeze(1)], dim=1)
            next_input = next_token.unsqueeze(1)
            if mask is not None and step is None:
                next_mask = torch.ones_like(next_input, dtype=torch.bool)
                mask = torch.cat([mask, next_mask], dim=1)
            if stop_token is not None and finished.all():
                break
    if as_list:
        return [row[int(pad) :] for row, pad in zip(tokens, pad_width, strict=True)]
    return tokens.squeeze(0) if squeeze else tokens


def decode_step(
    model: TransformerLM,
    cache: KVCache,
    *,
    compile: bool = False,
    backend: Any = None,
    fullgraph: bool | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One decoding step ``tokens (B, 1) -> logits (B, 1, V)`` on a fixed-shape ``cache``
    (``model.new_kv_cache(..., fixed_shapes=True)``): every step has the same shapes, keeps
    positions and lengths on the device and reads nothing on the host, so ``compile=True``
    compiles it once (``torch.compile``; on CUDA ``fullgraph`` and mode ``reduce-overhead``: a
    CUDA graph replayed each step; on the CPU the direct expert path stays eager, a graph
    break, ``moekit.dispatch.direct``). The caller stops before ``cache.max_len``
    positions."""
    if cache.slot is None:
        raise ValueError(
            "decode_step needs a fixed-shape cache: new_kv_cache(..., fixed_shapes=True)"
        )

    def step(tokens_B1: torch.Tensor) -> torch.Tensor:
        return model(tokens_B1, kv_cache=cache).logits

    if not compile:
        return step
    cuda = model.embed.weight.device.type == "cuda"
    options: dict = {"fullgraph": fullgraph if fullgraph is not None else cuda, "dynamic": False}
    if backend is not None:
        options["backend"] = backend
    elif cuda:
        options["mode"] = "reduce-overhead"
    return torch.compile(step, **options)
