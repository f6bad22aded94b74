"""What every model is built from: the block (``norm → token mixer → residual``, ``norm →
channel mixer → residual``), the attention mixers (softmax, latent, mixture of heads, T5's
relative-position attention: sibling configs on one base), rotary positions and masks, the
layer pattern (``TokenMixerLayout``), where the MoE layers go (``MoEPlacementConfig``), what a
language model returns and how its next token is drawn. The recurrent token mixers are in
``moekit.models.mixers``; the decoder-only LM, the encoder–decoder and the ViT build from
these."""
