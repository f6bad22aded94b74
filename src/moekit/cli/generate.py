"""``moekit generate``: text from a prompt with a trained checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

HELP = "Generate text from a prompt with a checkpoint (greedy or sampled, KV-cached)."


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a run folder (uses its latest checkpoint), a checkpoint folder, "
        "checkpoints/latest, or a Hugging Face folder",
    )
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        help="tokens to generate at most (bytes for a byte-level model); cut, with a message, "
        "where the model's context ends",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="read --prompt as a user message: apply the tokenizer's chat template (moekit's "
        "byte template for byte-level models) and stop at the end of the answer",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="FOLDER",
        help="a Hugging Face tokenizer folder, or 'bytes' (default: the one saved with the model)",
    )
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
        "--compile-step",
        action="store_true",
        help="decode with a fixed-shape cache and the step compiled once (torch.compile; a CUDA "
        "graph per step on CUDA; compiling takes a while and gains little on a CPU)",
    )
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="under --expert-budget, read the next layer's experts ahead as its router predicts "
        "them from this layer's input (measured slower on the CPU: docs/quantization.md)",
    )


def _chat_prompt(tokenizer, text: str) -> list[int]:
    """The prompt of a one-turn chat ready for the answer."""
    from moekit.training.data import ByteTokenizer
    from moekit.training.instruct import BYTE_CHAT_TEMPLATE

    if isinstance(tokenizer, ByteTokenizer) or not tokenizer.chat_template:
        if not isinstance(tokenizer, ByteTokenizer):
            raise ValueError("--chat: this tokenizer has no chat template")
        header = BYTE_CHAT_TEMPLATE["header"]
        rendered = header.format(role="user") + text + BYTE_CHAT_TEMPLATE["end"]
        return tokenizer.encode(rendered + header.format(role="assistant"))
    messages = [{"role": "user", "content": text}]
    ids = tokenizer.tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _stop_token(tokenizer) -> int | None:
    """The end-of-sequence id of a Hugging Face tokenizer (``None`` for bytes)."""
    inner = getattr(tokenizer, "tokenizer", None)
    eos = getattr(inner, "eos_token_id", None)
    return int(eos) if isinstance(eos, int) else None


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.models.encoder_decoder import EncoderDecoderLM
    from moekit.models.transformer.generate import generate
    from moekit.models.transformer.model import TransformerLM
    from moekit.training.checkpoint import resolve_checkpoint
    from moekit.training.data import ByteTokenizer
    from moekit.training.finetune import is_hf_folder, load_source
    from moekit.training.instruct import BYTE_CHAT_TEMPLATE
    from moekit.training.tokenizer_files import resolve_tokenizer

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model: TransformerLM | EncoderDecoderLM
    if args.expert_budget is not None:
        from moekit.models.offload import load_offloaded

        if is_hf_folder(Path(args.checkpoint)):
            raise ValueError(
                "--expert-budget reads experts from a moekit checkpoint: convert the Hugging "
                f"Face folder first (moekit convert {args.checkpoint} OUT --to moekit)"
            )
        model = load_offloaded(
            resolve_checkpoint(args.checkpoint),
            budget=args.expert_budget,
            policy=args.expert_policy,
            prefetch=args.prefetch,
        )
    else:
        model = load_source(args.checkpoint)
    model.eval()
    if args.experts_per_token is not None:
        from moekit.layers.switches import set_top_k

        set_top_k(model, args.experts_per_token)
    tokenizer = resolve_tokenizer(args.checkpoint, model.config.vocab_size, args.tokenizer)
    ids = _chat_prompt(tokenizer, args.prompt) if args.chat else tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt is empty after tokenisation: give some text")
    prompt = torch.tensor(ids, dtype=torch.long)
    stop = _stop_token(tokenizer) if args.chat else None
    generator = torch.Generator(model.embed.weight.device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if isinstance(model, EncoderDecoderLM):  # the prompt is the encoder's input
        from moekit.models.encoder_decoder import generate_seq2seq

        if args.compile_step:
            raise ValueError(
                "--compile-step is for decoder-only models (this is an encoder-decoder)"
            )

        decoded = generate_seq2seq(
            model, prompt, args.max_new_tokens, generator=generator, **sampling
        )
        new = decoded[1:].tolist()
    else:
        room = model.config.max_seq_len - len(ids)
        if room <= 0:
            raise ValueError(
                f"the prompt is {len(ids)} tokens, the model's context max_seq_len is "
                f"{model.config.max_seq_len}: shorten --prompt"
            )
        if args.max_new_tokens > room:
            print(
                f"--max-new-tokens {args.max_new_tokens} cut to {room}: the prompt's {len(ids)} "
                f"tokens leave {room} of the model's {model.config.max_seq_len}-token context",
                file=sys.stderr,
            )
        out = cast(  # a tensor prompt gives a tensor
            torch.Tensor,
            generate(
                model,
                prompt,
                min(args.max_new_tokens, room),
                stop_token=stop,
                generator=generator,
                compile_step=args.compile_step,
                **sampling,
            ),
        )
        new = out[len(ids) :].tolist()
    if stop is not None and stop in new:
        new = new[: new.index(stop)]
    text = tokenizer.decode(new)
    if args.chat:
        if isinstance(tokenizer, ByteTokenizer):  # the byte template ends a turn with a marker
            text = text.split(BYTE_CHAT_TEMPLATE["end"].strip())[0]
        print(text)
    else:
        print(args.prompt + text)
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
