"""Time the MoE layer of this checkout against an earlier git revision, in one process.

Runs on separate processes (or separate days) differ by 10-15% on these shared machines, more
than most changes; this script imports both versions side by side (the old one renamed to
``moekit_old`` from ``git archive``), builds both layers with the same seed and alternates
forward+backward steps, reporting the median of per-round ratios (new / old).

    python benchmarks/compare_revisions.py HEAD~5
    python benchmarks/compare_revisions.py 6116363 --tokens 4096 16384 --experts 8 64 --rounds 6
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def import_revision(revision: str, root: Path):
    """``moekit`` as of ``revision``, importable as ``moekit_old``."""
    archive = root / "old.tar"
    subprocess.run(
        ["git", "archive", "-o", str(archive), revision, "src/moekit"], check=True, cwd=REPO
    )
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    package = root / "moekit_old"
    (root / "src" / "moekit").rename(package)
    for path in package.rglob("*.py"):
        text = re.sub(r"\bmoekit(?=[. ])", "moekit_old", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(root))
    import moekit_old

    return moekit_old


def layer(mk, experts: int):
    torch.manual_seed(0)
    return mk.MoEConfig(
        num_experts=experts,
        top_k=2,
        experts=mk.ExpertConfig(hidden=1024),
        aux_loss=mk.AuxLossConfig(switch=0.0),
    ).build(d_model=512)


def step(moe, x: torch.Tensor) -> float:
    start = time.perf_counter()
    moe(x).output.sum().backward()
    for p in moe.parameters():
        p.grad = None
    return time.perf_counter() - start


REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the earlier revision (commit, tag, HEAD~n)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "src"))
    import moekit

    with tempfile.TemporaryDirectory() as tmp:
        old_moekit = import_revision(args.revision, Path(tmp))
        print(f"new = this checkout, old = {args.revision}; fp32, {args.threads} threads")
        for tokens in args.tokens:
            for experts in args.experts:
                new, old = layer(moekit, experts), layer(old_moekit, experts)
                x = torch.randn(tokens, 512)
                step(new, x), step(old, x)  # warm-up
                ratios = [step(new, x) / step(old, x) for _ in range(args.rounds)]
                print(
                    f"{tokens:>6} tokens x {experts:>3} experts: fwd+bwd new/old "
                    f"{statistics.median(ratios):.3f} (rounds {min(ratios):.2f}-{max(ratios):.2f})"
                )


if __name__ == "__main__":
    main()
