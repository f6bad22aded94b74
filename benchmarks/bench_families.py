"""Forward and forward+backward time of models imported from Hugging Face against the same model
in ``transformers`` (CPU, fp32), one row per family of issue 23, with the logits' max difference.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_families.py [--repeats 5] [--families a,b]``.
Each family is a random config of the same shape (d_model 256, 4 layers, 16 experts, top-2 where
the family lets k be chosen, 4 x 256 tokens); the two models are timed alternately in one process
(the median of ``--repeats`` calls each), so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from moekit.interop import from_hf

SHAPE = dict(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

FAMILIES = {
    "dots1": (
        "Dots1",
        dict(
            intermediate_size=512,
            moe_intermediate_size=256,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            head_dim=32,
        ),
    ),
    "glm4_moe": (
        "Glm4Moe",
        dict(
            intermediate_size=512,
            moe_intermediate_size=256,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            head_dim=32,
        ),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1",
        dict(intermediate_size=256, num_experts=16, moe_topk=2, head_dim=32),
    ),
    "minimax_m2": (
        "MiniMaxM2",
        dict(intermediate_size=256, num_local_experts=16, num_experts_per_tok=2, head_dim=32),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_Moe",
        dict(
            intermediate_size=512,
            moe_intermediate_size=256,
            moe_num_experts=16,
            moe_num_shared_experts=1,
            moe_k=2,
            head_dim=32,
        ),
    ),
    "granitemoe": (
        "GraniteMoe",
        dict(intermediate_size=256, num_local_experts=16, num_experts_per_tok=2),
    ),
    "phimoe": ("Phimoe", dict(intermediate_size=256, num_local_experts=16, num_experts_per_tok=2)),
    "llama4_text": (
        "Llama4Text",
        dict(
            intermediate_size=256,
            intermediate_size_mlp=512,
            num_local_experts=16,
            num_experts_per_tok=2,
            head_dim=32,
            attention_chunk_size=128,
        ),
    ),
    "flex_olmo": (
        "FlexOlmo",
        dict(intermediate_size=256, num_experts=16, num_experts_per_tok=2, pad_token_id=None),
    ),
}


def _hf_model(name: str):
    prefix, options = FAMILIES[name]
    config = getattr(transformers, f"{prefix}Config")(**SHAPE, **options)
    model_class = (
        transformers.Llama4ForCausalLM
        if name == "llama4_text"
        else getattr(transformers, f"{prefix}ForCausalLM")
    )
    torch.manual_seed(0)
    return model_class(config).eval()


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    tokens = torch.randint(
        0, SHAPE["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(0)
    )
    rows = []
    for name in args.families.split(","):
        hf = _hf_model(name)
        ours = from_hf(hf).eval()
        with torch.no_grad():
            diff = float((ours(tokens).logits - hf(tokens).logits).abs().max())

        rows.append(_time_pair(name, ours, hf, lambda m: m(tokens).logits, diff, args.repeats))
    if "switch_transformers" in args.families.split(",") or args.families == ",".join(FAMILIES):
        rows.append(_switch(args.repeats))


def _time_pair(name, ours, hf, logits_of, diff: float, repeats: int) -> dict:
    """Forward and forward+backward medians of both models, timed alternately."""

    def forward(model):
        with torch.no_grad():
            logits_of(model)

    def train_step(model):
        model.zero_grad(set_to_none=True)
        logits_of(model).float().square().mean().backward()

    result = {"family": name, "max_abs_logit_diff": diff}
    for label, step in (("forward", forward), ("fwd_bwd", train_step)):
        ours_s, hf_s = [], []
        for _ in range(repeats):  # alternate: noise hits both
            ours_s.append(_median_seconds(lambda step=step: step(ours), 1))
            hf_s.append(_median_seconds(lambda step=step: step(hf), 1))
        o, h = statistics.median(ours_s), statistics.median(hf_s)
        result[f"{label}_moekit_ms"] = round(o * 1000, 1)
        result[f"{label}_transformers_ms"] = round(h * 1000, 1)
        result[f"{label}_speedup"] = round(h / o, 2)
    print(json.dumps(result), flush=True)
    return result


def _switch(repeats: int) -> dict:
    """The Switch Transformer: 4 x 256 encoder tokens, 4 x 128 decoder tokens, capacity 64."""
    config = transformers.SwitchTransformersConfig(
        vocab_size=1024,
        d_model=256,
        d_kv=32,
        d_ff=512,
        num_heads=8,
        num_layers=4,
        num_decoder_layers=4,
        num_experts=16,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        expert_capacity=64,
    )
    torch.manual_seed(0)
    hf = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    ours = from_hf(hf).eval()
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(0, 1024, (4, 256), generator=generator)
    target = torch.randint(0, 1024, (4, 128), generator=generator)

    def logits_of(model):
        if model is hf:
            return model(input_ids=source, decoder_input_ids=target).logits
        return model(source, decoder_tokens=target).logits

    with torch.no_grad():
        diff = float((logits_of(ours) - logits_of(hf)).abs().max())
    return _time_pair("switch_transformers", ours, hf, logits_of, diff, repeats)


if __name__ == "__main__":
    main()
