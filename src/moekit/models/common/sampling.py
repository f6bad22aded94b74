"""Drawing the next token: top-k / top-p filtering of the logits and sampling from a generator
on any device (every model's generation uses these)."""

from __future__ import annotations

import torch


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


def sample_tokens(probs_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row; drawn on the generator's device when it differs from the model's
    (a CPU generator with a CUDA model: correct, at the cost of a copy per token)."""
    if generator is None or generator.device == probs_BV.device:
        return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)
    drawn = torch.multinomial(probs_BV.to(generator.device), 1, generator=generator)
    return drawn.squeeze(1).to(probs_BV.device)
