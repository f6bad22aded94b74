from pathlib import Path

import pytest

from moekit.analysis.params import count_parameters, spec_from_hf_config
from moekit.analysis.plan import plan_expert_parallel
from moekit.cli.main import main

MIXTRAL = Path(__file__).parent / "hf_configs" / "mixtral-8x7b.json"


def test_plan_by_hand_for_mixtral():
    spec = spec_from_hf_config(MIXTRAL)
    total = count_parameters(MIXTRAL).total
    experts = 32 * 8 * 3 * 4096 * 14336
    one = plan_expert_parallel(spec, 1, 1000, "bf16")
    four = plan_expert_parallel(spec, 4, 1000, "bf16")
    assert one.params_per_rank == total
    assert four.params_per_rank == total - experts + experts // 4
    assert four.weight_bytes == 2 * four.params_per_rank
    assert four.optimizer_bytes == 12 * four.params_per_rank  # 2 fp32 moments + fp32 master
    assert one.all_to_all_bytes_per_step == 0
    assert four.all_to_all_bytes_per_step == 32 * 4 * 1000 * 2 * 4096 * 2 * 0.75
    fp32 = plan_expert_parallel(spec, 4, 1000, "fp32")
    assert fp32.optimizer_bytes == 8 * fp32.params_per_rank


def test_plan_errors_and_cli(capsys):
    spec = spec_from_hf_config(MIXTRAL)
    with pytest.raises(ValueError, match="must be >= 1 and divide num_experts=8"):
        plan_expert_parallel(spec, 3, 10)
    with pytest.raises(ValueError, match="dtype"):
        plan_expert_parallel(spec, 2, 10, "int8")
    assert main(["plan", str(MIXTRAL), "--ep", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert "all-to-all GiB/step" in out and "Activations are not included" in out
    assert main(["plan", str(MIXTRAL), "--ep", "3"]) == 2
    assert "must be >= 1 and divide" in capsys.readouterr().err
