"""Runs only where a GPU exists (marked ``cuda``; skipped on CPU-only machines such as CI)."""

import pytest
import torch

from moekit.models import TransformerConfig, TransformerLM
from moekit.models.common.attention import AttentionConfig
from tests.builders import placement

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_lm_step_on_cuda_matches_the_cpu():
    config = TransformerConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        attention=AttentionConfig(n_heads=4),
        ffn_hidden=48,
        moe=placement(32, num_experts=4, top_k=2, expert_hidden=24),
    )
    torch.manual_seed(0)
    cpu = TransformerLM(config)
    gpu = TransformerLM(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, :3] = False
    losses = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        out = model(tokens.to(device), attention_mask=mask.to(device))
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        losses.append(loss.detach().cpu())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad.cpu(), rtol=1e-3, atol=1e-4, msg=name)


def test_training_runs_on_cuda(tmp_path, tiny_text):
    from moekit.training import load_train_config, train
    from tests.builders import TINY_MOE

    config = load_train_config(
        None, [*TINY_MOE, "steps=3", "device=cuda", f"out_dir={tmp_path}", f"data.path={tiny_text}"]
    )
    result = train(config, progress=False)
    assert next(result.model.parameters()).is_cuda


def test_resume_on_cuda_equals_uninterrupted(tmp_path, tiny_text):
    """Noisy gating draws from the CUDA generator: its state must be in the checkpoint."""
    from moekit.training import load_train_config, train
    from tests.builders import TINY_MOE

    def config(name):
        return load_train_config(
            None,
            [
                *TINY_MOE,
                "device=cuda",
                "bf16=false",
                "model.moe.layer.router.noisy_gating=true",
                "checkpoint_every=4",
                f"out_dir={tmp_path / name}",
                f"data.path={tiny_text}",
            ],
        )

    torch.backends.cudnn.deterministic = True
    full = train(config("full"), progress=False)
    train(config("cut"), progress=False, stop_after=6)
    resumed = train(config("cut"), progress=False, resume=True)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in full.records]


def test_generate_on_cuda_with_list_prompts_and_a_cpu_generator():
    from moekit.models.transformer.generate import generate
    from tests.builders import tiny_lm

    model = tiny_lm().cuda().eval()
    outs = generate(model, [[1, 2, 3], [4, 5]], 4)
    assert [len(o) for o in outs] == [7, 6] and all(o.is_cuda for o in outs)
    sampled = generate(
        model, torch.tensor([[1, 2]]), 3, temperature=1.0, generator=torch.Generator()
    )
    assert sampled.is_cuda and sampled.shape == (1, 5)


def test_bf16_autocast_experts_run_in_bf16_on_cuda():
    import moekit

    layer = (
        moekit.MoEConfig(num_experts=8, top_k=2, experts=moekit.ExpertConfig(hidden=64))
        .build(d_model=64)
        .cuda()
    )
    x = torch.randn(128, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    out.output.float().sum().backward()
    assert out.routing.logits_TE.dtype == torch.float32
    assert layer.experts.w_in_EDH.grad.dtype == torch.float32
