"""The package's layering, read from the source: ``kernels`` ← ``models`` ← ``distill`` ← CLIs, no cycles.

Every ``import``/``from`` statement of every module under ``freeflow`` (including imports inside functions)
is an edge of the graph, so a lazy import that would close a cycle is caught as well.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import freeflow

PACKAGE_DIR = Path(freeflow.__file__).resolve().parent  # kernels/ is reached through the freeflow/kernels link


def _modules() -> dict[str, Path]:
    mods = {}
    for root, _, files in os.walk(PACKAGE_DIR, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                rel = Path(root, f).relative_to(PACKAGE_DIR).with_suffix("")
                parts = ("freeflow", *rel.parts)
                mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(root, f)
    return mods


def _imports(name: str, path: Path, modules) -> set[str]:
    """freeflow modules that ``name`` imports (``from . import x`` resolves to the submodule when there is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # freeflow.models.dit.DiT → freeflow.models.dit
                t = t.rpartition(".")[0]
            if t.startswith("freeflow") and t != name:
                found.add(t)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _edges_without_packages(graph):
    """Edges between modules, with a package's ``__init__`` re-exports counted as the package itself."""
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


def test_the_import_graph_has_no_cycle():
    graph = _edges_without_packages(_graph())
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 30  # the walk really saw the package (it follows the kernels link)


def test_kernels_import_nothing_else_from_freeflow():
    graph = _graph()
    kernels = {m: t for m, t in graph.items() if m == "freeflow.kernels" or m.startswith("freeflow.kernels.")}
    assert kernels, "freeflow.kernels not found"
    outside = {m: sorted(t for t in ts if not t.startswith("freeflow.kernels")) for m, ts in kernels.items()}
    assert not any(outside.values()), {m: t for m, t in outside.items() if t}


def test_layers_point_one_way():
    """models never import distill or the CLIs; distill never imports models, kernels or the CLIs; nothing
    but the experiments imports the experiments."""
    graph = _graph()
    upper = ("freeflow.train", "freeflow.sample", "freeflow.evaluate", "freeflow.config", "freeflow.demo",
             "freeflow.experiments")
    for m, targets in graph.items():
        if not m.startswith("freeflow.experiments"):  # the experiments sit on top of everything
            assert not [t for t in targets if t.startswith("freeflow.experiments")], m
        if m.startswith("freeflow.models"):
            assert not [t for t in targets if t.startswith(("freeflow.distill",) + upper)], m
        if m.startswith("freeflow.distill"):
            assert not [t for t in targets if t.startswith(("freeflow.models", "freeflow.kernels") + upper)], m


def test_importing_distill_loads_neither_triton_nor_the_model_code():
    probe = ("import sys, freeflow.distill; "
             "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'freeflow.models', "
             "'freeflow.kernels'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_kernels_export_the_ops_users_call_and_keep_references_and_dispatch_one_level_down():
    """``freeflow.kernels`` is the product's surface: every exported name is an op (with its ``_jvp`` twin) or
    ``patch_dit``; each op's reference lives beside its kernel, importable from the op's module."""
    import importlib

    import freeflow.kernels as K

    assert set(K.__all__) == {n for n in dir(K) if not n.startswith("_") and callable(getattr(K, n))}
    assert not [n for n in K.__all__ if n.endswith("_reference") or n in ("check_backend", "use_triton")]
    ops = [n for n in K.__all__ if n != "patch_dit"]
    assert all((n[:-4] if n.endswith("_jvp") else n + "_jvp") in ops for n in ops)  # each op with its tangent twin
    for module, names in {"adaln": ["adaln_modulate", "gated_residual", "gated_residual_modulate"],
                          "gelu": ["bias_gelu"], "flash_attention": ["attention"]}.items():
        mod = importlib.import_module(f"freeflow.kernels.{module}")
        for name in names:
            assert callable(getattr(mod, f"{name}_reference")) and callable(getattr(mod, f"{name}_jvp_reference"))
