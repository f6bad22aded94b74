"""Fixed-shape decoding (issue 32): a cache whose next slot lives on the device, attention over
every slot under a mask, so each step has the same shapes and reads nothing on the host. Each
step's logits equal the growing-cache path's, for every token mixer, with left padding; the
step compiles to one graph (no graph break, no recompilation as positions advance)."""

import pytest
import torch

import moekit
from moekit.models.common.attention import AttentionConfig, QKNorm, QueryTemperatureConfig
from moekit.models.common.layout import TokenMixerLayout
from moekit.models.common.mla import MLAConfig
from moekit.models.common.moa import MoAConfig
from moekit.models.transformer import MoEPlacementConfig, TransformerConfig, TransformerLM
from moekit.models.transformer.generate import decode_step, generate
from tests.builders import hybrid_mixers

GQA = AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm=QKNorm.HEAD, sinks=True, sliding_window=4)
VARIANTS = {
    "gqa_window_sinks": dict(attention=GQA),
    "mla": dict(
        attention=MLAConfig(
            n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
        )
    ),
    "moa": dict(attention=MoAConfig(num_experts=4, top_k=2, n_kv_heads=2, head_dim=4)),
    "chunks_and_nope": dict(
        attention=AttentionConfig(n_heads=4, chunk_size=3),
        token_mixers=TokenMixerLayout(
            pattern=["attention", "nope"],
            mixers={
                "nope": AttentionConfig(
                    n_heads=4, rope=None, query_temperature=QueryTemperatureConfig(floor_scale=2)
                )
            },
        ),
    ),
    "hybrid": dict(
        attention=AttentionConfig(n_heads=4, n_kv_heads=1),
        n_layers=4,
        token_mixers=hybrid_mixers(),
    ),
}


def _model(name: str, *, dense: bool = False) -> TransformerLM:
    torch.manual_seed(0)
    options = {"n_layers": 2, **VARIANTS[name]}
    layer = moekit.MoEConfig(num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=8))
    config = TransformerConfig(
        vocab_size=48,
        d_model=16,
        ffn_hidden=32,
        max_seq_len=24,
        moe=MoEPlacementConfig(layer=None if dense else layer),
        **options,
    )
    model = TransformerLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "sinks" in n or "router" in n:
                p.normal_(std=1.0)
    return model


def _prompts():
    torch.manual_seed(1)
    tokens = torch.randint(0, 48, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    return tokens, mask


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_fixed_shape_step_equals_the_growing_cache_step(name):
    model = _model(name)
    tokens, mask = _prompts()
    growing = model.new_kv_cache(2)
    fixed = model.new_kv_cache(2, fixed_shapes=True)
    step = decode_step(model, fixed)
    with torch.no_grad(), moekit.serving(model):
        expected = model(tokens, attention_mask=mask, kv_cache=growing).logits[:, -1]
        got = model(tokens, attention_mask=mask, kv_cache=fixed).logits[:, -1]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for _ in range(5):
            nxt = expected.argmax(-1, keepdim=True)
            expected = model(nxt, kv_cache=growing).logits[:, -1]
            got = step(nxt)[:, -1]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert int(fixed.slot) == growing.length == 11


@pytest.mark.parametrize(
    ("name", "dense", "fullgraph"),
    [("gqa_window_sinks", True, True), ("hybrid", True, True), ("hybrid", False, False)],
)
def test_the_step_compiles_once_and_positions_do_not_recompile(name, dense, fullgraph):
    """Without MoE layers the whole step is one graph (``fullgraph``: a host read would be a
    graph break, an error); with them on the CPU the direct expert path stays eager (a graph
    break by design). Either way advancing positions compile nothing new."""
    model = _model(name, dense=dense)
    tokens, mask = _prompts()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    eager_cache = model.new_kv_cache(2, fixed_shapes=True)
    cache = model.new_kv_cache(2, fixed_shapes=True)
    eager = decode_step(model, eager_cache)
    compiled = decode_step(
        model, cache, compile=True, backend=counting_backend, fullgraph=fullgraph
    )
    torch._dynamo.reset()
    with torch.no_grad(), moekit.serving(model):
        model(tokens, attention_mask=mask, kv_cache=eager_cache)
        model(tokens, attention_mask=mask, kv_cache=cache)
        nxt = tokens[:, -1:].contiguous()
        for i in range(4):
            expected, got = eager(nxt), compiled(nxt)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            nxt = expected[:, -1].argmax(-1, keepdim=True)
            if i == 0:
                first = len(graphs)
    assert len(graphs) == first and (first == 1 or not fullgraph)


def test_the_gathered_direct_path_equals_the_eager_one():
    """What a compiled step runs on a GPU (the chosen experts' weights gathered, batched
    products) equals the eager direct path and the dispatch, values and padding."""
    from moekit.dispatch.direct import direct_experts, direct_experts_gathered

    torch.manual_seed(0)
    layer = moekit.MoEConfig(
        num_experts=6,
        top_k=2,
        experts=moekit.ExpertConfig(hidden=12, bias=True, activation="swiglu"),
    ).build(d_model=8)
    layer.eval()
    x = torch.randn(3, 8)
    mask = torch.tensor([True, False, True])
    routing = layer.router(x)
    used = routing.expert_idx_TK < 6
    used = used & mask.unsqueeze(-1)
    gathered = direct_experts_gathered(
        x, routing.expert_idx_TK, routing.weights_TK, used, layer.experts
    )
    torch.testing.assert_close(
        gathered, direct_experts(x, routing, layer.experts, 6, mask), rtol=1e-6, atol=1e-6
    )
    layer.statistics = True  # the dispatch runs
    torch.testing.assert_close(gathered, layer(x, mask).output, rtol=1e-5, atol=1e-5)


def test_generate_with_a_compiled_step_gives_the_same_tokens(monkeypatch):
    model = _model("gqa_window_sinks")
    tokens, mask = _prompts()
    real_compile = torch.compile

    def eager_compile(fn, **options):  # the graph without code generation (CPU test speed)
        return real_compile(fn, **{**options, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    expected = generate(model, tokens, 6, attention_mask=mask)
    got = generate(model, tokens, 6, attention_mask=mask, compile_step=True)
    assert torch.equal(got, expected)


def test_a_step_needs_a_fixed_shape_cache():
    model = _model("mla")
    with pytest.raises(ValueError, match="fixed_shapes=True"):
        decode_step(model, model.new_kv_cache(1))
