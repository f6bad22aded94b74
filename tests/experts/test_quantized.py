"""Quantised expert banks: the codes round-trip within the stated error, the quantised grouped
matmul equals a looped reference on the dequantised weights (outputs and input gradients), the
MXFP4 layout is GPT-OSS's, and quantised models save, load and refuse bad input by name."""

import pytest
import torch

from moekit.experts.bank import ExpertBank
from moekit.experts.quantized import (
    QuantizationConfig,
    QuantizedExpertBank,
    dequantize_weight,
    quantization_error_bound,
    quantize_weight,
    quantized_grouped_linear,
)
from moekit.models import TransformerLM
from moekit.models.checkpoint import from_pretrained, save_pretrained
from moekit.training.quantize import expert_weight_bytes, quantize_experts
from tests.builders import tiny_lm

FORMATS = [
    QuantizationConfig(format="int8", group_size=8),
    QuantizationConfig(format="int4", group_size=8),
    QuantizationConfig(format="int4", group_size=16),
    QuantizationConfig(format="mxfp4", group_size=32),
]


def _bank(E=4, D=32, H=32, bias=True, activation="swiglu", seed=0) -> ExpertBank:
    torch.manual_seed(seed)
    bank = ExpertBank(E, D, H, activation=activation, bias=bias)
    with torch.no_grad():
        bank.w_in_EDH.mul_(torch.linspace(0.1, 3.0, D).view(1, D, 1))  # groups of unlike scale
    return bank


@pytest.mark.parametrize("config", FORMATS, ids=lambda c: f"{c.format.value}-g{c.group_size}")
def test_codes_round_trip_within_the_stated_error(config):
    w = _bank().w_in_EDH.detach()
    codes, scales = quantize_weight(w, config)
    assert codes.shape == config.shapes(*w.shape)[0] and scales.shape == config.shapes(*w.shape)[1]
    assert (codes.dtype, scales.dtype) == config.dtypes()
    error = (dequantize_weight(codes, scales, config) - w).abs().max().item()
    assert 0 < error <= quantization_error_bound(w, config)
    # one expert's slice dequantises to that expert's rows of the whole
    whole = dequantize_weight(codes, scales, config)
    torch.testing.assert_close(dequantize_weight(codes[2], scales[2], config), whole[2])


def _looped_reference(bank: QuantizedExpertBank, x_MD: torch.Tensor, counts: list[int]):
    out, start = [], 0
    for e, count in enumerate(counts):
        for row in range(start, start + count):  # one token at a time
            out.append(bank.forward_one(e, x_MD[row : row + 1]))
        start += count
    return torch.cat(out)


@pytest.mark.parametrize("config", FORMATS, ids=lambda c: f"{c.format.value}-g{c.group_size}")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_quantized_bank_equals_the_looped_dequantized_reference(config, activation):
    bank = QuantizedExpertBank.quantize(_bank(activation=activation), config)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), 32)
    got_x = x.clone().requires_grad_(True)
    ref_x = x.clone().requires_grad_(True)
    got = bank(got_x, torch.tensor(counts))
    ref = _looped_reference(bank, ref_x, counts)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    coefficients = torch.randn_like(got)
    (got * coefficients).sum().backward()
    (ref * coefficients).sum().backward()
    torch.testing.assert_close(got_x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    # close to the full-precision bank it came from
    full = _bank(activation=activation)(x, torch.tensor(counts))
    relative = (got - full).norm() / full.norm()
    assert relative < {"int8": 0.01, "int4": 0.3, "mxfp4": 0.3}[config.format.value]


def test_quantized_grouped_linear_gradcheck_float64():
    config = QuantizationConfig(format="int4", group_size=4)
    codes, scales = quantize_weight(torch.randn(3, 8, 5, dtype=torch.float64), config)
    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 5])
    assert torch.autograd.gradcheck(
        lambda x: quantized_grouped_linear(x, counts, codes, scales.double(), config), (x,)
    )


def test_forward_and_backward_save_no_dequantized_weight():
    """QLoRA's promise: no dequantised bank and no bank gradient is ever kept."""
    from moekit.adapters import LoRAConfig, add_lora

    model = tiny_lm(d_model=32, expert_hidden=32)
    quantize_experts(model, QuantizationConfig(format="int4", group_size=16))
    add_lora(model, LoRAConfig(rank=2, targets=["experts"]))
    widths = {(32, 64), (64, 32), (32, 32)}  # a dequantised w_in or w_out of one expert
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape[-2:]) if t.is_floating_point() and t.dim() >= 2 else ())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(torch.randint(0, 40, (2, 6))).logits.sum()
    loss.backward()
    bank_shapes = [s for s in saved if s in widths and s != (32, 32)]
    assert not bank_shapes, bank_shapes
    for layer in model.modules():
        if isinstance(layer, QuantizedExpertBank):
            assert not any(
                p.requires_grad for n, p in layer.named_parameters() if "adapter" not in n
            )
            assert layer.adapter.A_in_EDR.grad is not None


def test_to_bfloat16_keeps_the_scales_float32():
    bank = QuantizedExpertBank.quantize(_bank(), QuantizationConfig(format="int8", group_size=8))
    bank = bank.to(torch.bfloat16)
    assert bank.w_in_scales.dtype == torch.float32 and bank.dtype == torch.bfloat16
    assert bank.w_in_codes.dtype == torch.int8
    y = bank(torch.randn(4, 32, dtype=torch.bfloat16), torch.tensor([1, 1, 1, 1]))
    assert y.dtype == torch.bfloat16


def test_group_sizes_that_do_not_divide_are_refused_by_name():
    with pytest.raises(ValueError, match=r"group_size=12 does not divide d_model=32"):
        QuantizedExpertBank.quantize(_bank(), QuantizationConfig(format="int4", group_size=12))
    with pytest.raises(ValueError, match=r"group_size must be 32 for mxfp4"):
        QuantizationConfig(format="mxfp4", group_size=64)
    with pytest.raises(ValueError, match=r"group_size must be an even number"):
        QuantizationConfig(format="int4", group_size=3)
    model = tiny_lm(d_model=32, expert_hidden=24)
    with pytest.raises(ValueError, match=r"does not divide experts.hidden=24"):
        quantize_experts(model, QuantizationConfig(format="int4", group_size=16))
    assert all(isinstance(m.experts, ExpertBank) for m in model.modules() if hasattr(m, "router"))


def test_mxfp4_layout_is_the_one_transformers_reads_for_gpt_oss():
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    config = QuantizationConfig(format="mxfp4", group_size=32)
    w = torch.randn(2, 64, 48)  # (E, K, N): HF's gate_up_proj layout (E, D, 2H)
    blocks, scales = quantize_weight(w, config)
    theirs = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    torch.testing.assert_close(dequantize_weight(blocks, scales, config), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "int4", "mxfp4"])
def test_a_quantized_model_saves_loads_and_runs_like_before(fmt, tmp_path):
    model = tiny_lm(d_model=32, expert_hidden=32).eval()
    full_bytes = expert_weight_bytes(model)
    tokens = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        full = model(tokens).logits
    quantize_experts(model, QuantizationConfig(format=fmt, group_size=32))
    # 8 or 4 bits per weight plus one scale (4 bytes; mxfp4: 1) per 32 weights, against 32 bits
    assert expert_weight_bytes(model) < full_bytes / (3.4 if fmt == "int8" else 6)
    with torch.no_grad():
        quantized = model(tokens).logits
    relative = ((quantized - full).norm() / full.norm()).item()
    assert 0 < relative < (0.01 if fmt == "int8" else 0.15)
    save_pretrained(model, tmp_path / "q")
    loaded = from_pretrained(tmp_path / "q").eval()
    assert isinstance(loaded, TransformerLM)
    assert loaded.config.moe.layer.experts.quantization.format.value == fmt
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, quantized, rtol=0, atol=0)


def test_a_corrupt_or_mistyped_quantized_file_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_lm(d_model=32, expert_hidden=32)
    quantize_experts(model, QuantizationConfig(format="int4", group_size=8))
    save_pretrained(model, tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors"):
        from_pretrained(tmp_path / "q")
    # codes of the wrong dtype (a float where uint8 codes belong), checksums off
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("w_in_codes"))
    tensors[name] = tensors[name].float()
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"{name}: file torch.float32 vs model torch.uint8"):
        from_pretrained(tmp_path / "q", verify=False)


def test_quantizing_twice_or_with_adapters_is_refused():
    from moekit.adapters import LoRAConfig, add_lora

    model = tiny_lm(d_model=32, expert_hidden=32)
    quantize_experts(model, QuantizationConfig(format="int8", group_size=8))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_experts(model, QuantizationConfig(format="int8", group_size=8))
    other = tiny_lm(d_model=32, expert_hidden=32)
    add_lora(other, LoRAConfig(rank=2, targets=["experts"]))
    with pytest.raises(ValueError, match="LoRA adapters"):
        quantize_experts(other, QuantizationConfig(format="int8", group_size=8))
