"""What the routers of a model do on some data: load, dead experts, entropy, margins, drops,
co-activation, agreement between layers, and which tokens each expert takes.

Legend: T = tokens of a batch, E = experts, K = experts per token, V = vocabulary.

:class:`RoutingInspector` takes the ``RoutingResult`` of every router call (``observe``) with
the token ids of the batch, and keeps running sums only (counts, histograms, contingency
tables), so it streams over any amount of data. ``report()`` turns them into plain numbers:

- load: tokens routed to each expert as a fraction of the ideal ``T·K/E`` (min, p5, p50, p95,
  max: a mean hides one hot expert), and dead experts (below ``dead_fraction`` of the ideal);
- router entropy (nats, mean over tokens) and the margin between the k-th and (k+1)-th router
  probability (quantiles; small margins mean fragile routing that a dtype or batch change flips);
- the fraction of assignments a capacity factor would drop (per call, ``C = ceil(f·T·K/E)``);
- the co-activation matrix of experts chosen together by a token;
- agreement of consecutive layers: the normalised mutual information of their top-1 experts;
- specialisation: the mutual information between token id and top-1 expert, and per expert the
  tokens it receives most often relative to their base rate (lift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from moekit.analysis.hot_set import HotSetTracker
from moekit.layers import MoE
from moekit.layers.switches import moe_layers, moe_routers, record_routing
from moekit.routing.result import RoutingResult

QUANTILES = (0.0, 0.05, 0.5, 0.95, 1.0)
MARGIN_BINS = 50  # histogram of the k-th minus (k+1)-th probability over [0, 1]


@dataclass
class _LayerSums:
    num_experts: int
    top_k: int
    vocab_size: int
    counts_E: torch.Tensor
    coactivation_EE: torch.Tensor
    token_expert_VE: torch.Tensor
    margin_hist: torch.Tensor
    tokens: int = 0
    assignments: int = 0
    entropy_sum: float = 0.0
    dropped: float = 0.0
    top1: list[torch.Tensor] = field(default_factory=list)  # this pass's top-1 per call


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    names = ("min", "p5", "p50", "p95", "max")
    q = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {n: round(float(v), 6) for n, v in zip(names, q, strict=True)}


def load_summary(counts_E: torch.Tensor, dead_fraction: float = 0.01) -> dict[str, float]:
    """Tokens per expert as a fraction of the ideal (equal share): min, p5, p50, p95, max, and
    ``dead``, the experts below ``dead_fraction`` of it."""
    counts = counts_E.detach().double().cpu()
    ideal = float(counts.sum()) / len(counts) if float(counts.sum()) > 0 else 1.0
    load = counts / ideal
    return {**_quantiles(load), "dead": int((load < dead_fraction).sum())}


def _hist_quantiles(hist: torch.Tensor) -> dict[str, float]:
    cdf = hist.double().cumsum(0) / max(float(hist.sum()), 1.0)
    names = ("p5", "p50", "p95")
    return {
        n: round(
            float(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64))) / MARGIN_BINS, 4
        )
        for n, q in zip(names, (0.05, 0.5, 0.95), strict=True)
    }


BYTE_CLASSES = ("lowercase", "uppercase", "digit", "space", "newline", "punctuation", "non-ASCII")


def byte_class(byte: int) -> str:
    """The class of a byte token, for byte-level models' specialisation."""
    c = chr(byte)
    if byte >= 128:
        return "non-ASCII"
    if c == "\n":
        return "newline"
    if c.isspace():
        return "space"
    if c.islower():
        return "lowercase"
    if c.isupper():
        return "uppercase"
    if c.isdigit():
        return "digit"
    return "punctuation"


def _class_lifts(token_expert_VE: torch.Tensor) -> list[dict[str, float]]:
    """Per expert, each byte class's share of its tokens over the class's base rate."""
    index = torch.tensor([BYTE_CLASSES.index(byte_class(b)) for b in range(256)])
    by_class = torch.zeros(len(BYTE_CLASSES), token_expert_VE.shape[1], dtype=torch.float64)
    by_class.index_add_(0, index, token_expert_VE[:256].double())
    base = by_class.sum(1) / max(float(by_class.sum()), 1.0)
    share = by_class / by_class.sum(0, keepdim=True).clamp(min=1.0)
    lift = share / base.unsqueeze(1).clamp(min=1e-12)
    return [
        {name: round(float(lift[c, e]), 3) for c, name in enumerate(BYTE_CLASSES) if base[c] > 0}
        for e in range(token_expert_VE.shape[1])
    ]


def mutual_information(joint: torch.Tensor) -> float:
    """Mutual information (nats) of a contingency table of counts."""
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint.double() / total
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / outer[nz]).log()).sum())


def _entropy(counts: torch.Tensor) -> float:
    p = counts.double() / max(float(counts.sum()), 1.0)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


class RoutingInspector:
    """Streaming routing statistics of one model (see the module docstring).

    Args:
        layer_names: the routers' names, in model order.
        num_experts: E per layer.
        top_k: K per layer (as the routers return it).
        vocab_size: V (token ids of the observed batches must be below it).
        capacity_factor: for the drop fraction.
        dead_fraction: an expert below this share of the ideal load counts as dead.
    """

    def __init__(
        self,
        layer_names: list[str],
        num_experts: list[int],
        top_k: list[int],
        vocab_size: int,
        *,
        capacity_factor: float = 1.25,
        dead_fraction: float = 0.01,
    ) -> None:
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.names = layer_names
        self.capacity_factor = capacity_factor
        self.dead_fraction = dead_fraction
        self.layers = [
            _LayerSums(
                num_experts=E,
                top_k=K,
                vocab_size=vocab_size,
                counts_E=torch.zeros(E, dtype=torch.long),
                coactivation_EE=torch.zeros(E, E, dtype=torch.long),
                token_expert_VE=torch.zeros(vocab_size, E, dtype=torch.long),
                margin_hist=torch.zeros(MARGIN_BINS, dtype=torch.long),
            )
            for E, K in zip(num_experts, top_k, strict=True)
        ]
        self.agreement_EE = [
            torch.zeros(a.num_experts, b.num_experts, dtype=torch.long)
            for a, b in zip(self.layers, self.layers[1:], strict=False)
        ]

    @torch.no_grad()
    def observe(self, layer: int, routing: RoutingResult, token_ids_T: torch.Tensor) -> None:
        """Add one router call: ``routing`` for the ``T`` tokens ``token_ids_T``."""
        sums = self.layers[layer]
        idx_TK = routing.expert_idx_TK.cpu()
        mask_TK = routing.assignment_mask_TK
        mask_TK = torch.ones_like(idx_TK, dtype=torch.bool) if mask_TK is None else mask_TK.cpu()
        probs_TE = routing.probs_TE.detach().float().cpu()
        tokens = token_ids_T.cpu().long()
        T, K = idx_TK.shape
        E = sums.num_experts
        counts_E = torch.bincount(idx_TK[mask_TK], minlength=E)
        sums.counts_E += counts_E
        sums.tokens += T
        sums.assignments += int(mask_TK.sum())
        sums.entropy_sum += float(-(probs_TE * probs_TE.clamp(min=1e-30).log()).sum())
        capacity = math.ceil(self.capacity_factor * int(mask_TK.sum()) / E)
        sums.dropped += float((counts_E - capacity).clamp(min=0).sum())
        if K >= 1 and E > K:
            top = probs_TE.topk(K + 1, dim=-1).values
            margin = (top[:, K - 1] - top[:, K]).clamp(0, 1)
            bins = (margin * MARGIN_BINS).long().clamp(max=MARGIN_BINS - 1)
            sums.margin_hist += torch.bincount(bins, minlength=MARGIN_BINS)
        chosen_TE = torch.zeros(T, E)
        chosen_TE.scatter_(1, idx_TK, mask_TK.float())
        sums.coactivation_EE += (chosen_TE.T @ chosen_TE).long()
        top1_T = idx_TK[:, 0]
        sums.token_expert_VE.index_put_(
            (tokens, top1_T), torch.ones(T, dtype=torch.long), accumulate=True
        )
        sums.top1.append(top1_T)
        if layer > 0 and self.layers[layer - 1].top1:
            previous = self.layers[layer - 1].top1[-1]
            if previous.shape == top1_T.shape:
                self.agreement_EE[layer - 1].index_put_(
                    (previous, top1_T), torch.ones(T, dtype=torch.long), accumulate=True
                )
        if len(sums.top1) > 2:
            sums.top1.pop(0)

    def report(self, decode: Any = None, top_tokens: int = 8) -> dict[str, Any]:
        """Plain numbers per layer (JSON-ready); ``decode(token_id) -> str`` names tokens."""
        decode = decode or (lambda t: str(t))
        layers = []
        for name, s in zip(self.names, self.layers, strict=True):
            load_stats = load_summary(s.counts_E, self.dead_fraction)
            dead = load_stats.pop("dead")
            token_counts_V = s.token_expert_VE.sum(1)
            base_V = token_counts_V.double() / max(float(token_counts_V.sum()), 1.0)
            experts = []
            for e in range(s.num_experts):
                column = s.token_expert_VE[:, e].double()
                if column.sum() == 0:
                    experts.append({"expert": e, "top_tokens": []})
                    continue
                lift = (column / column.sum()) / base_V.clamp(min=1e-12)
                lift[column < 3] = 0  # ignore tokens seen too rarely to say
                best = lift.topk(min(top_tokens, int((lift > 0).sum()) or 1)).indices
                experts.append(
                    {
                        "expert": e,
                        "top_tokens": [
                            {"token": decode(int(t)), "lift": round(float(lift[t]), 2)}
                            for t in best
                            if lift[t] > 0
                        ],
                    }
                )
            if s.vocab_size == 256:  # byte-level: which kinds of bytes each expert takes
                for entry, lifts in zip(experts, _class_lifts(s.token_expert_VE), strict=True):
                    entry["byte_class_lift"] = lifts
            layers.append(
                {
                    "name": name,
                    "experts": s.num_experts,
                    "top_k": s.top_k,
                    "tokens": s.tokens,
                    "load_fraction_of_ideal": load_stats,
                    "tokens_per_expert": s.counts_E.tolist(),
                    "dead_experts": dead,
                    "router_entropy": round(s.entropy_sum / max(s.tokens, 1), 6),
                    "max_entropy": round(math.log(s.num_experts), 6),
                    "margin_k_vs_k_plus_1": _hist_quantiles(s.margin_hist),
                    "margin_histogram": s.margin_hist.tolist(),
                    "dropped_fraction_at_capacity": round(s.dropped / max(s.assignments, 1), 6),
                    "capacity_factor": self.capacity_factor,
                    "coactivation": s.coactivation_EE.tolist(),
                    "token_expert_mutual_information": round(
                        mutual_information(s.token_expert_VE), 6
                    ),
                    "specialisation": experts,
                }
            )
        agreement = []
        for i, joint in enumerate(self.agreement_EE):
            mi = mutual_information(joint)
            norm = math.sqrt(max(_entropy(joint.sum(1)) * _entropy(joint.sum(0)), 1e-30))
            agreement.append(
                {
                    "layers": [self.names[i], self.names[i + 1]],
                    "top1_normalised_mutual_information": round(mi / norm, 6),
                }
            )
        return {"layers": layers, "consecutive_layer_agreement": agreement}


@torch.no_grad()
def stream_with_hooks(
    model: torch.nn.Module,
    batches: Any,
    hooks: Sequence[tuple[torch.nn.Module, Any]],
    before_batch: Any = None,
    progress: Any = None,
) -> None:
    """Run ``model`` in eval mode without gradients over ``batches`` (token ids, or training
    batches ``(x, y[, segment_ids])``, whose packed examples then stay apart) with forward
    ``hooks`` ``(module, fn)`` attached, then remove them and restore the mode.
    ``before_batch(tokens)`` runs before each batch; ``progress`` wraps the iterator."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    was_training = model.training
    model.eval()
    try:
        for batch in progress(batches) if progress else batches:
            # a batch is token ids, or a training batch (x, y[, segment_ids]) of packed data
            tokens = batch[0] if isinstance(batch, tuple) else batch
            segments = batch[2] if isinstance(batch, tuple) and len(batch) > 2 else None
            if before_batch is not None:
                before_batch(tokens)
            window = getattr(model, "forward_window", None)  # an encoder–decoder
            if window is not None and segments is not None and segments.dtype == torch.bool:
                # an encoder–decoder's instruction batch (source, targets, source mask)
                decoder_tokens = cast(Any, model).shift_right(batch[1])
                model(tokens, decoder_tokens=decoder_tokens, attention_mask=segments)
            elif window is not None and segments is None:
                window(tokens)
            elif segments is None:
                model(tokens)
            else:
                model(tokens, segment_ids=segments)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def count_routing(model: torch.nn.Module, batches: Any) -> dict[str, torch.Tensor]:
    """``{MoE layer name: (E,) assignments routed to each expert}`` over ``batches`` of token
    ids (routing frequency, as ESFT and frequency pruning use it)."""

    counts: dict[str, torch.Tensor] = {}

    def counter(name: str) -> Any:
        def hook(mod: Any, _inputs: Any, output: Any) -> None:
            idx, mask = output.routing.expert_idx_TK, output.routing.assignment_mask_TK
            chosen = idx[mask] if mask is not None else idx.flatten()
            seen = torch.bincount(chosen.cpu(), minlength=mod.num_experts)
            counts[name] = counts.get(name, torch.zeros_like(seen)) + seen

        return hook

    hooks = [(m, counter(n)) for n, m in model.named_modules() if isinstance(m, MoE)]
    stream_with_hooks(model, batches, hooks)
    return counts


def expert_bytes_per_layer(model: torch.nn.Module) -> list[int]:
    """Bytes of one routed expert (weights, biases; codes and scales when quantised) of each
    MoE layer, in module order."""

    sizes = []
    for layer in moe_layers(model):
        bank = layer.experts
        adapter_module = getattr(bank, "adapter", None)
        adapter = set() if adapter_module is None else {id(t) for t in adapter_module.parameters()}
        tensors = [t for t in (*bank.parameters(), *bank.buffers()) if id(t) not in adapter]
        total = sum(t.numel() * t.element_size() for t in tensors)
        sizes.append(total // max(int(getattr(bank, "num_experts", 1)), 1))
    return sizes


def inspect_model(
    model: torch.nn.Module,
    batches: Any,
    *,
    vocab_size: int,
    capacity_factor: float = 1.25,
    decode: Any = None,
    progress: Any = None,
    budgets_bytes: list[int] | None = None,
) -> dict[str, Any]:
    """Run ``model`` (eval mode, no gradients) over ``batches`` of ``(B, S)`` token ids and
    return :meth:`RoutingInspector.report`, with the hot-set measures
    (``moekit.analysis.hot_set``; cache hit rates at ``budgets_bytes``) under ``hot_set``.
    ``progress`` wraps the batch iterator (tqdm)."""

    routers = [(name, r) for name, r in moe_routers(model) if not getattr(r, "soft", False)]
    if not routers:
        raise ValueError("the model has no token routers to inspect")
    inspector = RoutingInspector(
        [n for n, _ in routers],
        [int(r.num_experts) for _, r in routers],
        [int(r.top_k) for _, r in routers],
        vocab_size,
        capacity_factor=capacity_factor,
    )
    layers = moe_layers(model)
    tracker = None
    if len(layers) == len(routers):  # every MoE layer routes tokens (no Soft MoE)
        tracker = HotSetTracker(
            [int(r.num_experts) for _, r in routers], expert_bytes_per_layer(model)
        )
    current: dict[str, Any] = {"lookahead": False}

    def observer(i: int) -> Any:
        def hook(_m: Any, _inputs: Any, output: Any) -> None:
            if isinstance(output, RoutingResult) and not current["lookahead"]:
                tokens = current["tokens"].reshape(-1)
                if tokens.numel() == output.expert_idx_TK.shape[0]:
                    inspector.observe(i, output, tokens)
                    if tracker is not None:
                        tracker.observe(i, output.expert_idx_TK, output.assignment_mask_TK)

        return hook

    def lookahead(i: int) -> Any:
        following = routers[i + 1][1]

        def hook(_m: Any, args: Any) -> None:
            if tracker is None or getattr(following, "forced_routes", None) is not None:
                return
            x = args[0]
            current["lookahead"] = True
            try:
                guess = following(x.reshape(-1, x.shape[-1]))
            except (TypeError, ValueError):  # a router that needs token ids (hash routing)
                return
            finally:
                current["lookahead"] = False
            tracker.observe_lookahead(i + 1, guess.expert_idx_TK)

        return hook

    def before_batch(tokens: torch.Tensor) -> None:
        if tracker is not None:
            tracker.end_batch()
        current["tokens"] = tokens

    handles = [layer.register_forward_pre_hook(lookahead(i)) for i, layer in enumerate(layers[:-1])]
    try:
        stream_with_hooks(
            model,
            batches,
            [(router, observer(i)) for i, (_, router) in enumerate(routers)],
            before_batch=before_batch,
            progress=progress,
        )
    finally:
        for handle in handles:
            handle.remove()
    report = inspector.report(decode=decode)
    if tracker is not None:
        tracker.end_batch()
        report["hot_set"] = tracker.report(budgets_bytes)
    return report


@torch.no_grad()
def routing_differences(
    model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Any, *, per_sequence: bool = False
) -> list[dict[str, Any]]:
    """Per router: the fraction of tokens whose set of chosen experts differs between
    ``model_a`` and ``model_b`` on the same batches (e.g. two checkpoints, fp32 against bf16).
    ``per_sequence``: ``model_b`` sees each sequence alone (batch composition)."""

    differ: list[int] = []
    total = 0
    names: list[str] = []
    for tokens in batches:
        with record_routing(model_a) as a:
            model_a(tokens)
        with record_routing(model_b) as b:
            if per_sequence:
                for row in tokens:
                    model_b(row.unsqueeze(0))
            else:
                model_b(tokens)
        names = a.names
        if len(a.names) != len(b.names):
            raise ValueError("the two models have different numbers of routers")
        if not differ:
            differ = [0] * len(a.names)
        for r in range(len(a.names)):
            idx_a = torch.cat(a.expert_idx[r]).sort(dim=1).values
            idx_b = torch.cat(b.expert_idx[r]).sort(dim=1).values
            if idx_a.shape != idx_b.shape:
                raise ValueError(f"{a.names[r]}: the models route different numbers of tokens")
            differ[r] += int((idx_a != idx_b).any(dim=1).sum())
        total += tokens.numel()
    return [
        {"layer": n, "differing_fraction": round(d / max(total, 1), 6)}
        for n, d in zip(names, differ, strict=True)
    ]
