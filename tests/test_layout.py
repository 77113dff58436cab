"""The package's shape: imports only run downward (no circle), the library never imports its tooling, the kernels
never import the library, and a CUDA tensor never falls back to the reference because the kernels failed to import."""

from __future__ import annotations

import ast
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each module's level: a module imports only modules of a lower level (docs/architecture.md says what each owns).
LEVELS = [
    # leaves: no import from the package
    {"compat", "families", "state", "reference", "blocks", "kernels", "prefix", "rotation", "rope"},
    {"geometry", "torchpath", "device"},
    {"ops", "config"},
    {"layers"},
    {"forward", "storage"},
    {"cache"},
    {"attention", "flash"},
    {"patcher"},
    {"__init__"},
    {"tools"},  # the tooling on top: imports the library, never imported by it
    {"cli"},
    {"__main__"},
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _package_imports(path: str, package: str) -> set[str]:
    """Top-level module names of `package` that the file imports, anywhere in it (function bodies included)."""
    tree = ast.parse(open(path).read())
    here = os.path.relpath(path, ROOT).split(os.sep)
    depth = len(here) - 1  # a file in hf_kvplug/ is depth 1, in hf_kvplug/tools/ depth 2
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = here[:depth - node.level + 1]
                target = base[1:] + (node.module.split(".") if node.module else [])
                names = target[:1] or [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == package:
                names = node.module.split(".")[1:2] or [a.name for a in node.names]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith(package + ".") and a.name.count(".") >= 1)
    return found


def _modules(folder: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_library_imports_run_downward():
    problems = []
    for path in _modules("hf_kvplug"):
        rel = os.path.relpath(path, os.path.join(ROOT, "hf_kvplug")).split(os.sep)
        me = rel[0][:-3] if len(rel) == 1 else rel[0]
        if me not in LEVEL:
            problems.append(f"{'/'.join(rel)} is not placed in LEVELS")
            continue
        for name in _package_imports(path, "hf_kvplug"):
            if name == me:
                continue  # within a subpackage (tools)
            if name not in LEVEL:
                problems.append(f"{'/'.join(rel)} imports hf_kvplug.{name}, which is not placed in LEVELS")
            elif LEVEL[name] >= LEVEL[me]:
                problems.append(f"{'/'.join(rel)} (level {LEVEL[me]}) imports {name} (level {LEVEL[name]})")
    assert not problems, "\n".join(problems)


def test_kernels_never_import_the_library():
    for path in _modules("kernels"):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("hf_kvplug"), path
                assert node.level <= 1, f"{path} reaches above kernels/"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("hf_kvplug") for a in node.names), path


def test_the_check_catches_an_upward_import(tmp_path):
    """The parser sees a function-local relative import of a higher module (what `cache.py` once did)."""
    pkg = tmp_path / "hf_kvplug"
    pkg.mkdir()
    (pkg / "cache.py").write_text("def f():\n    from .patcher import SUPPORTED\n    return SUPPORTED\n")
    global ROOT
    saved, ROOT = ROOT, str(tmp_path)
    try:
        assert _package_imports(str(pkg / "cache.py"), "hf_kvplug") == {"patcher"}
    finally:
        ROOT = saved


def test_cuda_never_falls_back_silently(monkeypatch):
    from hf_kvplug import ops

    monkeypatch.setattr(ops, "_kernels", None)
    monkeypatch.setattr(ops, "_KERNELS_IMPORT_ERROR", ImportError("no triton here"))
    monkeypatch.delenv("HF_KVPLUG_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="failed to import.*backend='reference'"):
        ops.resolve_backend("auto", torch.device("cuda", 0))
    assert ops.resolve_backend("reference", torch.device("cuda", 0)) == "reference"
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
