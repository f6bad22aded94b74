"""``moekit plan --simulate``: the real mesh sharding on the meta device under a fake process
group of the whole world (one process, no memory), against the analytic plan."""

import json

from moekit.analysis.params import spec_from_hf_config
from moekit.analysis.plan import plan_expert_parallel
from moekit.cli.main import main
from moekit.distributed.mesh import ParallelConfig
from moekit.distributed.simulate import simulate_rank
from moekit.interop.hf import FAMILIES
from tests.distributed.workers import _mesh_lm_config

HF_CONFIGS = "tests/analysis/hf_configs"


def test_a_simulated_rank_holds_what_the_plan_says():
    from moekit.analysis.params import spec_from_moekit

    config = _mesh_lm_config(4, False)
    sim = simulate_rank(config, ParallelConfig(ep=2), world=4, dtype="fp32")
    plan = plan_expert_parallel(spec_from_moekit(config), 2, 1, "fp32", dp_shard=4)
    assert (sim.dp_shard, sim.ep) == (4, 2) and sim.expert_params > 0
    # the 4-gloo-rank run of test_mesh_training_matches_one_process measures the same bytes
    assert sim.weight_bytes == plan.weight_bytes


def test_deepseek_v3_on_256_ranks_with_ep_64(capsys):
    with open(f"{HF_CONFIGS}/deepseek-v3.json") as f:
        data = json.load(f)
    config = FAMILIES["deepseek_v3"].config_from_hf(data, strict=False)
    sim = simulate_rank(config, ParallelConfig(ep=64), world=256, rank=255)
    plan = plan_expert_parallel(spec_from_hf_config(data), 64, 1, dp_shard=256)
    assert abs(sim.params - plan.params_per_rank) <= 0.01 * plan.params_per_rank
    assert (
        main(
            ["plan", f"{HF_CONFIGS}/deepseek-v3.json", "--simulate", "--world", "256", "--ep", "64"]
        )
        == 0
    )
    assert "simulated on 256 ranks" in capsys.readouterr().out
