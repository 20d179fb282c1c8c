"""The source layout's rules, checked on the code itself: no import cycles, the library never imports the CLI,
parallelism and planning name no model's modules, model files hold no torch.distributed, imports go down the
layers only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "opendit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every opendit module this file imports, at module level or inside functions (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("opendit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opendit"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ re-exporting its modules is not a cycle of logic: only module -> module edges count.
    packages = {name for name in edges if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    edges = {n: {m for m in deps if m not in packages} for n, deps in edges.items() if n not in packages}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_cli():
    offenders = {
        name: sorted(m for m in deps if m == "opendit.cli" or m.startswith("opendit.cli."))
        for name, deps in graph().items()
        if not (name == "opendit.cli" or name.startswith("opendit.cli.") or name == "opendit.__main__")
    }
    assert not {k: v for k, v in offenders.items() if v}


def code_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, identifier or string) of everything the code uses: names, attributes, keyword arguments and string
    constants, docstrings excluded (they may describe a model as an example)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
    return found


def test_parallel_and_planning_name_no_model_module():
    # DiT's module names live in its spec (models/dit.py); the generic code reads the spec.
    names = re.compile(r"\b(x_embedder|t_embedder|y_embedder|pos_embed|final_layer|adaLN_modulation|token_shard)\b")
    hits = []
    for folder in ("parallel", "planning", "distributed"):
        for path in (PACKAGE / folder).rglob("*.py"):
            for line, text in code_names(ast.parse(path.read_text())):
                if names.search(text):
                    hits.append(f"{path.relative_to(SRC)}:{line}: {text}")
    assert not hits, "\n".join(hits)


def test_model_files_hold_no_torch_distributed():
    for path in (PACKAGE / "models").glob("*.py"):
        assert "torch.distributed" not in path.read_text(), path


# The layers of the library, lowest first: a module may import its own layer and the ones below, never above (lazy
# imports count). A call walks down them: cli/serve -> engine (executors, replica, runners) -> the request (fields,
# resolution, surfaces) -> parallel / families / cache / planning / io -> models / diffusion -> errors.
LAYERS = (
    {"errors", "plugins"},
    {"models", "diffusion"},
    {"distributed", "parallel", "families", "cache", "planning", "io", "digits", "observe", "testing"},
    {"api"},
    {"engine"},
    {"serve", "train"},
    {"cli", "__main__"},
)


def test_imports_go_down_the_layers_only():
    rank = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    upward, unplaced = [], set()
    for module, deps in graph().items():
        top = module.split(".")[1] if "." in module else None
        if top is None:
            continue  # opendit/__init__: the public names, loaded lazily
        unplaced |= {top} - set(rank)
        for dep in deps:
            above = dep.split(".")[1] if "." in dep else None
            if above is not None and above != top and rank.get(top, -1) < rank.get(above, -1):
                upward.append(f"{module} -> {dep}")
    assert not unplaced, f"place these packages/modules in LAYERS: {sorted(unplaced)}"
    assert not upward, "imports up the layers: " + "; ".join(sorted(upward))


def test_only_the_family_registry_asks_whose_model_it_is():
    """Whether a module is OpenDiT's own or a diffusers class is the family registry's question (families/, and the
    model specs in models/): nowhere else checks a module's class or spec registry to pick a code path."""
    checks = re.compile(r"\b(has_spec|spec_for_module|_is_ours)\(|isinstance\([^)]*(ModelMixin|Transformer2DModel)")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if {"families", "models", "testing"} & set(path.relative_to(PACKAGE).parts[:-1]):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if checks.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, offenders
