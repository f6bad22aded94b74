"""The package map of docs/architecture.md holds: no import cycles (module level or lazy, inside
a package or between packages), each package imports only packages of a lower layer at module
level, and every lazy upward import (inside a function) is one of the decisions listed below."""

import ast
import pathlib
from collections import defaultdict

import moekit

SRC = pathlib.Path(moekit.__file__).parent

# lower number = lower layer; a package may import only packages with a smaller number
LAYERS = {
    "utils": 0,
    "routing": 1,
    "experts": 1,
    "dispatch": 2,
    "losses": 2,
    "layers": 4,
    "models": 5,
    "classic": 5,
    "distributed": 6,
    "interop": 6,
    "adapters": 5.5,
    "analysis": 6.5,  # above the models: accounting, inspection, plots
    "training": 7,
    "moekit": 7.5,  # the top-level package's public API, for the command line
    "cli": 8,
}


# Lazy imports (inside a function) that go up the map, each a decision with its reason.
ALLOWED_LAZY_UPWARD = {
    # a checkpoint saved with LoRA adapters is rebuilt with them: loading needs the adapters,
    # which sit above the models they wrap
    ("moekit.models.checkpoint", "moekit.adapters.lora"),
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(lazy: bool = False) -> dict[str, set[str]]:
    """moekit modules imported at module level (``if TYPE_CHECKING:`` blocks left out), or with
    ``lazy`` those imported inside functions."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        nodes = [n for n in ast.walk(tree) if id(n) not in top] if lazy else tree.body
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moekit"):
                assert node.module is not None
                folder = SRC.parent / node.module.replace(".", "/")
                submodules = [a.name for a in node.names if (folder / f"{a.name}.py").exists()]
                # "from moekit.interop import keymap" imports the module keymap
                graph[name].update(f"{node.module}.{m}" for m in submodules)
                if len(submodules) < len(node.names):
                    graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("moekit"))
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moekit"


def test_no_import_cycles():
    graph = _module_imports()
    for module, deps in _module_imports(lazy=True).items():
        graph[module] |= deps
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep] if dep in stack else [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ importing its own modules (and a module importing its package's
    # __init__ names) is not a cycle
    real = [c for c in cycles if not _through_own_init(c)]
    assert not real, real


def _through_own_init(cycle: list[str]) -> bool:
    return any(m.count(".") < n.count(".") and n.startswith(m + ".") for m in cycle for n in cycle)


def test_packages_import_only_lower_layers():
    wrong = []
    for module, deps in _module_imports().items():
        source = _package(module)
        if source == "moekit":  # the top-level __init__ re-exports the public API
            continue
        assert source in LAYERS, f"{source} is missing from the package map"
        for dep in deps:
            target = _package(dep)
            if target != source and not LAYERS.get(target, 99) < LAYERS[source]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, wrong


def test_lazy_upward_imports_are_decisions():
    upward = set()
    for module, deps in _module_imports(lazy=True).items():
        source = _package(module)
        for dep in deps:
            target = _package(dep)
            if target != source and not LAYERS.get(target, 99) < LAYERS.get(source, 99):
                upward.add((module, dep))
    assert upward == ALLOWED_LAZY_UPWARD, (
        "new lazy upward imports (add them to ALLOWED_LAZY_UPWARD with the reason, or move "
        f"the code): {sorted(upward - ALLOWED_LAZY_UPWARD)}; no longer needed: "
        f"{sorted(ALLOWED_LAZY_UPWARD - upward)}"
    )


def test_every_model_builds_from_the_common_parts():
    """The encoder–decoder, the ViT, the shared parts and the recurrent mixers import nothing
    from the decoder-only model's package: what they share lives in ``models/common``."""
    for package in ("encoder_decoder", "vision", "common", "mixers"):
        for path in (SRC / "models" / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith("moekit.models.transformer"), (
                        f"{path.relative_to(SRC)} imports {node.module}"
                    )


def test_the_encoder_decoder_and_the_vit_blocks_are_the_common_block():
    """Their blocks are ``models.common.block.Block``s; the encoder–decoder's parameters keep
    the order its earlier checkpoints' optimizer state was saved in (``ffn`` before ``attn``)."""
    import moekit
    from moekit.models.common.block import Block
    from moekit.models.common.placement import MoEPlacementConfig
    from moekit.models.encoder_decoder import EncoderDecoderConfig
    from moekit.models.vision import VisionMoEConfig

    layer = moekit.MoEConfig(num_experts=4, top_k=1, experts=moekit.ExpertConfig(hidden=8))
    model = EncoderDecoderConfig(
        vocab_size=32,
        d_model=16,
        n_encoder_layers=1,
        n_decoder_layers=1,
        n_heads=2,
        head_dim=8,
        ffn_hidden=32,
        decoder_moe=MoEPlacementConfig(layer=layer),
    ).build()
    for stack in (model.encoder, model.decoder):
        assert all(isinstance(block, Block) for block in stack.blocks)
    names = [
        n.split(".")[3] for n, _ in model.named_parameters() if n.startswith("decoder.blocks.0")
    ]
    assert list(dict.fromkeys(names)) == [
        "ffn_norm",
        "ffn",
        "attn_norm",
        "attn",
        "cross_norm",
        "cross_attn",
    ]
    vit = VisionMoEConfig(
        image_size=8, patch_size=4, num_classes=3, d_model=16, n_layers=2, n_heads=2
    ).build()
    assert all(isinstance(block, Block) for block in vit.blocks)
