"""Switch Transformer (encoder–decoder) <-> transformers' switch_transformers: logits parity
with capacity overflow, padding and router biases; export that transformers reloads; greedy
generation; fine-tuning with a preset through the CLI, exported and reloaded."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.interop import from_hf, to_hf  # noqa: E402
from moekit.interop.switch_transformers import config_from_hf, sparse_blocks  # noqa: E402
from moekit.models.encoder_decoder import EncoderDecoderLM, generate_seq2seq  # noqa: E402


def tiny_switch(**overrides):
    torch.manual_seed(0)
    options = dict(
        vocab_size=64,
        d_model=16,
        d_kv=6,  # heads x d_kv != d_model, as in T5
        d_ff=24,
        num_layers=4,
        num_decoder_layers=3,
        num_heads=4,
        num_experts=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=1,
        expert_capacity=3,  # overflows: dropped tokens ride the residual
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    options.update(overrides)
    config = transformers.SwitchTransformersConfig(**options)
    return transformers.SwitchTransformersForConditionalGeneration(config).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (3, 11), generator=g)
    decoder = torch.randint(0, 64, (3, 7), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 8:] = 0
    return tokens, decoder, mask


@pytest.mark.parametrize("options", [{}, {"router_bias": True, "expert_capacity": 64}])
def test_logits_parity_export_and_reload(options, tmp_path):
    hf = tiny_switch(**options)
    ours = from_hf(hf).eval()
    assert isinstance(ours, EncoderDecoderLM)
    assert ours.config.encoder_moe.layers == [1, 3] and ours.config.decoder_moe.layers == [1]
    tokens, decoder, mask = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=tokens, decoder_input_ids=decoder, attention_mask=mask).logits
        got = ours(tokens, decoder_tokens=decoder, attention_mask=mask).logits
        assert (got - expected).abs().max() <= 1e-4
    to_hf(ours, tmp_path / "export", "switch_transformers")
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "export").eval()
    again = from_hf(tmp_path / "export").eval()
    with torch.no_grad():
        back = reloaded(input_ids=tokens, decoder_input_ids=decoder, attention_mask=mask).logits
        assert (back - expected).abs().max() <= 1e-4
        assert torch.equal(again(tokens, decoder_tokens=decoder, attention_mask=mask).logits, got)


def test_capacity_drops_tokens_like_transformers():
    """With capacity 1 most tokens overflow; parity holds only if the same ones are dropped."""
    hf = tiny_switch(expert_capacity=1)
    ours = from_hf(hf).eval()
    tokens, decoder, _ = _inputs()
    with torch.no_grad():
        out = ours(tokens, decoder_tokens=decoder)
        expected = hf(input_ids=tokens, decoder_input_ids=decoder).logits
    assert (out.logits - expected).abs().max() <= 1e-4
    assert out.moe_outputs[0].stats.dropped_fraction > 0.5


def test_greedy_generation_matches_transformers():
    hf = tiny_switch(expert_capacity=64)
    ours = from_hf(hf).eval()
    tokens, _, _ = _inputs()
    expected = hf.generate(
        input_ids=tokens,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        decoder_start_token_id=0,
    )
    assert torch.equal(generate_seq2seq(ours, tokens, 6), expected)


def test_cached_decoding_equals_full_recomputation():
    ours = from_hf(tiny_switch(expert_capacity=64)).eval()
    tokens, decoder, _ = _inputs()
    with torch.no_grad():
        encoded = ours.encode(tokens)
        full = ours.decode(decoder, encoded).logits
        cache = ours.new_cache(3)
        steps = [ours.decode(decoder[:, i : i + 1], encoded, cache).logits for i in range(7)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_sparse_block_rule_is_transformers():
    for n_layers, n_sparse in [(12, 6), (12, 3), (4, 2), (3, 2), (5, 0), (1, 1)]:
        config = transformers.SwitchTransformersConfig(
            num_layers=n_layers, num_sparse_encoder_layers=n_sparse, num_sparse_decoder_layers=0
        )
        model = transformers.models.switch_transformers.modeling_switch_transformers
        stack = model.SwitchTransformersStack(config)
        built = [i for i, block in enumerate(stack.block) if block.is_sparse]
        assert sparse_blocks(n_layers, n_sparse) == built


@pytest.mark.parametrize(
    ("key", "value"),
    [("dense_act_fn", "gelu_new"), ("router_dtype", "bfloat16"), ("tie_word_embeddings", False)],
)
def test_unsupported_options_are_refused_by_name(key, value):
    data = tiny_switch().config.to_dict()
    data[key] = value
    with pytest.raises(ValueError, match=key):
        config_from_hf(data)


def test_export_refuses_what_the_family_cannot_hold(tmp_path):
    import dataclasses

    ours = from_hf(tiny_switch())
    layer = ours.config.encoder_moe.layer
    placement = dataclasses.replace(ours.config.encoder_moe, layers=[0, 2])  # not HF's rule
    other = EncoderDecoderLM(dataclasses.replace(ours.config, encoder_moe=placement))
    with pytest.raises(ValueError, match=r"encoder_moe\.layers"):
        to_hf(other, tmp_path / "x", "switch_transformers")
    assert layer is not None and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="encoder–decoder"):
        to_hf(ours, tmp_path / "y", "mixtral")


def test_switch_finetuned_with_a_preset_exports_and_reloads(tmp_path, capsys):
    """The issue's must-show: import, fine-tune attention (self- and cross-) for a few steps
    through `moekit finetune`, export, reload in transformers with the same logits."""
    from moekit.cli.main import main
    from moekit.models.checkpoint import from_pretrained
    from moekit.training.checkpoint import resolve_checkpoint
    from tests.interop.test_peft import _tiny_tokenizer

    source = tmp_path / "hf"
    tiny_switch(vocab_size=16, expert_capacity=4).save_pretrained(source)
    _tiny_tokenizer(source)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"say {i % 10} {(i * 7) % 10}" for i in range(400)))
    args = ["finetune", "--from-hf", str(source), "--preset", "attention", "--data", str(text)]
    args += ["--steps", "3", "--out-dir", str(tmp_path / "run"), "--export-hf"]
    args += [str(tmp_path / "out"), "--set", "data.seq_len=16", "--set", "data.batch_size=4"]
    args += ["--set", "eval_batches=1", "--set", "optim.lr=0.05", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == (
        "switch_transformers"
    )
    tuned = from_pretrained(resolve_checkpoint(str(tmp_path / "run"))).eval()
    exported = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    original = transformers.AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    tokens = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(3))
    decoder = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = tuned(tokens, decoder_tokens=decoder).logits
        theirs = exported(input_ids=tokens, decoder_input_ids=decoder).logits
        before = original(input_ids=tokens, decoder_input_ids=decoder).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - before).abs().max() > 1e-3  # fine-tuning changed the model
    old, new = original.state_dict(), exported.state_dict()
    changed = {k.split(".")[-2] for k in old if not torch.equal(old[k], new[k])}
    # self-attention, cross-attention (EncDecAttention) and the relative bias; nothing else
    assert changed == {"q", "k", "v", "o", "relative_attention_bias"}
    assert any("EncDecAttention" in k for k in old if not torch.equal(old[k], new[k]))


def test_prune_merge_and_lora_on_an_imported_switch_transformer(tmp_path):
    """The tools that rebuild or adapt a model take the encoder–decoder too: prune and merge
    (each stack's MoE layers shrink; a non-uniform result no longer exports as a Switch
    checkpoint, by name), LoRA on self- and cross-attention and the experts (merged exactly)."""
    from moekit.adapters.lora import LoRAConfig, add_lora, merge_lora
    from moekit.training.compress import merge, prune, prune_experts

    model = from_hf(tiny_switch(expert_capacity=64)).eval()
    windows = [
        torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    tokens, decoder, _ = _inputs()
    for smaller, _ in (prune(model, windows, 0.5), merge(model, windows, 0.5)):
        assert isinstance(smaller, EncoderDecoderLM)
        assert smaller.config.encoder_moe.experts_per_layer == [2, 2]
        assert smaller.config.decoder_moe.experts_per_layer == [2]
        with torch.no_grad():
            assert torch.isfinite(smaller(tokens, decoder_tokens=decoder).logits).all()
    pruned, kept = prune(model, windows, 0.5)
    to_hf(pruned, tmp_path / "pruned", "switch_transformers")  # every layer alike: exports
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_experts == 2
    with torch.no_grad():
        ours = pruned(tokens, decoder_tokens=decoder).logits
        theirs = reloaded(input_ids=tokens, decoder_input_ids=decoder).logits
        assert (ours - theirs).abs().max() <= 1e-4
    with torch.no_grad():  # a pruned expert set with every kept expert's weights unchanged
        layer = pruned.encoder.blocks[1].ffn
        source = model.encoder.blocks[1].ffn
        index = torch.tensor(kept["encoder.blocks.1.ffn"])
        assert torch.equal(layer.experts.w_in_EDH, source.experts.w_in_EDH[index])
    uneven = prune_experts(
        model,
        {
            "encoder.blocks.1.ffn": [0, 1, 2],
            "encoder.blocks.3.ffn": [0, 1],
            "decoder.blocks.1.ffn": [3],
        },
    )
    assert uneven.config.encoder_moe.experts_per_layer == [3, 2]
    with pytest.raises(ValueError, match="experts_per_layer"):
        to_hf(uneven, tmp_path / "x", "switch_transformers")
    assert not (tmp_path / "x").exists()
    add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["attention", "experts"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name or ".adapter." in name:
                p.normal_(0, 0.05)
        adapted = model(tokens, decoder_tokens=decoder).logits
        adapters = [n for n, _ in model.named_parameters() if "lora" in n]
        assert any("cross_attn" in n for n in adapters)
        merge_lora(model)
        assert (model(tokens, decoder_tokens=decoder).logits - adapted).abs().max() <= 1e-5


def test_lora_on_a_switch_transformer_exports_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from moekit.adapters.lora import LoRAConfig, add_lora
    from moekit.interop.peft_adapters import export_peft_adapter

    source = tmp_path / "hf"
    tiny_switch(expert_capacity=64).save_pretrained(source)
    model = from_hf(source)
    add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["attention", "experts"]))
    with torch.no_grad():  # adapters away from zero, as after training
        for name, p in model.named_parameters():
            if "lora" in name or ".adapter." in name:
                p.normal_(0, 0.05)
    model.eval()
    export_peft_adapter(model, source, tmp_path / "adapter")
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(source, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens, decoder, mask = _inputs()
    with torch.no_grad():
        ours = model(tokens, decoder_tokens=decoder, attention_mask=mask).logits
        theirs = adapted(input_ids=tokens, decoder_input_ids=decoder, attention_mask=mask).logits
        plain = from_hf(source).eval()(tokens, decoder_tokens=decoder, attention_mask=mask).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters do something
    assert (ours - theirs).abs().max() <= 1e-4
