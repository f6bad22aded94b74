"""Small runtime helpers that belong to no single MoE concept."""
