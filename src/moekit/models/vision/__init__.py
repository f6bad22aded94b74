"""Vision MoE (V-MoE-style ViT classifier)."""

from moekit.models.vision.vit import VisionMoE, VisionMoEConfig, VisionOutput

__all__ = ["VisionMoE", "VisionMoEConfig", "VisionOutput"]
