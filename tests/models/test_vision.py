import pytest
import torch

from moekit.models import (
    VisionMoE,
    VisionMoEConfig,
    from_pretrained,
    save_pretrained,
)
from tests.builders import placement

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _digits(n: int):
    digits = sklearn_datasets.load_digits()  # ships inside scikit-learn; no download
    images = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target[:n])


def _config(**kw) -> VisionMoEConfig:
    base = dict(
        image_size=8,
        patch_size=2,
        channels=1,
        num_classes=10,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_hidden=64,
        moe=placement(32, num_experts=4, top_k=2, expert_hidden=32, every=2, activation="gelu"),
    )
    base.update(kw)
    return VisionMoEConfig(**base)


def test_vmoe_layout_shapes_and_errors():
    model = VisionMoE(_config(n_layers=4))
    assert [type(b.ffn).__name__ for b in model.blocks] == ["FeedForward", "MoE"] * 2
    out = model(torch.randn(3, 1, 8, 8))
    assert out.logits.shape == (3, 10) and len(out.moe_outputs) == 2
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        _config(patch_size=3)


def test_bidirectional_attention_sees_every_patch():
    model = VisionMoE(_config()).eval()
    images = torch.randn(1, 1, 8, 8)
    changed = images.clone()
    changed[..., -2:, -2:] += 1.0  # only the last patch changes
    with torch.no_grad():
        a = model.blocks[0](model.patch_embed(images).flatten(2).transpose(1, 2))[0]
        b = model.blocks[0](model.patch_embed(changed).flatten(2).transpose(1, 2))[0]
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first patch sees the last


def _train(model, images, labels, steps: int = 150):
    """AdamW on cross-entropy plus the MoE auxiliary loss; returns the last output and loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model(images)
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
    return out, loss


def test_tiny_vision_moe_overfits_digits():
    torch.manual_seed(0)
    images, labels = _digits(64)
    model = VisionMoE(_config())
    _, loss = _train(model, images, labels)
    accuracy = (model(images).logits.argmax(-1) == labels).float().mean().item()
    assert loss.item() < 0.1
    assert accuracy == 1.0


def test_vision_save_load_round_trip(tmp_path):
    model = VisionMoE(_config()).eval()
    save_pretrained(model, tmp_path / "vit")
    loaded = from_pretrained(tmp_path / "vit").eval()
    images = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(images).logits, loaded(images).logits)


def test_soft_moe_vit_trains_on_digits():
    import moekit

    torch.manual_seed(0)
    images, labels = _digits(64)
    moe = placement(
        32,
        num_experts=4,
        top_k=1,
        expert_hidden=32,
        every=2,
        activation="gelu",
        router=moekit.RouterConfig(kind="soft", slots_per_expert=4),
    )
    model = VisionMoE(_config(moe=moe))
    out, loss = _train(model, images, labels)
    assert out.moe_outputs[0].routing.dispatch_BSN.shape == (64, 16, 16)
    assert loss.item() < 0.1
