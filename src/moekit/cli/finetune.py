"""``moekit finetune``: continue a trained model on new data, training only what you choose."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.cli.train import add_overrides_argument

HELP = (
    "Fine-tune a moekit run or a Hugging Face model: parameter-group presets (ST-MoE's all / "
    "non_moe / moe / attention / ffn, and router, shared_experts, experts:<selection>, ...), "
    "LoRA on attention and the stacked experts, expert dropout, instruction tuning with "
    "responses-only loss; writes a run folder like moekit train."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="from_run", help="a moekit run or checkpoint folder")
    source.add_argument("--from-hf", help="a Hugging Face model folder (with its tokenizer)")
    parser.add_argument(
        "--preset", default="", help="parameters to train, e.g. ffn or attention+router"
    )
    parser.add_argument("--lora-rank", type=int, default=0, help="add LoRA adapters of this rank")
    parser.add_argument(
        "--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (alpha / rank)"
    )
    parser.add_argument(
        "--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input"
    )
    parser.add_argument(
        "--lora-targets", default="attention,experts", help="comma-separated LoRA targets"
    )
    parser.add_argument(
        "--expert-dropout",
        type=float,
        default=None,
        help="dropout inside the routed experts (default: the source's, usually 0)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="text, folder or JSON lines (default: the embedded standard-library text)",
    )
    parser.add_argument(
        "--instruction",
        action="store_true",
        help="instruction tuning: --data is JSON lines of prompt/response or messages "
        "(default: the embedded standard-library set), loss on responses only",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    parser.add_argument("--out-dir", required=True, help="run folder")
    add_overrides_argument(parser, "any other TrainConfig value, e.g. --set data.seq_len=256")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument(
        "--export-hf",
        default=None,
        metavar="DIR",
        help="also write the result (adapters merged) as a Hugging Face folder of the source's "
        "family (with --from-hf)",
    )
    parser.add_argument(
        "--export-peft",
        default=None,
        metavar="DIR",
        help="also write the LoRA adapters in the PEFT format for the --from-hf model "
        "(peft.PeftModel.from_pretrained loads them); LoRA-only runs",
    )
    parser.add_argument(
        "--peft-layout",
        default="peft",
        choices=("peft", "peft-0.18", "per-expert"),
        help="expert factors in --export-peft: 'peft' (PEFT 0.19.1 and later), 'peft-0.18' "
        "(PEFT 0.18.0-0.19.0), 'per-expert' (each expert's projections, what vLLM serves)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace):
    """The TrainConfig of the fine-tuning run: the source's architecture, these settings."""
    from moekit.training.config import TrainConfig, apply_overrides
    from moekit.training.finetune import load_source
    from moekit.utils.serialization import config_from_dict, config_to_dict

    source_path = args.from_run or args.from_hf
    model_config = load_source(source_path).config
    data: dict = {
        "model": config_to_dict(model_config),
        "steps": args.steps,
        "out_dir": args.out_dir,
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 20)},
        "data": {"path": args.data, "instruction": args.instruction},
        "finetune": {"init_from": source_path, "preset": args.preset},
    }
    if args.from_hf is not None:
        data["data"]["tokenizer"] = _tokenizer_folder(Path(args.from_hf))
    else:  # a second stage reads the tokens the first one did (its copy of the tokenizer)
        from moekit.training.tokenizer_files import find_tokenizer_folder

        found = find_tokenizer_folder(args.from_run)
        data["data"]["tokenizer"] = None if found is None else str(found.resolve())
    if args.lora_rank:
        data["finetune"]["lora"] = {
            "rank": args.lora_rank,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "targets": [t.strip() for t in args.lora_targets.split(",") if t.strip()],
        }
    if args.expert_dropout is not None:
        # a decoder-only model has one placement, an encoder–decoder one per stack
        layers = [
            data["model"][name]["layer"]
            for name in ("moe", "encoder_moe", "decoder_moe")
            if name in data["model"] and data["model"][name]["layer"] is not None
        ]
        if not layers:
            raise ValueError("--expert-dropout needs a model with MoE layers")
        for layer in layers:
            layer["experts"]["dropout"] = args.expert_dropout
    _balance_by_default(data["model"])
    apply_overrides(data, args.overrides)
    return config_from_dict(TrainConfig, data)


#: the Switch loss weight a fine-tune gets when its source has no balancing at all: the Switch
#: Transformer's alpha (and ST-MoE's fine-tuning setting), 1% of the loss at a uniform router
FINETUNE_SWITCH_WEIGHT = 0.01


def _balance_by_default(model: dict) -> None:
    """MoE layers imported without any balancing (no auxiliary loss, no bias balancing) get the
    Switch loss at ``FINETUNE_SWITCH_WEIGHT``, said on stderr: fine-tuning without it collapses
    routing unnoticed (``--set model.moe.layer.aux_loss.switch=0`` turns it off)."""
    import sys

    for name in ("moe", "encoder_moe", "decoder_moe"):
        layer = (model.get(name) or {}).get("layer")
        if layer is None:
            continue
        aux, router = layer.get("aux_loss") or {}, layer.get("router") or {}
        weights = [aux.get(k) or 0.0 for k in ("switch", "switch_sequence", "load", "importance")]
        if any(weights) or router.get("bias_balancing"):
            continue
        layer["aux_loss"] = {**aux, "switch": FINETUNE_SWITCH_WEIGHT}
        print(
            f"fine-tuning with the Switch balancing loss at {FINETUNE_SWITCH_WEIGHT} in "
            f"{name} (the source has none; --set model.{name}.layer.aux_loss.switch=0 turns "
            "it off)",
            file=sys.stderr,
        )


def _tokenizer_folder(folder: Path) -> str:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        raise ValueError(
            f"{folder} holds no tokenizer (tokenizer.json or tokenizer_config.json); pass one "
            "with --set data.tokenizer=FOLDER"
        )
    return str(folder)


def _check_exports(args: argparse.Namespace) -> None:
    if args.export_hf is not None and args.from_hf is None:
        raise ValueError("--export-hf writes back to the source's family: use it with --from-hf")
    if args.export_peft is None:
        return
    if args.from_hf is None:
        raise ValueError("--export-peft needs --from-hf: PEFT adapters belong to an HF model")
    if not args.lora_rank:
        raise ValueError("--export-peft writes LoRA adapters: give --lora-rank")
    if args.preset:
        raise ValueError(
            f"--export-peft writes LoRA adapters only, but --preset {args.preset} also trains "
            "whole weights, which a PEFT adapter cannot carry: drop --preset (train LoRA only) "
            "or drop --export-peft (--export-hf writes the merged model)"
        )


def run(args: argparse.Namespace) -> int:
    from moekit.training import train_any as train
    from moekit.training.presets import format_summary

    _check_exports(args)  # before the long work: a conflict found after training loses it
    config = build_config(args)
    result = train(config, resume=args.resume, progress=not args.quiet, desc="finetune")
    summary = format_summary(result.trainable)
    print(summary)
    (Path(config.out_dir) / "parameters.txt").write_text(summary + "\n")
    if result.evals:
        step, loss = result.evals[-1]
        print(f"step {step}: validation loss {loss:.4f}")
    if args.export_peft is not None:
        from moekit.interop.peft_adapters import export_peft_adapter

        if args.from_hf is None:
            raise ValueError("--export-peft needs --from-hf: PEFT adapters belong to an HF model")
        export_peft_adapter(result.model, args.from_hf, args.export_peft, layout=args.peft_layout)
        print(
            f"wrote {args.export_peft} (PEFT LoRA adapter for {args.from_hf}, "
            f"{args.peft_layout} layout)"
        )
    if args.export_hf is not None:
        _export(result.model, args, config)
    print(f"run folder: {result.out_dir}")
    return 0


def _export(model, args: argparse.Namespace, config) -> None:
    from moekit.interop.hf import to_hf
    from moekit.training.finetune import base_state_dict

    if args.from_hf is None:
        raise ValueError("--export-hf writes back to the source's family: use it with --from-hf")
    family = json.loads((Path(args.from_hf) / "config.json").read_text())["model_type"]
    from moekit.adapters.lora import merge_lora
    from moekit.training.tokenizer_files import copy_tokenizer, find_tokenizer_folder

    merge_lora(model)
    plain = type(model)(model.config)  # a TransformerLM or an EncoderDecoderLM
    plain.load_state_dict(base_state_dict(model), strict=True)
    folder = to_hf(plain.eval(), args.export_hf, family)
    copy_tokenizer(find_tokenizer_folder(args.from_hf), folder)  # one list of its files
    print(f"wrote {args.export_hf} ({family}, adapters merged)")
