"""``moekit generate``: text from a prompt with a trained checkpoint."""

from __future__ import annotations

import argparse
from typing import cast

HELP = "Generate text from a prompt with a checkpoint (greedy or sampled, KV-cached)."


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder, or a run folder (uses latest)")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k best")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--experts-per-token",
        type=int,
        default=None,
        metavar="K",
        help="route each token to K experts instead of the trained k (token-choice routers)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.models.checkpoint import from_pretrained
    from moekit.models.transformer.generate import generate
    from moekit.models.transformer.model import TransformerLM
    from moekit.training.checkpoint import resolve_checkpoint
    from moekit.training.data import ByteTokenizer

    model = cast(TransformerLM, from_pretrained(resolve_checkpoint(args.checkpoint)))
    model.eval()
    if args.experts_per_token is not None:
        from moekit.layers.switches import set_top_k

        set_top_k(model, args.experts_per_token)
    tokenizer = ByteTokenizer()
    prompt = torch.tensor(tokenizer.encode(args.prompt), dtype=torch.long)
    out = cast(  # a tensor prompt gives a tensor
        torch.Tensor,
        generate(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=torch.Generator(model.embed.weight.device).manual_seed(args.seed),
        ),
    )
    print(tokenizer.decode(out.tolist()))
    return 0
