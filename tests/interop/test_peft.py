"""LoRA adapters of HF-imported models, exported in the PEFT format and loaded by the real
``peft`` onto the ``transformers`` model: the same logits as moekit."""

import pytest
import torch

from moekit.adapters import LoRAConfig, add_lora, lora_parameters
from moekit.interop.hf import from_hf
from moekit.interop.peft_adapters import export_peft_adapter
from tests.interop.tiny_hf import mixtral, qwen_or_olmoe, transformers

peft = pytest.importorskip("peft")

BUILDERS = {"mixtral": mixtral, "qwen3_moe": lambda: qwen_or_olmoe("qwen3_moe")}


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize(
    "lora",
    [
        dict(rank=2, alpha=4.0, targets=["attention", "experts"]),
        dict(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "experts"], ranks={"experts": 2}),
    ],
)
def test_peft_loads_the_exported_adapter_with_the_same_logits(family, lora, tmp_path):
    source = tmp_path / "hf"
    BUILDERS[family]().save_pretrained(source)
    model = from_hf(source).eval()
    add_lora(model, LoRAConfig(**lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.2)
    export_peft_adapter(model, source, tmp_path / "adapter")

    base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = loaded(tokens).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(source)(tokens).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapters do change the function
    assert (ours - theirs).abs().max() <= 1e-4


def test_export_refuses_a_changed_base_and_unsupported_targets(tmp_path):
    source = tmp_path / "hf"
    mixtral().save_pretrained(source)
    model = from_hf(source).eval()
    add_lora(model, LoRAConfig(rank=2, targets=["experts"]))
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with pytest.raises(ValueError, match="base weights differ"):
        export_peft_adapter(model, source, tmp_path / "a")
    other = from_hf(source)
    other.lora_config = LoRAConfig(rank=2, targets=["ffn"])
    with pytest.raises(ValueError, match="cannot be exported in the PEFT format"):
        export_peft_adapter(other, source, tmp_path / "b")


def _tiny_tokenizer(folder):
    """A word-level tokenizer of 20 words with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "</s>", "<user>", "<assistant>", "say", *map(str, range(10))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    )
    fast.save_pretrained(folder)


def test_finetune_from_hf_with_its_tokenizer_exports_peft_and_hf(tmp_path, capsys):
    import json

    from moekit.cli.main import main

    source = tmp_path / "hf"
    mixtral().save_pretrained(source)
    _tiny_tokenizer(source)
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"say {i % 10}", "response": f"{i % 10} {i % 10}"}) + "\n"
            for i in range(30)
        )
    )
    args = [
        "finetune",
        "--from-hf",
        str(source),
        "--instruction",
        "--data",
        str(data),
        "--lora-rank",
        "2",
        "--steps",
        "3",
        "--out-dir",
        str(tmp_path / "run"),
        "--export-peft",
        str(tmp_path / "adapter"),
        "--export-hf",
        str(tmp_path / "merged"),
        "--set",
        "data.seq_len=16",
        "--set",
        "data.batch_size=4",
        "--set",
        "eval_batches=1",
        "--set",
        "optim.lr=0.05",
        "--quiet",
    ]
    assert main(args) == 0, capsys.readouterr().err
    tokens = torch.randint(0, 15, (2, 7), generator=torch.Generator().manual_seed(3))
    base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        merged_logits = merged.eval()(tokens).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(source).eval()(tokens).logits
    assert (adapted - plain).abs().max() > 1e-4  # training moved the adapters
    assert (adapted - merged_logits).abs().max() <= 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # moekit eval uses the tokenizer the run was trained with, and reads HF folders too
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"say {i % 10} {i % 10} </s>" for i in range(200)))
    capsys.readouterr()
    for model in (tmp_path / "run", source):
        assert (
            main(["eval", str(model), "--data", str(text), "--batches", "1", "--seq-len", "16"])
            == 0
        )
        assert "nats/token" in capsys.readouterr().out


def test_presets_work_on_models_imported_from_hugging_face():
    from moekit.training.presets import apply_selection, parameter_groups, select_parameters

    model = from_hf(qwen_or_olmoe("qwen2_moe"))  # shared experts and dense layers
    groups = parameter_groups(model)
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    assert groups["router"] and groups["shared_experts"] and groups["ffn"] and groups["experts"]
    apply_selection(model, select_parameters(model, "router+shared_experts"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(groups["router"]) | set(groups["shared_experts"])


def test_qlora_adapters_export_to_peft_for_the_full_precision_base(tmp_path):
    """QLoRA on an imported Mixtral's int4 experts: the PEFT adapter, applied by PEFT to the
    transformers model carrying the same dequantised experts, gives our logits."""
    from moekit.experts.quantized import QuantizationConfig, QuantizedExpertBank
    from moekit.training.quantize import quantize_experts

    source = tmp_path / "hf"
    mixtral().save_pretrained(source)
    model = from_hf(source).eval()
    quantize_experts(model, QuantizationConfig(format="int4", group_size=16))
    add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["attention", "experts"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.2)
    export_peft_adapter(model, source, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():  # the base with the experts our model computes with
        for i, layer in enumerate(model.blocks):
            bank = layer.ffn.experts
            assert isinstance(bank, QuantizedExpertBank)
            w_in, w_out = bank.dequantized_weights(torch.float32)
            experts = base.model.layers[i].mlp.experts
            gate, up = w_in.chunk(2, dim=-1)
            experts.gate_up_proj.copy_(torch.cat([gate, up], dim=-1).transpose(1, 2))
            experts.down_proj.copy_(w_out.transpose(1, 2))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(tokens).logits - loaded(tokens).logits).abs().max() <= 1e-4
