"""All-to-all bytes of one training step on a 4-rank mesh (EP 4 within FSDP2) against
``moekit plan``'s estimate.

Run: ``OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 benchmarks/bench_mesh_traffic.py``
(gloo, CPU). A random 2-layer model with 8 experts, top-2, d_model 64; 4 × 128 tokens per
rank; prints the bytes each rank sent (mean over ranks) and the plan's figure.
"""

import json

import torch
import torch.distributed as dist

import moekit
from moekit.analysis.params import spec_from_moekit
from moekit.analysis.plan import plan_expert_parallel
from moekit.distributed import meter_traffic
from moekit.distributed.mesh import ParallelConfig, finish_expert_gradients, parallelize
from moekit.models import MoEPlacementConfig, TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig

dist.init_process_group("gloo")
torch.set_num_threads(1)
r, W = dist.get_rank(), dist.get_world_size()
cfg = TransformerConfig(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    attention=AttentionConfig(n_heads=4),
    ffn_hidden=64,
    max_seq_len=128,
    moe=MoEPlacementConfig(
        layer=moekit.MoEConfig(num_experts=8, top_k=2, experts=moekit.ExpertConfig(hidden=64))
    ),
)
torch.manual_seed(0)
model = TransformerLM(cfg)
meshes = ParallelConfig(ep=4).resolve(W, 8).build_meshes("cpu")
parallelize(model, meshes)
B, S = 4, 128
x = torch.randint(0, 256, (B, S + 1), generator=torch.Generator().manual_seed(r))
with meter_traffic() as t:
    out = model(x[:, :-1])
    (out.logits.float().mean() + out.aux_loss).backward()
    finish_expert_gradients(model, meshes)
sent = torch.tensor([float(t.bytes_sent)])
dist.all_reduce(sent)
plan = plan_expert_parallel(spec_from_moekit(cfg), 4, B * S, "fp32", dp_shard=W)
if r == 0:
    print(
        json.dumps(
            {
                "measured_mean_bytes_sent": sent.item() / W,
                "planned": plan.all_to_all_bytes_per_step,
                "ratio": sent.item() / W / plan.all_to_all_bytes_per_step,
            }
        )
    )
dist.barrier()
dist.destroy_process_group()
