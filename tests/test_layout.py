"""The package's layering: no import circle between its modules (function-level imports included), and the model
file imports no other nanokimi module but the token-sampling helper, the experts' grouped GEMM and its own KDA layer
(no file I/O, no training code)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nanokimi"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """The nanokimi modules `path` imports anywhere in its body."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import checkpoint` imports a module, `from .x import f` module x
                candidate = f"{target}.{alias.name}"
                found.add(
                    candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() else target
                )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] == "nanokimi" and m != name}


def graph():
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_circle():
    edges = graph()

    def visit(node, path):
        assert node not in path, f"import circle: {' -> '.join(path[path.index(node) :] + [node])}"
        for nxt in edges.get(node, ()):
            visit(nxt, path + [node])

    for module in edges:
        visit(module, [])


def test_model_imports_only_the_sampling_helper_the_expert_kernel_and_kda():
    assert imports(PACKAGE / "model.py") == {"nanokimi.sampling", "nanokimi.grouped_gemm", "nanokimi.kda"}
    assert imports(PACKAGE / "grouped_gemm.py") == {"nanokimi.hardware"}  # the kernel: chosen by the machine
    assert imports(PACKAGE / "kda.py") == set()  # the layer stands alone beside MLA
    assert imports(PACKAGE / "baseline.py") == {"nanokimi.sampling"}
    assert imports(PACKAGE / "optim.py") == {"nanokimi.hardware"}  # the optimizer asks layers to rescale themselves
    assert imports(PACKAGE / "hardware.py") == {"nanokimi.errors"}  # its device check speaks in one line


def test_the_core_never_imports_transformers():
    """docs/interop.md: transformers is optional (nanokimi[hf]); import and export read and write its files with
    safetensors and json, so no module of the package imports it, anywhere in its body."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{path.name} imports transformers"
