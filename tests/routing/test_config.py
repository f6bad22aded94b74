"""One small config per router family, beside its router, picked by kind."""

import dataclasses

import pytest
import torch

import moekit
from moekit.routing import ROUTER_CONFIGS, Router, RouterKind
from moekit.training import load_train_config
from moekit.utils.serialization import config_to_dict
from moekit.utils.validation import ConfigError

# the options moekit 0.1 used per family, for the legacy round trip
FAMILY_EXAMPLES = {
    "top_k": dict(gating="sigmoid_topk", num_groups=2, topk_groups=1, bias_balancing=True),
    "dense": dict(gate_hidden=6),
    "gshard_top2": dict(second_expert_policy="all"),
    "expert_choice": dict(capacity_factor=1.5),
    "soft": dict(slots_per_expert=2),
    "hash": dict(hash_seed=3),
    "random_static": dict(vocab_size=50),
    "base": dict(sinkhorn_iterations=10),
    "top_p": dict(top_p=0.7),
    "sparsemixer": dict(jitter_eps=0.1),
    "token_table": dict(vocab_size=50, gating="sigmoid_topk"),
    "expert_threshold": dict(capacity_factor=1.5, threshold_momentum=0.5),
    "causal_soft": dict(slots_per_expert=2),
}


@pytest.mark.parametrize("kind", sorted(FAMILY_EXAMPLES))
def test_each_kind_gets_its_own_small_config(kind):
    config = moekit.RouterConfig(kind=kind, **FAMILY_EXAMPLES[kind])
    assert type(config) is ROUTER_CONFIGS[RouterKind(kind)]
    assert config.kind.value == kind
    assert len(dataclasses.fields(config)) <= 13  # no 22-field bag
    # a config section round-trips through its dict, kind included
    section = config_to_dict(config)
    assert section["kind"] == kind
    assert config.from_config_dict(section) == config


def test_options_of_another_family_are_refused_by_name():
    with pytest.raises(
        ConfigError, match=r"top_p=0\.3.* do not apply to router kind 'expert_choice'"
    ):
        moekit.RouterConfig(kind="expert_choice", top_p=0.3)
    with pytest.raises(ConfigError, match="whose options are: bias, capacity_factor, float32"):
        moekit.RouterConfig(kind="expert_choice", noisy_gating=True)


def test_family_configs_are_typed_keyword_dataclasses_beside_their_routers():
    import inspect

    for kind, family in ROUTER_CONFIGS.items():
        router = family(**FAMILY_EXAMPLES[kind.value]).build(
            d_model=8, num_experts=4, top_k=_top_k(kind.value)
        )
        # the config lives in its router's module
        assert family.__module__ == type(router).__module__, family
        assert all(
            p.kind is inspect.Parameter.KEYWORD_ONLY
            for name, p in inspect.signature(family.build).parameters.items()
            if name != "self"
        )
        assert getattr(moekit, family.__name__) is family  # completable from the top level


def _top_k(kind: str) -> int:
    return {"dense": 4, "expert_choice": 4, "gshard_top2": 2, "top_k": 2, "top_p": 3}.get(kind, 1)


def test_train_config_picks_the_family_by_kind():
    config = load_train_config(
        None,
        [
            "model.moe.layer.num_experts=4",
            "model.moe.layer.top_k=2",
            "model.moe.layer.experts.hidden=8",
            "model.moe.layer.router.kind=top_p",
            "model.moe.layer.router.top_p=0.7",
        ],
    )
    assert type(config.model.moe.layer.router).__name__ == "TopPRouterConfig"
    assert config.model.moe.layer.router.top_p == 0.7
    with pytest.raises(ConfigError, match=r"model\.moe\.layer\.router: option\(s\) top_p=0\.7"):
        load_train_config(
            None,
            [
                "model.moe.layer.num_experts=4",
                "model.moe.layer.experts.hidden=8",
                "model.moe.layer.router.top_p=0.7",
            ],
        )


@pytest.mark.parametrize("kind", sorted(set(FAMILY_EXAMPLES) - {"soft", "causal_soft"}))
def test_every_token_router_follows_the_router_protocol(kind):
    config = moekit.RouterConfig(kind=kind, **FAMILY_EXAMPLES[kind])
    router = config.build(d_model=8, num_experts=4, top_k=_top_k(kind))
    assert isinstance(router, Router)
    result = router(torch.randn(5, 8), torch.randint(0, 50, (5,)), torch.ones(5, dtype=torch.bool))
    assert result.expert_idx_TK.shape == (5, router.top_k)
