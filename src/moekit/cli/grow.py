"""``moekit grow``: a run's MoE grown to m times the experts, ready to resume training."""

from __future__ import annotations

import argparse

HELP = (
    "Expert upcycling mid-training (arXiv 2604.19835): copy a run's latest checkpoint into a new "
    "run whose MoE layers have --factor times the experts (each expert duplicated, router "
    "extended, top-k kept), with the optimizer state carried over; resume it with moekit train."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a moekit run folder (its latest checkpoint is grown)")
    parser.add_argument("destination", help="the new run folder (must not hold checkpoints)")
    parser.add_argument("--factor", type=int, default=2, help="copies of each expert (m >= 2)")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.01,
        help="noise on the copies' router rows, relative to each row's standard deviation",
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path
    from typing import Any, cast

    from safetensors.torch import load_file

    from moekit.cli.train import printed_config
    from moekit.models.sharded_checkpoint import is_sharded
    from moekit.training.checkpoint import (
        OPTIMIZER_FILE,
        STATE_FILE,
        align_optimizer_state,
        latest_checkpoint,
        load_training_checkpoint,
        parameter_names,
        refuse_to_overwrite,
        restore_param_groups,
        save_training_checkpoint,
    )
    from moekit.training.config import TrainConfig
    from moekit.training.grow import grow_config, grow_experts, grow_optimizer_state
    from moekit.training.optim import build_optimizer, build_scheduler
    from moekit.training.tokenizer_files import (
        RUN_TOKENIZER_DIR,
        copy_tokenizer,
        find_tokenizer_folder,
    )
    from moekit.utils.serialization import atomic_write_bytes, config_from_dict, config_to_dict

    folder = latest_checkpoint(Path(args.run) / "checkpoints")
    if folder is None:
        raise ValueError(f"{args.run} has no checkpoint to grow (checkpoints/latest)")
    if is_sharded(folder):
        raise ValueError(
            f"{folder} is a sharded checkpoint: write a single-process one first with "
            f"moekit consolidate {folder} OUT, or grow a run trained in one process"
        )
    destination = Path(args.destination)
    refuse_to_overwrite(destination / "checkpoints")
    saved = json.loads((folder / STATE_FILE).read_text())["train_config"]
    config = config_from_dict(TrainConfig, saved)
    model_state, optimizer_state, trainer_state = load_training_checkpoint(folder, config.model)
    model = config.model.build()
    model.load_state_dict(model_state)
    optimizer = build_optimizer(model, config.optim, fused=False)
    optimizer.load_state_dict(
        align_optimizer_state(optimizer_state, parameter_names(model, optimizer))
    )
    grown, sources = grow_experts(model, args.factor, noise=args.noise, seed=config.seed)
    grown_config = dataclasses.replace(
        config, model=grow_config(config.model, args.factor), out_dir=str(destination)
    )
    new_optimizer = build_optimizer(grown, config.optim, fused=False)
    grow_optimizer_state(model, optimizer, grown, new_optimizer, sources)
    restore_param_groups(new_optimizer, optimizer_state["param_groups"])
    scheduler = build_scheduler(new_optimizer, config.steps, config.optim)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng = {k: v for k, v in load_file(str(folder / OPTIMIZER_FILE)).items() if k.startswith("rng.")}
    written = save_training_checkpoint(
        destination / "checkpoints",
        trainer_state["step"],
        grown,
        new_optimizer.state_dict(),
        scheduler,
        config_to_dict(grown_config),
        rng,
        param_names=parameter_names(grown, new_optimizer),
    )
    atomic_write_bytes(destination / "config.toml", printed_config(grown_config).encode())
    copy_tokenizer(find_tokenizer_folder(args.run), destination / RUN_TOKENIZER_DIR)
    layer = cast(Any, grown_config.model).moe.layer
    print(
        f"wrote {written}: step {trainer_state['step']}, {layer.num_experts} experts per MoE "
        f"layer (top-{layer.top_k}); resume with: moekit train --config "
        f"{destination / 'config.toml'} --resume"
    )
    return 0
