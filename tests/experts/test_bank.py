"""The expert bank's paths agree with each other."""

import pytest
import torch

from moekit.experts.bank import ExpertBank


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "swiglu_oai"])
@pytest.mark.parametrize("bias", [False, True])
def test_few_row_decoding_path_equals_the_grouped_path(activation, bias):
    """No-grad CPU calls with few rows (decoding) take the per-expert path; same outputs."""
    from moekit.experts.bank import FEW_ROWS

    torch.manual_seed(0)
    bank = ExpertBank(6, 16, 24, activation=activation, bias=bias)
    for counts in ([2, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, FEW_ROWS]):
        counts_E = torch.tensor(counts)
        x = torch.randn(int(counts_E.sum()), 16)
        grouped = bank(x, counts_E)  # autograd on: the fused grouped path
        with torch.no_grad():
            few = bank(x, counts_E)
        torch.testing.assert_close(few, grouped.detach(), rtol=1e-5, atol=1e-6)
        assert bank._few_rows(x) is False  # grad enabled here
