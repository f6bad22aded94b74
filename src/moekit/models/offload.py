"""Load a language model whose routed experts stay in the checkpoint file: only the experts a
byte budget allows are held in memory at once (``moekit generate --expert-budget 2GB``).

Everything but the routed experts (embeddings, attention, norms, routers, shared experts, dense
FFNs) is loaded as usual; each MoE layer's bank becomes an ``OffloadedExpertBank`` reading one
expert's bytes at a time from ``model.safetensors`` through one ``ExpertCache`` shared by all
layers. With
``prefetch=True``, while layer ``l`` runs, layer ``l+1``'s router is applied to layer ``l``'s input
(the residual stream changes little between blocks) and the experts it would pick are read
ahead on a background thread.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import nn

from moekit.experts.offload import (
    EvictionPolicy,
    ExpertCache,
    ExpertStore,
    OffloadedExpertBank,
    parse_bytes,
)
from moekit.layers import MoE
from moekit.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_config
from moekit.models.transformer.model import TransformerLM
from moekit.routing.topk import TopKRouter
from moekit.utils.serialization import read_config_file, verify_checksums


def load_offloaded(
    directory: str | os.PathLike,
    *,
    budget: int | str,
    policy: EvictionPolicy | str = EvictionPolicy.LRU,
    prefetch: bool = False,
    device: torch.device | str = "cpu",
    verify: bool | None = None,
) -> TransformerLM:
    """A ``TransformerLM`` from a moekit checkpoint folder whose experts are read on demand.

    Args:
        directory: a checkpoint folder (``save_pretrained``; a run's checkpoint).
        budget: bytes the cached experts may take (``"2GB"``, ``"512MiB"`` or an int); must hold
            at least one expert.
        policy: ``lru`` or ``lfu`` eviction.
        prefetch: read the next MoE layer's predicted experts ahead (top-k routers). Off by
            default: on the demo model the lookahead guessed few of the next layer's experts
            and, under small budgets, evicted useful ones (docs/quantization.md).
        device: where the model runs and cached experts are kept.
        verify: check the file's recorded SHA-256 first (``None``: as ``from_pretrained``).

    The model's ``expert_cache`` attribute is the ``ExpertCache`` (its ``stats``); call
    ``expert_cache.close()`` when done to stop the prefetch thread.
    """
    directory = Path(directory)
    model_type, config = read_config(directory)
    if model_type != TransformerLM.model_type:
        raise ValueError(f"{directory}: expert offload needs a language model, got {model_type}")
    if read_config_file(directory / CONFIG_FILE).get("lora") is not None:
        raise ValueError(
            f"{directory} holds LoRA adapters; merge them first (moekit convert writes a merged "
            "checkpoint) to offload its experts"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
    verify_checksums(directory, [WEIGHTS_FILE], verify)
    device = torch.device(device)
    cache = ExpertCache(parse_bytes(budget), policy)
    store = ExpertStore(weights, device)
    with torch.device("meta"):
        model = TransformerLM(config)
    banks = _offload_banks(model, store, cache)
    if not banks:
        raise ValueError(f"{directory}: the model has no MoE layer to offload")
    model.to_empty(device=device)
    _load_resident(model, weights, device)
    model.init_buffers()
    if prefetch:
        _add_prefetch_hooks(model, banks)
    cast(Any, model).expert_cache = cache
    return model.eval()


def _offload_banks(model: nn.Module, store: ExpertStore, cache: ExpertCache) -> list[MoE]:
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        old = cast(Any, module.experts)
        module.experts = OffloadedExpertBank(
            store,
            cache,
            f"{name}.experts",
            num_experts=old.num_experts,
            d_model=old.d_model,
            hidden=old.hidden,
            activation=old.activation,
            quantization=getattr(old, "quantization", None),
        )
        layers.append(module)
    return layers


def _load_resident(model: nn.Module, weights: Path, device: torch.device) -> None:
    """Every tensor but the offloaded experts, read from the file; named when missing."""
    expected = model.state_dict()
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            if missing:
                raise ValueError(f"{weights} does not match its config.json (missing: {missing})")
            tensors = {name: f.get_tensor(name) for name in expected}
    except ValueError:
        raise
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{weights} is corrupt or truncated: {error}") from None
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, the config gives "
                f"{tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)


def _add_prefetch_hooks(model: nn.Module, layers: list[MoE]) -> None:
    """Before layer ``l`` runs, layer ``l+1``'s top-k router picks experts for ``l``'s input and
    they are read ahead."""
    for layer, following in itertools.pairwise(layers):
        router, bank = following.router, following.experts
        if not isinstance(router, TopKRouter):
            continue

        def hook(_module, args, router=router, bank=bank) -> None:
            if router.forced_routes is not None:  # a replayed routing: nothing to predict
                return
            x = args[0]
            with torch.no_grad():
                chosen = router(x.reshape(-1, x.shape[-1])).expert_idx_TK.unique()
            cast(OffloadedExpertBank, bank).prefetch(chosen.tolist())

        layer.register_forward_pre_hook(hook)
