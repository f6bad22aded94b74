"""Training-step throughput at the demo's configuration: the MoE LM against its dense twin and
against the same model as Hugging Face's ``MixtralForCausalLM``.

The models are the ones ``moekit demo`` trains (byte-level, d_model 128, 4 layers, FFN 512;
the MoE: 8 experts of width 256, top-2, dropless; batch 16 x 128 tokens) built from the same
configs; the HF model is the MoE exported with ``moekit.interop.hf.to_hf`` and loaded with
``transformers`` (its default ``grouped_mm`` experts, its Switch loss on through
``output_router_logits``). One step = forward, cross-entropy (+ auxiliary loss), backward,
AdamW, gradients set to None. The three alternate within each round in one process (glibc's
freed-memory thresholds raised for all, as ``moekit train`` does); reported are medians of
per-round ratios.

    python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py --rounds 10 --steps-per-round 3 --no-hf
    python benchmarks/bench_train_step.py --batch-size 32
    python benchmarks/bench_train_step.py --compile --no-hf
    python benchmarks/bench_train_step.py --no-hf --statistics-ab   # what routing statistics cost

``--statistics-ab`` adds a copy of the MoE with routing statistics off (``moe-nostat``), as the
training loop runs it on steps that write no metrics line. ``--compile`` runs the moekit MoE
and its dense twin through ``torch.compile`` (compilation is in the warm-up, not timed); the HF
model, if timed, stays eager (``torch._grouped_mm``'s fake implementation refuses fp32 while
tracing in torch 2.13).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from moekit.cli.demo import PRESETS, demo_train_configs
from moekit.layers import set_statistics
from moekit.models import TransformerLM
from moekit.utils.allocator import retain_freed_memory


class Stepper:
    """One training step of a model; ``hf`` models return their logits and aux loss their way."""

    def __init__(self, model: torch.nn.Module, hf: bool = False, compile: bool = False) -> None:
        self.model, self.hf = model.train(), hf
        self.forward = torch.compile(model) if compile else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(self, tokens: torch.Tensor) -> tuple[float, float]:
        """Seconds of the whole step and of its optimizer update (AdamW + zero_grad)."""
        start = time.perf_counter()
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.hf:
            out = self.forward(input_ids=inputs, output_router_logits=True)
            logits, aux = out.logits, self.model.config.router_aux_loss_coef * out.aux_loss
        else:
            out = self.forward(inputs)
            logits, aux = out.logits, out.aux_loss
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + aux
        loss.backward()
        update = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return end - start, end - update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the moekit MoE and dense models"
    )
    parser.add_argument(
        "--statistics-ab", action="store_true", help="also time the MoE with statistics off"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    preset = dict(PRESETS[args.preset])
    if args.batch_size is not None:
        preset["batch_size"] = args.batch_size
    dense_cfg, moe_cfg = demo_train_configs(preset)
    torch.manual_seed(0)
    moe = TransformerLM(moe_cfg.model)
    dense = TransformerLM(dense_cfg.model)
    steppers = {
        "moe": Stepper(moe, compile=args.compile),
        "dense": Stepper(dense, compile=args.compile),
    }
    if args.statistics_ab:
        quiet = copy.deepcopy(moe)
        set_statistics(quiet, False)
        steppers["moe-nostat"] = Stepper(quiet, compile=args.compile)
    if not args.no_hf:
        import transformers

        from moekit.interop.hf import to_hf

        with tempfile.TemporaryDirectory() as folder:
            to_hf(moe, folder, "mixtral")
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        steppers["hf"] = Stepper(hf, hf=True)
    batch, seq = moe_cfg.data.batch_size, moe_cfg.data.seq_len
    tokens = torch.randint(0, moe_cfg.model.vocab_size, (batch, seq + 1))
    for stepper in steppers.values():  # warm-up (and compilation)
        for _ in range(3 if args.compile else 1):
            stepper.step(tokens)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    updates: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, stepper in steppers.items():
            steps = [stepper.step(tokens) for _ in range(args.steps_per_round)]
            times[name].append(statistics.median(total for total, _ in steps))
            updates[name].append(statistics.median(update for _, update in steps))
    print(
        f"{args.preset} demo configuration: batch {batch} x {seq} tokens, {args.threads} threads, "
        f"fp32{', moekit models compiled' if args.compile else ''}; medians of {args.rounds} rounds"
    )
    for name, ts in times.items():
        tokens_per_s = batch * seq / statistics.median(ts)
        ratio = statistics.median(b / a for a, b in zip(times["moe"], ts, strict=True))
        params = sum(p.numel() for p in steppers[name].model.parameters())
        print(
            f"  {name:10s} {tokens_per_s:8.0f} tokens/s   moe tokens/s / this = {ratio:.2f}   "
            f"step {1e3 * statistics.median(ts):6.1f} ms, of which AdamW "
            f"{1e3 * statistics.median(updates[name]):5.1f} ms ({params:,} parameters)"
        )


if __name__ == "__main__":
    main()
