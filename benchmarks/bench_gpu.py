"""moekit on one GPU: correctness on the device, layer TFLOP/s, training-step MFU, decoding.

    python benchmarks/bench_gpu.py                      # everything on cuda:0 (< 8 min, H200)
    python benchmarks/bench_gpu.py --sections layer     # a subset
    python benchmarks/bench_gpu.py --tiny --device cpu  # seconds on a CPU: every code path
    python benchmarks/bench_gpu.py --json gpu.json      # also write every figure as JSON

Sections, in order:
  correct  the MoE layer on the device against the looped reference
           (``moekit.dispatch.reference.reference_moe_output``, fp32 copy of the same weights,
           same routes): fp32 and bf16 parameters, fp32 parameters under bf16 autocast, experts
           with zero tokens, padding, capacity drops; outputs and every gradient. Then an LM:
           ``moekit.training.train`` for a few steps on the device and greedy generation
           (cached = uncached, list prompts).
  layer    bf16 layer forward and forward+backward at the Qwen3-30B-A3B shape
           (T=32768, D=2048, H=768, E=128, k=8), at (32768, 4096, 1024, 128, 8) and at a
           Mixtral-like (16384, 4096, 14336, 8, 2), against a dense bf16 SwiGLU FFN with the
           same active FLOPs (the floor) and transformers' Qwen3-MoE and Mixtral sparse blocks
           (``grouped_mm`` experts) on the same weights. Implementations alternate in each
           round (CUDA events, warm-up, medians). TFLOP/s count active FLOPs only:
           forward 6*T*k*D*H (SwiGLU: in-projection 2H wide, out-projection), fwd+bwd 3x.
  train    one-GPU training step of a ~1.2B-active MoE LM (fp32 master weights, bf16 autocast,
           fused AdamW): tokens/s and MFU against the GPU's dense bf16 peak; host syncs per
           steady-state step counted with ``torch.cuda.set_sync_debug_mode``.
  profile  the layer's kernels by device time at the Qwen3-30B-A3B shape, and the two ways of
           combining rows (``moekit.dispatch.dispatcher.COMBINE``) timed alternately.
  decode   batch-1 and batch-32 greedy decoding tokens/s, moekit ``generate`` against
           ``transformers``' ``generate`` on the same weights (a Qwen3-MoE model built by
           transformers, imported with ``moekit.interop.from_hf``), bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import moekit
from moekit.dispatch.reference import reference_moe_output
from moekit.experts.grouped_matmul import GroupedMatmulKernel
from moekit.experts.liger_moe import liger_available
from moekit.experts.triton_moe import triton_available
from moekit.models.common.attention import AttentionConfig

RESULTS: list[dict[str, Any]] = []
START = time.time()

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the SXM parts, for MFU. The PCIe and
# NVL parts of the same name run lower clocks and power: their peaks differ, so they are not
# matched (MFU "n/a") rather than credited with the SXM figure.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}
_OTHER_VARIANTS = ("NVL", "PCIE")


def peak_bf16_tflops(device_name: str) -> float | None:
    """The SXM part's dense bf16 peak for ``device_name``, or ``None`` for an unknown part or a
    PCIe/NVL variant (an "H200 NVL" is not an H200 SXM)."""
    upper = device_name.upper()
    if any(variant in upper for variant in _OTHER_VARIANTS):
        return None
    return next((v for key, v in PEAK_BF16_TFLOPS.items() if key in upper), None)


@contextlib.contextmanager
def exact_fp32_matmuls():
    """TF32 off inside, and the caller's setting back after (it leaked on for the later
    sections, flattering fp32 figures)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


LAYER_SHAPES = {  # name: (T, D, H, E, k)
    "qwen3-30b-a3b": (32768, 2048, 768, 128, 8),
    "d4096-e128-k8": (32768, 4096, 1024, 128, 8),
    "mixtral-like": (16384, 4096, 14336, 8, 2),
}
# the transformers block each shape is compared with: its own family's (one per row, so every
# row's "x transformers" ratio is against the block that model ships with)
HF_BLOCK_OF = {"mixtral-like": "mixtral"}
# the correctness gate on every timed shape: moekit's output against the looped reference on
# the first GATE_TOKENS tokens, and against the transformers block (bf16 rounding differs)
GATE_TOKENS = 256
GATE_TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def report(section: str, name: str, status: str, detail: str = "", **data: Any) -> None:
    RESULTS.append({"section": section, "name": name, "status": status, "detail": detail, **data})
    print(f"[{status:4s}] {section:7s} {name}: {detail}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """One timed call (CUDA events on a GPU, wall clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def alternate(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, rounds: int
) -> dict[str, float]:
    """Median ms of each function, timed in alternation: one call of each per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def cuda_syncs(device: torch.device):
    """Counts host syncs on a CUDA device (``set_sync_debug_mode('warn')``); ``box['n']`` is
    ``None`` elsewhere."""
    box: dict[str, int | None] = {"n": None}
    if device.type != "cuda":
        yield box
        return
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode(0)
    box["n"] = sum("synchroniz" in str(w.message) for w in caught)


def build_layer(E: int, k: int, D: int, H: int, *, capacity: float | None = None, seed: int = 0):
    torch.manual_seed(seed)
    dispatch = (
        moekit.DispatchConfig(mode="capacity", capacity_factor=capacity)
        if capacity
        else moekit.DispatchConfig()
    )
    return moekit.MoEConfig(
        num_experts=E,
        top_k=k,
        experts=moekit.ExpertConfig(hidden=H, activation="swiglu"),
        dispatch=dispatch,
        aux_loss=moekit.AuxLossConfig(switch=0.01, z_loss=0.001),
        statistics=False,
    ).build(d_model=D)


# ------------------------------------------------------------------------------- correct
def layer_case(
    device: torch.device,
    name: str,
    *,
    dtype: torch.dtype,
    autocast: bool = False,
    E: int = 16,
    k: int = 4,
    D: int = 128,
    H: int = 96,
    B: int = 2,
    S: int = 64,
    used: list[int] | None = None,
    pad: bool = False,
    capacity: float | None = None,
) -> None:
    base = build_layer(E, k, D, H, capacity=capacity)
    fast = copy.deepcopy(base).to(device=device, dtype=dtype).train()
    reference = copy.deepcopy(fast).to(dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, D, generator=gen).to(device=device, dtype=dtype)
    grad_out = torch.randn(B, S, D, generator=gen).to(device)
    mask = None
    if pad:
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[0, : S // 3] = False
        mask = mask.to(device)
    if used is not None:
        pick = torch.stack([torch.randperm(len(used), generator=gen)[:k] for _ in range(B * S)])
        forced = torch.tensor(used)[pick].to(device)
        fast.router.forced_routes = lambda n: forced

    def params(m):
        return [m.experts.w_in_EDH, m.experts.w_out_EHD, m.router.weight_ED]

    x_fast = x.detach().clone().requires_grad_(True)
    ctx = torch.autocast(device.type, torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = fast(x_fast, padding_mask=mask)
    grads = torch.autograd.grad((out.output.float() * grad_out).sum(), [x_fast, *params(fast)])
    routes = out.routing.expert_idx_TK.detach()
    reference.router.forced_routes = lambda n: routes
    x_ref = x.detach().float().clone().requires_grad_(True)
    routing = reference.router(x_ref.reshape(-1, D), None, None if mask is None else mask.view(-1))
    y_ref = reference_moe_output(reference, x_ref, routing, padding_mask=mask)
    inputs = [x_ref, *params(reference)]
    grads_ref = torch.autograd.grad((y_ref * grad_out).sum(), inputs, allow_unused=True)
    grads_ref = [
        torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads_ref, strict=True)
    ]
    errors = [rel_err(out.output, y_ref)] + [
        rel_err(a, b) for a, b in zip(grads, grads_ref, strict=True)
    ]
    low = dtype != torch.float32 or autocast
    tolerance = 3e-2 if low else 1e-4
    ok = max(errors) < tolerance and all(bool(torch.isfinite(g).all()) for g in grads)
    if used is not None:
        unused = sorted(set(range(E)) - set(used))
        ok = ok and all(bool((grads[1][e] == 0).all() and (grads[2][e] == 0).all()) for e in unused)
    if autocast:
        ok = ok and out.routing.logits_TE.dtype == torch.float32
        ok = ok and all(g.dtype == torch.float32 for g in grads[1:])
    detail = "rel err out/dx/dw_in/dw_out/drouter " + "/".join(f"{e:.1e}" for e in errors)
    report("correct", name, "PASS" if ok else "FAIL", f"{detail} (tol {tolerance:g})")


def section_correct(device: torch.device, args: argparse.Namespace) -> None:
    fp32, bf16 = torch.float32, torch.bfloat16
    with exact_fp32_matmuls():  # exact fp32 for the fp32 cases, restored afterwards
        layer_case(device, "fp32", dtype=fp32)
        layer_case(device, "bf16", dtype=bf16)
        layer_case(device, "fp32 params under bf16 autocast", dtype=fp32, autocast=True)
        layer_case(
            device, "bf16, 10 of 16 experts get no token", dtype=bf16, used=[0, 3, 5, 9, 12, 15]
        )
        layer_case(device, "bf16 with padding", dtype=bf16, pad=True)
        layer_case(device, "bf16 capacity 0.5 (drops)", dtype=bf16, capacity=0.5)
        layer_case(device, "fp32 with padding", dtype=fp32, pad=True)

    # an LM: training through moekit's loop, then generation
    import tempfile

    from moekit.models.transformer.generate import generate
    from moekit.training import load_train_config, train

    with tempfile.TemporaryDirectory() as out_dir:
        overrides = [
            "steps=4",
            "eval_every=4",
            "eval_batches=1",
            "log_every=2",
            "data.seq_len=64",
            "data.batch_size=4",
            "model.d_model=64",
            "model.n_layers=2",
            "model.ffn_hidden=128",
            "model.max_seq_len=128",
            "model.moe.layer.num_experts=8",
            "model.moe.layer.experts.hidden=64",
            "model.moe.layer.top_k=2",
            f"device={device}",
            f"out_dir={out_dir}",
        ]
        result = train(load_train_config(None, overrides), progress=False)
        losses = [r["loss"] for r in result.records]
        where = next(result.model.parameters()).device
        ok = all(loss == loss for loss in losses) and where.type == device.type
        detail = f"losses {losses}, parameters on {where}"
        report("correct", "train() on the device", "PASS" if ok else "FAIL", detail)
        model = result.model.eval()
    prompt = torch.randint(0, 256, (2, 8), device=device)
    cached = generate(model, prompt, 12)
    uncached = generate(model, prompt, 12, use_cache=False)
    same = torch.equal(cached, uncached)
    report("correct", "greedy generate cached = uncached", "PASS" if same else "FAIL", "")
    outs = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 6)
    ok = [len(o) for o in outs] == [9, 11] and all(o.device.type == device.type for o in outs)
    report(
        "correct",
        "generate(list of prompts)",
        "PASS" if ok else "FAIL",
        f"{[len(o) for o in outs]}",
    )
    # a CPU generator with a device model: the same seed samples the same tokens, in range
    draws = [
        generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
        for _ in range(2)
    ]
    greedy = generate(model, prompt, 8)
    ok = (
        torch.equal(draws[0], draws[1])
        and draws[0].shape == (2, 16)
        and int(draws[0].min()) >= 0
        and int(draws[0].max()) < 256
        and torch.equal(draws[0][:, :8], prompt)
    )
    detail = f"reproducible {torch.equal(draws[0], draws[1])}, differs from greedy " + str(
        not torch.equal(draws[0], greedy)
    )
    report("correct", "sampling with a CPU generator", "PASS" if ok else "FAIL", detail)


# --------------------------------------------------------------------------------- layer
def hf_block(kind: str, moe: moekit.MoE, E: int, k: int, D: int, H: int):
    """transformers' sparse MoE block with ``grouped_mm`` experts, sharing ``moe``'s weights."""
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg: Any = MixtralConfig(
            hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=k
        )
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeSparseMoeBlock as Block,
        )

        cfg = Qwen3MoeConfig(
            hidden_size=D,
            moe_intermediate_size=H,
            num_experts=E,
            num_experts_per_tok=k,
            norm_topk_prob=True,
        )
    cfg._experts_implementation = "grouped_mm"
    block = Block(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight_ED)
        block.experts.gate_up_proj.copy_(moe.experts.w_in_EDH.transpose(1, 2))
        block.experts.down_proj.copy_(moe.experts.w_out_EHD.transpose(1, 2))
    return block


def section_layer(device: torch.device, args: argparse.Namespace) -> None:
    shapes = {"tiny": (256, 64, 64, 8, 2)} if args.tiny else LAYER_SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 else torch.float32
    try:
        import transformers  # noqa: F401

        have_hf = not args.no_hf
    except ImportError:
        have_hf = False
    for shape_name, (T, D, H, E, k) in shapes.items():
        if time.time() - START > args.budget:
            report("layer", shape_name, "SKIP", "time budget")
            continue
        flops_fwd = 6 * T * k * D * H
        torch.manual_seed(0)
        with torch.device(device):
            moe = build_layer(E, k, D, H)
            moe.losses_enabled = False  # no auxiliary losses: compare the data path
            impls: dict[str, tuple[torch.nn.Module, Callable]] = {
                "moekit": (moe, lambda x, m=moe: m(x).output)
            }
            for kernel in (GroupedMatmulKernel.TRITON, GroupedMatmulKernel.LIGER):
                row = f"moekit {kernel.value}"
                fused_ok, why = triton_available(device)
                if fused_ok and kernel is GroupedMatmulKernel.LIGER:
                    fused_ok, why = liger_available()
                if not (fused_ok and device.type == "cuda"):  # interpreted times mean nothing
                    report("layer", f"{shape_name} {row}", "SKIP", why or "not on CUDA")
                    continue
                fused = copy.deepcopy(moe)
                fused.experts.kernel = kernel
                try:  # a kernel that fails to compile costs its row, not the section
                    probe = torch.randn(64, D, device=device, dtype=torch.bfloat16)
                    fused.to(torch.bfloat16)(probe).output.float().sum().backward()
                    impls[row] = (fused, lambda x, m=fused: m(x).output)
                except Exception as error:
                    report("layer", f"{shape_name} {row}", "FAIL", repr(error)[:300])
            dense = moekit.FeedForward(D, k * H, activation="swiglu")
            impls["dense floor"] = (dense, dense)
            if have_hf:
                for kind in (HF_BLOCK_OF.get(shape_name, "qwen3_moe"),):
                    try:
                        block = hf_block(kind, moe, E, k, D, H)
                        impls[f"hf {kind}"] = (
                            block,
                            lambda x, m=block: m(x.unsqueeze(0)).squeeze(0),
                        )
                    except Exception as error:
                        report("layer", f"hf {kind}", "SKIP", f"{type(error).__name__}: {error}")
        for module, _ in impls.values():
            module.to(device, dtype).train()
        x = torch.randn(T, D, device=device, dtype=dtype)
        grad_y = torch.randn(T, D, device=device, dtype=dtype)
        with torch.no_grad():
            outputs = {name: fwd(x) for name, (_, fwd) in impls.items()}
        agreement = {  # transformers' block and the fused kernels against the PyTorch path
            name: round(rel_err(outputs[name], outputs["moekit"]), 4)
            for name in outputs
            if name.startswith("hf") or name in ("moekit triton", "moekit liger")
        }
        with torch.no_grad():  # the gate: the looped reference on the first tokens
            head = x[:GATE_TOKENS]
            routing = moe.router(head)
            reference = reference_moe_output(moe, head, routing)
            gate_err = rel_err(outputs["moekit"][:GATE_TOKENS], reference)
        tolerance = GATE_TOLERANCE.get(dtype, 1e-4)
        finite = bool(torch.isfinite(outputs["moekit"]).all())
        gate_ok = (
            finite and gate_err <= tolerance and all(e <= tolerance for e in agreement.values())
        )
        report(
            "layer",
            f"{shape_name} correctness gate",
            "PASS" if gate_ok else "FAIL",
            f"vs looped reference {gate_err:.2e}, vs transformers {agreement}, finite {finite} "
            f"(tol {tolerance:g})",
        )
        del outputs

        def fwd_bwd(module, fwd, x=x, grad_y=grad_y):
            def run():
                module.zero_grad(set_to_none=True)
                fwd(x.detach().requires_grad_(True)).backward(grad_y)

            return run

        def fwd_only(fwd, x=x):
            # the training forward (autograd on, activations kept for a backward), not an
            # inference forward under no_grad, which skips that work and flattered the figure
            def run():
                fwd(x.detach().requires_grad_(True))

            return run

        warmup, rounds = (1, 2) if args.tiny else (3, args.rounds)
        train_ms = alternate(
            {n: fwd_bwd(m, f) for n, (m, f) in impls.items()}, device, warmup, rounds
        )
        for module, _ in impls.values():
            module.zero_grad(set_to_none=True)
        infer_ms = alternate(
            {n: fwd_only(f) for n, (_, f) in impls.items()}, device, warmup, rounds
        )
        with cuda_syncs(device) as syncs:
            fwd_bwd(moe, impls["moekit"][1])()
            sync(device)
        rows = {}
        for name in impls:
            rows[name] = {
                "fwd_ms": round(infer_ms[name], 3),
                "fwd_bwd_ms": round(train_ms[name], 3),
                "fwd_tflops": round(flops_fwd / infer_ms[name] / 1e9, 1),
                "fwd_bwd_tflops": round(3 * flops_fwd / train_ms[name] / 1e9, 1),
            }
        summary = "; ".join(
            f"{n} training fwd {r['fwd_ms']:.2f} ms ({r['fwd_tflops']} TF/s) "
            f"fwd+bwd {r['fwd_bwd_ms']:.2f} ms ({r['fwd_bwd_tflops']} TF/s, "
            f"{train_ms[n] / train_ms['moekit']:.2f}x moekit)"
            for n, r in rows.items()
        )
        report(
            "layer",
            f"{shape_name} T={T} D={D} H={H} E={E} k={k} {dtype}",
            "INFO",
            f"{summary}; hf agreement {agreement}; moekit host syncs fwd+bwd {syncs['n']}",
            shape=[T, D, H, E, k],
            rows=rows,
            agreement=agreement,
            syncs=syncs["n"],
        )
        del impls, moe, dense, x, grad_y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # the training recipe: fp32 master weights under bf16 autocast (experts must run in bf16)
    if device.type == "cuda" and not args.tiny and time.time() - START < args.budget:
        T, D, H, E, k = LAYER_SHAPES["qwen3-30b-a3b"]
        moe = build_layer(E, k, D, H).to(device).train()
        moe.losses_enabled = False
        x = torch.randn(T, D, device=device)
        grad_y = torch.randn(T, D, device=device)

        def autocast_step():
            moe.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = moe(x.detach().requires_grad_(True)).output
            y.backward(grad_y)

        ms = alternate({"autocast": autocast_step}, device, 2, args.rounds)["autocast"]
        with cuda_syncs(device) as syncs:
            autocast_step()
            sync(device)
        report(
            "layer",
            "qwen3-30b-a3b fp32 params under bf16 autocast",
            "INFO",
            f"fwd+bwd {ms:.2f} ms = {18 * T * k * D * H / ms / 1e9:.1f} TF/s; "
            f"host syncs {syncs['n']}",
            fwd_bwd_ms=ms,
            syncs=syncs["n"],
        )
        del moe


# --------------------------------------------------------------------------------- train
def lm_config(tiny: bool):
    from moekit.models import MoEPlacementConfig, TransformerConfig

    if tiny:
        d, layers, heads, kv, E, k, H, vocab, seq = 64, 2, 4, 2, 8, 2, 64, 256, 64
    else:  # ~1.2B active (3.7B total) parameters
        d, layers, heads, kv, E, k, H, vocab, seq = 2048, 24, 16, 4, 16, 4, 1408, 32000, 2048
    moe = moekit.MoEConfig(
        num_experts=E,
        top_k=k,
        experts=moekit.ExpertConfig(hidden=H, activation="swiglu"),
        aux_loss=moekit.AuxLossConfig(switch=0.01),
        statistics=False,
    )
    return TransformerConfig(
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        attention=AttentionConfig(n_heads=heads, n_kv_heads=kv),
        ffn_hidden=4 * d,
        max_seq_len=seq,
        moe=MoEPlacementConfig(layer=moe),
    ), seq


def section_train(device: torch.device, args: argparse.Namespace) -> None:
    from moekit.analysis.params import count_parameters
    from moekit.models import TransformerLM
    from moekit.training.config import OptimConfig
    from moekit.training.optim import build_optimizer

    config, seq = lm_config(args.tiny)
    batch = 2 if args.tiny else 8
    torch.manual_seed(0)
    with torch.device(device):
        model = TransformerLM(config)
    model.train()
    # causal attention: on average a token attends to half the sequence
    counts = count_parameters(model, context=seq // 2)
    active = counts.active
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    use_autocast = device.type == "cuda" or args.cpu_bf16

    def step():
        ctx = (
            torch.autocast(device.type, torch.bfloat16)
            if use_autocast
            else contextlib.nullcontext()
        )
        with ctx:
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup, rounds = (1, 2) if args.tiny else (3, 6)
    ms = alternate({"step": step}, device, warmup, rounds)["step"]
    with cuda_syncs(device) as syncs:
        step()
        sync(device)
    if args.profile_train:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            step()
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=55))
    n_tokens = batch * seq
    # forward+backward = 3x the forward FLOPs per token (active matmuls plus attention)
    flops = 3 * counts.flops_per_token * n_tokens
    tflops = flops / ms / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(name)
    mfu = f"{100 * tflops / peak:.1f}% of {peak:g}" if peak else "n/a"
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    report(
        "train",
        f"LM step, {active / 1e9:.2f}B active / {counts.total / 1e9:.2f}B total, "
        f"{batch}x{seq} tokens",
        "INFO",
        f"{ms:.1f} ms/step, {n_tokens / ms * 1e3:,.0f} tokens/s, {tflops:.1f} TFLOP/s, MFU {mfu}; "
        f"host syncs per step {syncs['n']}; peak memory {memory:.1f} GiB",
        step_ms=ms,
        tflops=tflops,
        syncs=syncs["n"],
    )
    model = optimizer = None  # free the bare step's model before moekit train builds its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    train_mfu(device, args, config, seq, batch, counts.flops_per_token, peak)


def train_mfu(device, args, config, seq: int, batch: int, flops_per_token: float, peak) -> None:
    """The same model through ``moekit train`` itself (its loop, callbacks, bf16 recipe and
    metrics steps on the embedded corpus): the MFU a user gets, not a bare step's. Where bf16 is
    on, with bf16 working weights (the default) and with autocast casting the fp32 weights every
    forward (``working_weights=fp32``), alternating (the better of two runs each)."""
    import dataclasses
    import tempfile

    from moekit.training import load_train_config, train

    steps = 3 if args.tiny else 20
    bf16 = device.type == "cuda" or args.cpu_bf16

    def run(working_weights: str) -> float:
        with tempfile.TemporaryDirectory() as out_dir:
            base = load_train_config(
                None,
                [
                    f"steps={steps}",
                    f"eval_every={steps}",
                    "eval_batches=1",
                    f"log_every={steps}",
                    f"data.seq_len={seq}",
                    f"data.batch_size={batch}",
                    f"device={device}",
                    f"bf16={str(bf16).lower()}",
                    f"working_weights={working_weights}",
                    f"out_dir={out_dir}",
                ],
            )
            result = train(dataclasses.replace(base, model=config), progress=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result.tokens_per_second

    modes = ["bf16", "fp32"] if bf16 else ["auto"]
    rates = {mode: 0.0 for mode in modes}
    for _ in range(1 if args.tiny else 2):
        for mode in modes:
            rates[mode] = max(rates[mode], run(mode))
    for mode, rate in rates.items():
        tflops = 3 * flops_per_token * rate / 1e12
        mfu = f"{100 * tflops / peak:.1f}% of {peak:g}" if peak else "n/a"
        label = {
            "bf16": "bf16 working weights (default)",
            "fp32": "autocast of fp32 weights",
            "auto": "fp32",
        }[mode]
        report(
            "train",
            f"moekit train, {steps} steps, {label}",
            "INFO",
            f"{rate:,.0f} tokens/s, {tflops:.1f} TFLOP/s, MFU {mfu} (the loop's time, "
            "evaluation and checkpoints excluded)",
            tokens_per_s=rate,
            tflops=tflops,
        )
    if bf16:
        print(f"  working weights / autocast: {rates['bf16'] / rates['fp32']:.3f}x tokens/s")


# -------------------------------------------------------------------------------- decode
def section_decode(device: torch.device, args: argparse.Namespace) -> None:
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    except ImportError:
        report("decode", "transformers", "SKIP", "not importable")
        return
    from moekit.interop import from_hf
    from moekit.models.transformer.generate import generate

    if args.tiny:
        sizes = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            vocab_size=256,
            intermediate_size=128,
        )
    else:
        sizes = dict(
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            moe_intermediate_size=512,
            num_experts=32,
            num_experts_per_tok=4,
            vocab_size=32000,
            intermediate_size=2048,
        )
    torch.manual_seed(0)
    hf_config = Qwen3MoeConfig(
        **sizes,
        head_dim=sizes["hidden_size"] // sizes["num_attention_heads"],
        max_position_embeddings=512,
        norm_topk_prob=True,
    )
    hf_model = Qwen3MoeForCausalLM(hf_config).eval()
    ours = from_hf(hf_model).eval()
    dtype = torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 else torch.float32
    hf_model.to(device, dtype)
    ours.to(device, dtype)
    new = 8 if args.tiny else 64
    for batch in (1, 32):
        prompt = torch.randint(0, sizes["vocab_size"], (batch, 16), device=device)

        def run_ours(prompt=prompt):
            return generate(ours, prompt, new)

        def run_hf(prompt=prompt):
            return hf_model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

        with torch.no_grad():
            same = torch.equal(run_ours()[:, : 16 + 4], run_hf()[:, : 16 + 4])
            ms = alternate({"moekit": run_ours, "hf": run_hf}, device, 1, 1 if args.tiny else 3)
            with cuda_syncs(device) as syncs:
                run_ours()
                sync(device)
        rate = {name: batch * new / t * 1e3 for name, t in ms.items()}
        report(
            "decode",
            f"batch {batch}, {new} new tokens, {dtype}",
            "INFO",
            f"moekit {rate['moekit']:,.0f} tok/s, transformers {rate['hf']:,.0f} tok/s "
            f"({rate['moekit'] / rate['hf']:.2f}x); first 4 tokens agree: {same}; "
            f"host syncs per generate {syncs['n']}",
            tokens_per_second=rate,
            syncs=syncs["n"],
        )
        compiled_step_row(device, args, batch, new, dtype, run_ours, run_hf, prompt, ours)


def compiled_step_row(device, args, batch, new, dtype, run_ours, run_hf, prompt, ours) -> None:
    """moekit's fixed-shape decoding with the step compiled once (a CUDA graph per step),
    gated on greedy tokens equal to the plain path's, against the plain path and transformers
    in the same run; CUDA only (the CPU's figures are bench_decode.py --compile-step's). A
    step that fails to compile costs this row, not the section."""
    from moekit.models.transformer.generate import generate

    where = f"compiled step, batch {batch}, {new} new tokens, {dtype}"
    if device.type != "cuda":
        report("decode", where, "SKIP", "CUDA only (CPU: bench_decode.py --compile-step)")
        return

    def run_compiled(prompt=prompt):
        return generate(ours, prompt, new, compile_step=True)

    try:
        with torch.no_grad():
            same = torch.equal(run_compiled(), run_ours())  # compiles, then the gate
            ms = alternate(
                {"compiled": run_compiled, "moekit": run_ours, "hf": run_hf}, device, 1, 3
            )
    except Exception as error:  # a failed compilation costs its row
        report("decode", where, "FAIL", f"{type(error).__name__}: {error}"[:300])
        return
    rate = {name: batch * new / t * 1e3 for name, t in ms.items()}
    report(
        "decode",
        where,
        "PASS" if same else "FAIL",
        f"compiled {rate['compiled']:,.0f} tok/s = {rate['compiled'] / rate['moekit']:.2f}x "
        f"the plain path, {rate['compiled'] / rate['hf']:.2f}x transformers; greedy tokens "
        f"equal to the plain path's: {same}",
        tokens_per_second=rate,
    )


# ------------------------------------------------------------------------------- profile
def section_profile(device: torch.device, args: argparse.Namespace) -> None:
    """Where the layer's time goes at the Qwen3-30B-A3B shape (the kernels that take most
    device time in one forward+backward), and the two ways to combine rows, alternating."""
    from moekit.dispatch import dispatcher

    default_combine = dispatcher.COMBINE
    T, D, H, E, k = (256, 64, 64, 8, 2) if args.tiny else LAYER_SHAPES["qwen3-30b-a3b"]
    dtype = torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        moe = build_layer(E, k, D, H)
    moe.losses_enabled = False
    moe.to(device, dtype).train()
    x = torch.randn(T, D, device=device, dtype=dtype)
    grad_y = torch.randn(T, D, device=device, dtype=dtype)

    def step():
        moe.zero_grad(set_to_none=True)
        moe(x.detach().requires_grad_(True)).output.backward(grad_y)

    def with_combine(mode):
        def run():
            dispatcher.COMBINE = mode
            step()

        return run

    warmup, rounds = (1, 2) if args.tiny else (3, args.rounds)
    modes = ("bmm", "sum", "index_add")
    ms = alternate({m: with_combine(m) for m in modes}, device, warmup, rounds)
    report(
        "profile",
        f"combine, fwd+bwd T={T} D={D} H={H} E={E} k={k} {dtype}",
        "INFO",
        ", ".join(f"{m} {ms[m]:.2f} ms" for m in modes),
        ms=ms,
    )
    # the LM step's layer shape: fp32 master weights and stream under bf16 autocast
    T2, E2, k2, H2 = (256, 8, 2, 64) if args.tiny else (16384, 16, 4, 1408)
    with torch.device(device):
        moe2 = build_layer(E2, k2, D, H2)
    moe2.losses_enabled = False
    moe2.train()
    x2 = torch.randn(T2, D, device=device)
    grad_y2 = torch.randn(T2, D, device=device)

    def autocast_combine(mode):
        def run():
            dispatcher.COMBINE = mode
            moe2.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16):
                y = moe2(x2.detach().requires_grad_(True)).output
            y.backward(grad_y2)

        return run

    ms2 = alternate({m: autocast_combine(m) for m in modes}, device, warmup, rounds)
    dispatcher.COMBINE = default_combine
    report(
        "profile",
        f"combine, fwd+bwd T={T2} D={D} H={H2} E={E2} k={k2} fp32 under bf16 autocast",
        "INFO",
        ", ".join(f"{m} {ms2[m]:.2f} ms" for m in modes),
        ms=ms2,
    )
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=55)
    print(table, flush=True)
    report("profile", "layer fwd+bwd kernels (2 steps)", "INFO", "table above", table=table)


SECTIONS = {
    "correct": section_correct,
    "layer": section_layer,
    "train": section_train,
    "decode": section_decode,
    "profile": section_profile,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: seconds on a CPU")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per figure")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; then skip shapes")
    parser.add_argument("--no-hf", action="store_true", help="leave out transformers' blocks")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 on the CPU too")
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument(
        "--profile-train", action="store_true", help="print the LM step's top kernels"
    )
    parser.add_argument(
        "--combine",
        choices=["auto", "bmm", "sum", "index_add"],
        help="moekit.dispatch.dispatcher.COMBINE for every section (default: moekit's)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.combine:
        from moekit.dispatch import dispatcher

        dispatcher.COMBINE = args.combine
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report("env", "versions", "INFO", f"torch {torch.__version__}, device {name}")
    failed = False
    for section in args.sections:
        try:
            SECTIONS[section](device, args)
        except Exception as error:
            failed = True
            report(section, "section", "FAIL", f"{type(error).__name__}: {error}")
            import traceback

            traceback.print_exc()
        print(f"--- {section}: total {time.time() - START:.1f} s", flush=True)
    failed = failed or any(r["status"] == "FAIL" for r in RESULTS)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": RESULTS}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
