"""Autoregressive generation: greedy, temperature, top-k and top-p sampling, with a KV cache."""

from __future__ import annotations

import torch

from moekit.models.transformer.model import TransformerLM


def filter_logits(
    logits_BV: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the top-k and outside the smallest top-p nucleus."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep a token if the mass before it is below p (so the nucleus reaches p)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a ``TransformerLM`` (put in eval mode by the caller for deterministic routing).
        prompt: ``(B, S)`` or ``(S,)`` token ids.
        max_new_tokens: how many tokens to add at most (also capped by ``max_seq_len``).
        temperature: 0 for greedy decoding, else logits are divided by it before sampling.
        top_k, top_p: sampling filters.
        stop_token: a sequence that emits it stops; finished sequences are padded with it and
            generation ends when every sequence has stopped.
        use_cache: reuse keys/values (False recomputes the whole prefix each step).
        generator: random generator for sampling.

    Returns:
        ``(B, S + n)`` (or ``(S + n,)``) token ids, ``n <= max_new_tokens``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    squeeze = prompt.dim() == 1
    tokens = prompt.unsqueeze(0) if squeeze else prompt
    if tokens.shape[1] < 1:
        raise ValueError("prompt must hold at least one token")
    steps = min(max_new_tokens, model.config.max_seq_len - tokens.shape[1])
    cache = model.new_kv_cache(tokens.shape[0]) if use_cache else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    next_input = tokens
    for _ in range(steps):
        logits = model(next_input if use_cache else tokens, kv_cache=cache).logits[:, -1].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
        else:
            logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        if stop_token is not None:
            next_token = next_token.masked_fill(finished, stop_token)
            finished |= next_token == stop_token
        tokens = torch.cat([tokens, next_token.unsqueeze(1)], dim=1)
        next_input = next_token.unsqueeze(1)
        if stop_token is not None and finished.all():
            break
    return tokens.squeeze(0) if squeeze else tokens
