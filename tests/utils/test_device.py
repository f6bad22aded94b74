"""Device resolution, device-aware autocast, and placement checked with fake CUDA tensors.

There is no GPU here. ``FakeTensorMode`` gives tensors that claim to live on ``cuda`` and
raises on any CPU/CUDA mix, so forward passes show that every tensor is created on the input's
device. Two limits of a CPU-only torch build: autograd's engine aborts on fake CUDA tensors (so
only forward passes run), and steps whose shapes depend on the data (the MoE dispatch: group
sizes come from the routing) cannot run under fake tensors at all; for those,
``test_hot_path_factories_name_their_device`` checks the source instead.
"""

import ast
import pathlib
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import moekit
from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from moekit.models.common.mla import MLAConfig
from moekit.utils import device as device_mod
from moekit.utils.device import autocast, distributed_backend, resolve_device

SRC = pathlib.Path(moekit.__file__).parent


@pytest.fixture
def cuda_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve_device("cuda")


def test_cuda_follows_local_rank_under_torchrun(cuda_host, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="cuda:7 does not exist"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CPU", ""])
def test_bad_device_names_are_refused(name):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        resolve_device(name)


def test_train_config_checks_the_device_name():
    from moekit.training import load_train_config

    with pytest.raises(ValueError, match="device must be"):
        load_train_config(None, ["device=tpu"])


def test_backend_follows_the_device():
    assert distributed_backend(torch.device("cuda", 0)) == "nccl"
    assert distributed_backend(torch.device("cpu")) == "gloo"


def test_bf16_autocast_is_device_aware_and_warns_on_slow_cpus(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        context = autocast(torch.device("cpu"), True)
    assert isinstance(context, torch.autocast) and context.device == "cpu"
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast(torch.device("cpu"), True).fast_dtype == torch.bfloat16
    assert not isinstance(autocast(torch.device("cpu"), False), torch.autocast)


def _fake_cuda(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """``module`` with every parameter and buffer a fake CUDA tensor (no autograd: its engine
    aborts on fake CUDA tensors in a CPU-only build)."""
    module.requires_grad_(False)
    module._apply(lambda t: FakeTensor(mode, t.detach().to("meta"), torch.device("cuda")))
    return module


LM_VARIANTS = {
    "dense": AttentionConfig(n_heads=2),
    "sinks_window": AttentionConfig(n_heads=2, sinks=True, sliding_window=3, o_bias=True),
    "mla": MLAConfig(
        n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
    ),
}


@pytest.mark.parametrize("name", sorted(LM_VARIANTS))
def test_lm_forward_and_cached_decoding_stay_on_the_input_device(name):
    config = TransformerConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        attention=LM_VARIANTS[name],
        ffn_hidden=16,
        max_seq_len=32,
    )
    mode = FakeTensorMode()
    model = _fake_cuda(TransformerLM(config).eval(), mode)
    with mode:
        tokens = torch.randint(0, 32, (2, 6), device="cuda")
        mask = torch.ones(2, 6, dtype=torch.bool, device="cuda")
        assert model(tokens).logits.device.type == "cuda"
        assert model(tokens, attention_mask=mask).logits.device.type == "cuda"
        cache = model.new_kv_cache(2, 16)
        model(tokens, attention_mask=mask, kv_cache=cache)
        step = model(tokens.narrow(1, 0, 1), kv_cache=cache)  # (fake CUDA cannot [:, :1])
        assert step.logits.device.type == "cuda" and cache.length == 7


@pytest.mark.parametrize(
    "kind, top_k",
    [("top_k", 2), ("dense", 4), ("gshard_top2", 2), ("top_p", 2), ("expert_choice", 4)],
)
def test_routers_and_losses_stay_on_the_input_device(kind, top_k):
    mode = FakeTensorMode()
    router = _fake_cuda(
        moekit.RouterConfig(kind=kind).build(d_model=16, num_experts=4, top_k=top_k).train(), mode
    )
    with mode:
        x = torch.randn(10, 16, device="cuda")
        result = router(x)  # (a padding mask's count is data, which fake tensors lack)
        for tensor in (result.weights_TK, result.expert_idx_TK, result.probs_TE):
            assert tensor.device.type == "cuda"
        losses = [
            moekit.losses.switch_load_balancing_loss(result.probs_TE, result.expert_idx_TK),
            moekit.losses.router_z_loss(result.logits_TE),
        ]
        assert all(loss.device.type == "cuda" for loss in losses)


FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "rand", "randn", "randint"}
# Functions that build on the CPU on purpose: rotary tables become buffers moved with the
# model; the exact BASE assignment runs scipy on the CPU and moves its answer back; the
# grouped-GEMM probe only asks torch what it supports.
CPU_ON_PURPOSE = {
    "rotary_tables",
    "_yarn_inv_freq",
    "_llama3_inv_freq",
    "exact_balanced_assignment",
    "grouped_mm_available",
}


def test_hot_path_factories_name_their_device():
    """In the forward code of routing, dispatch, experts, losses and the layer, every tensor
    factory says where its tensor goes (``device=``), or copies an input's (``*_like``)."""
    offenders = []
    folders = [
        "routing",
        "dispatch",
        "experts",
        "losses",
        "layers",
        "models/transformer",
        "distributed",
    ]
    files = [p for f in folders for p in (SRC / f).glob("*.py")]
    for path in files:
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or fn.name in {"__init__", *CPU_ON_PURPOSE}:
                continue  # parameters are created on the CPU and moved with the module
            for call in ast.walk(fn):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name)
                    and call.func.value.id == "torch"
                    and call.func.attr in FACTORIES
                    and not any(k.arg == "device" for k in call.keywords)
                ):
                    offenders.append(f"{path.relative_to(SRC)}:{call.lineno} {fn.name}")
    assert not offenders, offenders
