"""The hub stays small (issue 31's measure): the softmax-attention config's fields, the lines of
``Attention.forward``, ``MoE.forward`` and ``TransformerLM.forward`` (the whole function, its
signature and docstring included), no mixer config holding another mixer's options, and no
module attribute carrying a loss."""

import ast
import dataclasses
import inspect
import textwrap

import pytest
import torch

from moekit.experts.bank import ExpertConfig
from moekit.layers import MoE, MoEConfig
from moekit.models.mixers import MIXER_CONFIGS
from moekit.models.transformer import (
    Attention,
    AttentionConfig,
    AttentionMixerConfig,
    MoAConfig,
    MoEPlacementConfig,
    TransformerConfig,
    TransformerLM,
)


def _lines(function) -> int:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = tree.body[0]
    return node.end_lineno - node.lineno + 1


def test_the_hub_is_no_larger_than_before_the_families_grew_it():
    assert len(dataclasses.fields(AttentionConfig)) <= 15
    assert _lines(Attention.forward) <= 75
    assert _lines(MoE.forward) <= 52
    assert _lines(TransformerLM.forward) <= 50


def test_no_mixer_config_holds_another_mixers_options():
    mixers = {**AttentionMixerConfig.registry, **MIXER_CONFIGS}
    for kind, config_class in mixers.items():
        for field in dataclasses.fields(config_class):
            hints = str(field.type)
            others = [other.__name__ for k, other in mixers.items() if k != kind]
            assert not any(name in hints for name in others), (kind, field.name, hints)
            assert field.name not in mixers, (kind, field.name)


def test_no_module_attribute_carries_a_loss():
    config = TransformerConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        attention=MoAConfig(num_experts=4, top_k=2, n_kv_heads=2, head_dim=4),
        ffn_hidden=32,
        moe=MoEPlacementConfig(
            layer=MoEConfig(num_experts=4, top_k=2, experts=ExpertConfig(hidden=8))
        ),
    )
    model = config.build()
    before = {n: set(vars(m)) for n, m in model.named_modules()}
    out = model(torch.randint(0, 32, (2, 5)))
    out.aux_loss.backward()
    for name, module in model.named_modules():
        for attribute in set(vars(module)) - before[name]:
            assert not isinstance(getattr(module, attribute), torch.Tensor), (name, attribute)
        for attribute, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not attribute.startswith("_"):
                assert value.grad_fn is None, (name, attribute)


def test_t5_attention_is_a_sibling_the_decoder_refuses_by_name():
    from moekit.models.common.t5_attention import T5Attention, T5AttentionConfig
    from moekit.models.transformer import TokenMixerLayout

    config = T5AttentionConfig(n_heads=2, head_dim=4)
    assert AttentionMixerConfig.registry["t5"] is T5AttentionConfig
    assert isinstance(config.build(d_model=8), T5Attention)
    with pytest.raises(ValueError, match=r"kind='t5' needs its model's positions"):
        TransformerConfig(
            vocab_size=16,
            d_model=8,
            n_layers=2,
            attention=AttentionConfig(n_heads=2),
            ffn_hidden=16,
            token_mixers=TokenMixerLayout(pattern=["attention", "t5"], mixers={"t5": config}),
        )
    with pytest.raises(ValueError, match=r"attention must be .*\(AttentionConfig\)"):
        TransformerConfig(vocab_size=16, d_model=8, n_layers=1, attention=config, ffn_hidden=16)
