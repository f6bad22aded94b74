"""The package map of docs/architecture.md holds: no import cycles, and each package imports only
packages of a lower layer (module-level imports; a function may import upward lazily)."""

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
    "analysis": 3,
    "layers": 4,
    "collect": 5,
    "models": 5,
    "classic": 5,
    "distributed": 6,
    "interop": 6,
    "adapters": 5.5,
    "training": 7,
    "moekit": 7.5,  # the top-level package's public API, for the command line
    "cli": 8,
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports() -> dict[str, set[str]]:
    """moekit modules imported at module level (``if TYPE_CHECKING:`` blocks left out)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        for node in ast.parse(path.read_text()).body:
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
    # a package's __init__ importing its own modules is not a cycle between packages
    real = [c for c in cycles if len({_package(m) for m in c}) > 1 or len(c) > 2]
    assert not real, real


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
