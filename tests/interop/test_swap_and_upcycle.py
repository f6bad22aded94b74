"""Block swap into live HF models; dense HF sources; upcycling to an HF MoE; the CLIs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.cli.main import main  # noqa: E402
from moekit.interop import MoEBlock, from_hf, swap_moe_blocks, to_hf  # noqa: E402
from moekit.training.upcycle import upcycle  # noqa: E402
from tests.interop.tiny_hf import FAMILIES, deepseek_v3, gpt_oss  # noqa: E402
from tests.interop.tiny_hf import qwen_or_olmoe as _hf  # noqa: E402

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize("name", [*sorted(FAMILIES), "mixtral", "deepseek_v3", "gpt_oss"])
def test_block_swap_keeps_outputs_and_trains(name):
    if name == "deepseek_v3":
        hf = deepseek_v3(q_lora_rank=16)
    elif name == "gpt_oss":
        hf = gpt_oss()
    elif name == "mixtral":
        torch.manual_seed(0)
        hf = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
        ).eval()
    else:
        hf = _hf(name)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = hf(tokens).logits
    swap_moe_blocks(hf)
    assert any(isinstance(layer.mlp, MoEBlock) for layer in hf.model.layers)
    with torch.no_grad():
        assert (hf(tokens).logits - before).abs().max() <= 1e-4
    hf.train()
    with moekit.collect_moe_outputs(hf) as collected:
        out = hf(tokens, labels=tokens)
    (out.loss + collected.aux_loss()).backward()
    moe = next(layer.mlp for layer in hf.model.layers if isinstance(layer.mlp, MoEBlock)).moe
    assert moe.experts.w_in_EDH.grad is not None


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_dense_sources_import_with_parity(model_type, tmp_path):
    config_cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    extra = {"mistral": {"sliding_window": None}}.get(model_type, {})
    config = getattr(transformers, config_cls[model_type])(**SMALL, **extra)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path / "dense")
    dense = from_hf(tmp_path / "dense").eval()
    assert not dense.config.is_moe
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert (dense(tokens).logits - hf(tokens).logits).abs().max() <= 1e-4
    # and back: a dense moekit model exports to its dense family (issue 30: it was refused)
    to_hf(dense, tmp_path / "back", model_type)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again).__name__ == type(hf).__name__
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, hf(tokens).logits)


@pytest.mark.parametrize(
    ("family", "says"),
    [
        ("llama", "'llama' is a dense family and this model has MoE layers"),
        (
            "deepseek_v3",
            "this one has no latent attention (attention.kind='mla'), no shared experts",
        ),
    ],
)
def test_exports_a_family_cannot_take_are_refused_in_one_sentence(family, says, tmp_path):
    torch.manual_seed(0)
    from moekit.models import TransformerConfig
    from moekit.models.common.attention import AttentionConfig
    from moekit.models.common.placement import MoEPlacementConfig

    model = TransformerConfig(
        vocab_size=64,
        d_model=32,
        n_layers=1,
        ffn_hidden=48,
        attention=AttentionConfig(n_heads=4),
        moe=MoEPlacementConfig(
            layer=moekit.MoEConfig(num_experts=4, top_k=2, experts=moekit.ExpertConfig(hidden=16))
        ),
    ).build()
    with pytest.raises(ValueError) as refused:
        to_hf(model, tmp_path / "out", family)
    message = str(refused.value)
    assert message.startswith(f"cannot export as {family!r}: ") and says in message, message
    assert "cannot express" not in message and not (tmp_path / "out").exists()


def test_upcycled_llama_exports_as_mixtral_with_the_dense_logits(tmp_path, capsys):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    llama.save_pretrained(tmp_path / "llama")
    assert (
        main(
            [
                "upcycle",
                str(tmp_path / "llama"),
                str(tmp_path / "mix"),
                "--experts",
                "4",
                "--top-k",
                "2",
                "--export",
                "mixtral",
            ]
        )
        == 0
    )
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mix").eval()
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert (mixtral(tokens).logits - llama(tokens).logits).abs().max() <= 1e-4
    # and through the moekit checkpoint format
    assert main(["convert", str(tmp_path / "mix"), str(tmp_path / "moekit")]) == 0
    assert (
        main(["convert", str(tmp_path / "moekit"), str(tmp_path / "back"), "--to", "mixtral"]) == 0
    )
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, mixtral(tokens).logits)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # --to's choices are the converters' registry
        main(["convert", str(tmp_path / "moekit"), str(tmp_path / "x"), "--to", "gpt2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gpt2'" in err and "qwen3_moe" in err


def test_upcycle_errors():
    dense = from_hf(_hf("olmoe"))
    with pytest.raises(ValueError, match="dense model"):
        upcycle(dense, 4, 2)
    torch.manual_seed(0)
    llama = from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)))
    with pytest.raises(ValueError, match="MoE layers"):  # a dense model is not a Mixtral
        to_hf(llama, "/tmp/never", "mixtral")
