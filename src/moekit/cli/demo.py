"""``moekit demo``: dense vs MoE language models at equal active parameters, on real text."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from moekit.analysis.report import write_demo_report
from moekit.dispatch.config import DispatchMode, DropPriority
from moekit.dispatch.dispatcher import DispatchConfig
from moekit.training.compare import Comparison, moe_twin, param_reports
from moekit.training.config import TrainConfig, load_train_config
from moekit.training.loop import train

HELP = (
    "Train a dense byte-level LM and an MoE LM with the same active parameters per token on "
    "the same text (the Python standard library's sources by default), print how they compare "
    "and write a report folder with plots."
)

PRESETS = {
    "default": dict(
        steps=800,
        eval_every=25,
        d_model=128,
        layers=4,
        ffn_hidden=512,
        seq_len=128,
        batch_size=16,
        eval_batches=8,
    ),
    "tiny": dict(
        steps=30,
        eval_every=10,
        d_model=32,
        layers=2,
        ffn_hidden=64,
        seq_len=32,
        batch_size=4,
        eval_batches=2,
    ),
    "large": dict(
        steps=3000,
        eval_every=50,
        d_model=192,
        layers=6,
        ffn_hidden=768,
        seq_len=256,
        batch_size=16,
        eval_batches=16,
    ),
}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="size of the run (default: about 6-7 minutes on 2 CPU cores)",
    )
    for name in (
        "steps",
        "eval_every",
        "d_model",
        "layers",
        "ffn_hidden",
        "seq_len",
        "batch_size",
        "eval_batches",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help="override the preset"
        )
    parser.add_argument("--experts", type=int, default=8, help="routed experts E")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate (benchmarks/sweep_demo.py)"
    )
    parser.add_argument(
        "--moe-lr", type=float, default=None, help="the MoE's peak learning rate (default: --lr)"
    )
    parser.add_argument(
        "--shared-hidden",
        type=int,
        default=0,
        help="width of a shared expert in the MoE (taken from the routed experts' budget)",
    )
    parser.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="use capacity mode with this factor (default: dropless)",
    )
    parser.add_argument(
        "--data", default=None, help="text file, folder or JSON-lines file (default: Python stdlib)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--out-dir", default="runs/demo", help="run folders (replaced on each demo run)"
    )
    parser.add_argument("--report-dir", default="reports/demo", help="plots and summary.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def demo_train_configs(
    preset: dict[str, int],
    *,
    experts: int = 8,
    top_k: int = 2,
    shared_hidden: int = 0,
    heads: int = 4,
    lr: float = 2e-3,
    moe_lr: float | None = None,
    seed: int = 0,
    data: str | None = None,
    capacity_factor: float | None = None,
    out_dir: Path = Path("runs/demo"),
) -> tuple[TrainConfig, TrainConfig]:
    """The demo's dense model and its MoE twin (same active parameters per token), as training
    configs writing to ``out_dir/dense`` and ``out_dir/moe``; ``moe_lr`` defaults to ``lr``."""
    overrides = [
        f"steps={preset['steps']}",
        f"eval_every={preset['eval_every']}",
        f"eval_batches={preset['eval_batches']}",
        "log_every=10",
        f"seed={seed}",
        f"model.d_model={preset['d_model']}",
        f"model.n_layers={preset['layers']}",
        f"model.attention.n_heads={heads}",
        f"model.ffn_hidden={preset['ffn_hidden']}",
        f"model.max_seq_len={preset['seq_len']}",
        f"data.seq_len={preset['seq_len']}",
        f"data.batch_size={preset['batch_size']}",
        f"optim.warmup_steps={max(1, preset['steps'] // 20)}",
    ]
    if data is not None:
        overrides.append(f"data.path={data}")
    dense_cfg = load_train_config(
        None, [*overrides, f"optim.lr={lr}", f"out_dir={out_dir / 'dense'}"]
    )
    capacity = None
    if capacity_factor is not None:
        capacity = DispatchConfig(
            mode=DispatchMode.CAPACITY,
            capacity_factor=capacity_factor,
            drop_priority=DropPriority.TOKEN,
        )
    moe_overrides = [*overrides, f"optim.lr={moe_lr or lr}", f"out_dir={out_dir / 'moe'}"]
    moe_cfg = moe_twin(
        load_train_config(None, moe_overrides),
        experts,
        top_k,
        dispatch=capacity,
        shared_hidden=shared_hidden,
    )
    return dense_cfg, moe_cfg


def run(args: argparse.Namespace) -> int:
    try:  # fail now, not after minutes of training
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "moekit demo: the report needs matplotlib: pip install 'moekit[report]'"
        ) from None
    preset = dict(PRESETS[args.preset])
    for key in preset:
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    out_dir = Path(args.out_dir)
    dense_cfg, moe_cfg = demo_train_configs(
        preset,
        experts=args.experts,
        top_k=args.top_k,
        shared_hidden=args.shared_hidden,
        heads=args.heads,
        lr=args.lr,
        moe_lr=args.moe_lr,
        seed=args.seed,
        data=args.data,
        capacity_factor=args.capacity_factor,
        out_dir=out_dir,
    )
    for cfg in (dense_cfg, moe_cfg):
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
    dense_params, moe_params = param_reports(dense_cfg, moe_cfg)
    print(
        f"Training dense and MoE ({args.experts} experts, top-{args.top_k}) byte-level LMs "
        f"for {preset['steps']} steps each on "
        f"{args.data or 'the Python standard library sources'}."
    )
    dense = train(dense_cfg, progress=not args.quiet, desc="dense")
    moe = train(moe_cfg, progress=not args.quiet, desc="moe")
    comparison = Comparison(dense, moe, dense_params, moe_params)
    print()
    print(comparison.table())
    settings = {
        **preset,
        "experts": args.experts,
        "top_k": args.top_k,
        "lr": args.lr,
        "moe_lr": args.moe_lr or args.lr,
        "shared_hidden": args.shared_hidden,
        "capacity_factor": args.capacity_factor or "dropless",
        "seed": args.seed,
    }
    summary = write_demo_report(comparison, Path(args.report_dir), settings)
    print(f"\nReport: {summary} (plots beside it)")
    return 0
