"""``moekit generate``: text from a prompt with a trained checkpoint."""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument(
        "--expert-budget",
        default=None,
        metavar="SIZE",
        help="keep the routed experts in the checkpoint file and at most SIZE of them in memory "
        "(64KB, 512MB, 2GB: powers of 1000; 512MiB, 2GiB: powers of 1024); the tokens are the "
        "same as with every expert resident",
    )
    parser.add_argument(
        "--expert-policy",
        choices=("lru", "lfu"),
        default="lru",
        help="which cached expert leaves first under --expert-budget",
    )
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="under --expert-budget, read the next layer's experts ahead as its router predicts "
        "them from this layer's input (measured slower on the CPU: docs/quantization.md)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.models.checkpoint import from_pretrained
    from moekit.models.encoder_decoder import EncoderDecoderLM
    from moekit.models.transformer.generate import generate
    from moekit.models.transformer.model import TransformerLM
    from moekit.training.checkpoint import resolve_checkpoint
    from moekit.training.data import ByteTokenizer

    folder = resolve_checkpoint(args.checkpoint)
    model: TransformerLM | EncoderDecoderLM
    if args.expert_budget is not None:
        from moekit.models.offload import load_offloaded

        model = load_offloaded(
            folder,
            budget=args.expert_budget,
            policy=args.expert_policy,
            prefetch=args.prefetch,
        )
    else:
        model = cast(TransformerLM | EncoderDecoderLM, from_pretrained(folder))
    model.eval()
    if args.experts_per_token is not None:
        from moekit.layers.switches import set_top_k

        set_top_k(model, args.experts_per_token)
    tokenizer = ByteTokenizer()
    prompt = torch.tensor(tokenizer.encode(args.prompt), dtype=torch.long)
    if isinstance(model, EncoderDecoderLM):  # the prompt is the encoder's input
        from moekit.models.encoder_decoder import generate_seq2seq

        decoded = generate_seq2seq(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=torch.Generator(model.embed.weight.device).manual_seed(args.seed),
        )
        print(args.prompt + tokenizer.decode(decoded[1:].tolist()))
        return 0
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
    cache = getattr(model, "expert_cache", None)
    if cache is not None:
        cache.close()
        stats = cache.stats
        print(
            f"expert cache: hit rate {stats.hit_rate:.1%} ({stats.hits} hits, {stats.misses} "
            f"misses, {stats.prefetch_hits}/{stats.prefetched} prefetches used), peak "
            f"{stats.peak_bytes / 2**20:.2f} MiB of a {cache.budget_bytes / 2**20:.2f} MiB budget",
            file=sys.stderr,
        )
    return 0
