"""``compile = "dense"`` (issue 32, item 3): each block's token mixer and dense feed-forward are
compiled in place (the MoE layers stay eager), parameter names unchanged, and ``moekit train``
gives eager's losses and weights (to float tolerance: the compiler reorders sums)."""

import pytest
import torch

import moekit
from moekit.experts.dense import FeedForward
from moekit.layers.moe import MoE
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.compile import compile_dense_parts
from moekit.models.common.layout import TokenMixerLayout
from moekit.models.mixers import ShortConvConfig
from moekit.models.transformer import MoEPlacementConfig, TransformerConfig, TransformerLM
from moekit.training import load_train_config, train
from tests.builders import TINY_MOE


def _model() -> TransformerLM:
    torch.manual_seed(0)
    layer = moekit.MoEConfig(num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=8))
    return TransformerLM(
        TransformerConfig(
            vocab_size=48,
            d_model=16,
            n_layers=4,
            attention=AttentionConfig(n_heads=4),
            ffn_hidden=32,
            max_seq_len=24,
            moe=MoEPlacementConfig(layer=layer, every=2),
            token_mixers=TokenMixerLayout(
                pattern=["attention", "conv"], mixers={"conv": ShortConvConfig()}
            ),
        )
    )


def test_the_token_mixers_and_dense_ffns_are_compiled_in_place_the_moe_layers_not():
    model = _model()
    keys = list(model.state_dict())
    names = compile_dense_parts(model)
    assert list(model.state_dict()) == keys  # in place: no _orig_mod in any name
    assert set(names) == {f"blocks.{i}.attn" for i in range(4)} | {
        f"blocks.{i}.ffn" for i in range(4) if isinstance(model.blocks[i].ffn, FeedForward)
    }
    assert any(name.endswith("ffn") for name in names)
    for block in model.blocks:
        assert block.attn._compiled_call_impl is not None
        compiled = block.ffn._compiled_call_impl is not None
        assert compiled == (not isinstance(block.ffn, MoE)), type(block.ffn)
        assert all(m._compiled_call_impl is None for m in block.ffn.modules() if isinstance(m, MoE))


@pytest.mark.slow  # about 13 s of compilation
def test_compiled_dense_parts_give_eagers_outputs_and_gradients():
    eager, compiled = _model(), _model()
    compile_dense_parts(compiled)
    tokens = torch.randint(0, 48, (2, 12))
    outs = []
    for model in (eager, compiled):
        out = model(tokens)
        (out.logits.square().mean() + out.aux_loss).backward()
        outs.append(out.logits.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_moekit_train_compiled_equals_eager(tmp_path, tiny_text):
    def run(name, *extra):
        overrides = [*TINY_MOE, "steps=4", *extra, f"data.path={tiny_text}"]
        return train(
            load_train_config(None, [*overrides, f"out_dir={tmp_path / name}"]), progress=False
        )

    eager, compiled = run("eager"), run("compiled", "compile=dense")
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in compiled.records]),
        torch.tensor([r["loss"] for r in eager.records]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_compile_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match="compile must be 'eager' or 'dense'"):
        load_train_config(None, ["compile=all", f"out_dir={tmp_path}"])
