"""The decoder families of issue 23: fp32 logits parity <= 1e-5 with transformers on tiny random
configs with every option on, export that transformers reloads, re-import equal."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402
from tests.interop.tiny_families import FAMILIES  # noqa: E402


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_parity_export_reload(name, tmp_path):
    hf = FAMILIES[name]()
    ours = from_hf(hf).eval()
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens).logits
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()
    to_hf(ours, tmp_path / "export", hf.config.model_type)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    again = from_hf(tmp_path / "export").eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-5
        assert torch.equal(again(tokens).logits, got)
