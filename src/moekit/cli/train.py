"""``moekit train``: train a language model from a config file plus overrides."""

from __future__ import annotations

import argparse

HELP = "Train a moekit language model from a TOML/YAML/JSON config with key=value overrides."


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``; train and finetune take it."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="TOML, YAML or JSON training config (see --print-config and examples/)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the full config (defaults, then --config and --set applied) as TOML with "
        "a comment per key, and exit",
    )
    add_overrides_argument(
        parser,
        "override a config value, e.g. --set optim.lr=1e-3 --set model.moe.layer.num_experts=8",
    )
    parser.add_argument("--out-dir", default=None, help="run folder (overrides out_dir)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from <out_dir>/checkpoints/latest"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--expert-parallel",
        "--ep",
        dest="expert_parallel",
        type=int,
        default=None,
        metavar="N",
        help="split each MoE layer's experts over N ranks (parallel.ep); N must divide "
        "--dp-shard, which defaults to every rank",
    )
    parser.add_argument(
        "--dp-shard",
        type=int,
        default=None,
        metavar="N",
        help="shard the weights with FSDP2 over N ranks (parallel.dp_shard; default: the world "
        "/ --dp-replicate)",
    )
    parser.add_argument(
        "--dp-replicate",
        type=int,
        default=None,
        metavar="N",
        help="replicate the sharded model N times (parallel.dp_replicate, HSDP)",
    )


def printed_config(config) -> str:
    """``config`` as commented TOML; a dense model shows an example MoE layer, commented out."""
    from moekit.models.transformer.model import TransformerConfig
    from moekit.training.config import example_moe_layer
    from moekit.utils.config_docs import config_toml

    examples = {}
    header = "moekit training config (moekit train --config FILE)."
    if isinstance(config.model, TransformerConfig) and config.model.moe.layer is None:
        examples["model.moe.layer"] = example_moe_layer(config.model)
        header += (
            " The model is dense: [model.moe.layer] is unset. Uncomment that section (an example "
            "of 8 experts, top-2) or --set model.moe.layer.num_experts=8 to make it an MoE."
        )
    return config_toml(config, header=header, examples=examples)


def run(args: argparse.Namespace) -> int:
    import torch.distributed

    from moekit.training import train_any as train
    from moekit.training.config import load_train_config

    overrides = list(args.overrides)
    if args.out_dir is not None:
        overrides.append(f"out_dir={args.out_dir}")
    for flag, key in (
        ("expert_parallel", "ep"),
        ("dp_shard", "dp_shard"),
        ("dp_replicate", "dp_replicate"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"parallel.{key}={getattr(args, flag)}")
    config = load_train_config(args.config, overrides)
    if args.print_config:
        print(printed_config(config), end="")
        return 0
    result = train(config, resume=args.resume, progress=not args.quiet)
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.barrier()  # no rank closes its connections while a peer still uses them
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    if result.search is not None:
        trained = [t for t in result.search.trials if t.error is None]
        for trial in sorted(trained, key=lambda t: t.val_loss):
            print(f"candidate {trial.choices}: validation loss {trial.val_loss:.4f}")
        print(f"trained the best: {result.search.best.choices}")
    if result.evals:
        step, loss = result.evals[-1]
        print(f"step {step}: validation loss {loss:.4f}")
    print(f"run folder: {result.out_dir} ({result.tokens_per_second:,.0f} tokens/s)")
    return 0
