"""The install as a user meets it: the repository root never shadows HuggingFace's `kernels` package (which
transformers >= 5.25 imports), from the root or anywhere else, and `hf_kvplug.kernels` still is this checkout's.
Without that package, the bare name is an empty stand-in (a namespace package's look) that transformers takes for
no package; raising there broke `import transformers` in the root under releases that probe it by importing it
(5.20, for one)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # HuggingFace's package is installed (its distribution, whatever sys.path holds here)
    importlib.metadata.distribution("kernels")
    HF_KERNELS = True
except importlib.metadata.PackageNotFoundError:
    HF_KERNELS = False


def _run(code: str, cwd: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_import_kernels_is_huggingfaces_package(where, tmp_path):
    """`python -c "import kernels"` started in the repository root (which puts the root first on sys.path) gives
    HuggingFace's package when it is installed; otherwise nothing from this checkout: elsewhere no module, in the root
    an empty stand-in (no file, no submodules, a version below every release); transformers' probe says whether the
    package is there."""
    cwd = ROOT if where == "root" else str(tmp_path)
    code = ("import kernels, importlib; from transformers.utils.import_utils import is_kernels_available as a; "
            "print(kernels.__file__, getattr(kernels, '__version__', '-'), a())\n"
            "try:\n    importlib.import_module('kernels.launch'); print('launch')\nexcept ImportError: print('none')")
    run = _run(code, cwd)
    if HF_KERNELS:
        assert run.returncode == 0, run.stderr
        path, _, available = run.stdout.split()[:3]
        assert available == "True"
        assert not os.path.realpath(path).startswith(os.path.realpath(os.path.join(ROOT, "kernels")) + os.sep), path
    elif where == "root":
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["None", "0+absent", "False", "none"], run.stdout
    else:
        assert run.returncode != 0 and "No module named 'kernels'" in run.stderr, run.stderr


def test_a_second_checkout_on_the_path_shadows_nothing(tmp_path):
    """Two checkouts on sys.path (one on PYTHONPATH, the other the working directory or an editable install): each
    one's `kernels/` leaves out both, where handing the name from one to the other would recurse without end."""
    other = tmp_path / "other"
    (other / "kernels").mkdir(parents=True)
    with open(os.path.join(ROOT, "kernels", "__init__.py"), "rb") as f:
        (other / "kernels" / "__init__.py").write_bytes(f.read())
    code = f"import sys; sys.path[:0] = [{str(other)!r}, {ROOT!r}]; import kernels; print(kernels.__file__)"
    run = _run(code, str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]  # (no RecursionError)
    if HF_KERNELS:
        path = os.path.realpath(run.stdout.strip())
        assert not path.startswith((os.path.realpath(os.path.join(ROOT, "kernels")) + os.sep,
                                    os.path.realpath(other / "kernels") + os.sep)), path
    else:
        assert run.stdout.strip() == "None"  # the stand-in


def test_repo_root_imports_transformers_and_our_kernels():
    """From the root: transformers' modeling code imports (it imports `kernels` from 5.25, and probes it before),
    and hf_kvplug's kernels are this checkout's `kernels/` directory under their installed name."""
    code = ("import transformers.modeling_utils, hf_kvplug, hf_kvplug.kernels as k, os; "
            "print(os.path.realpath(os.path.dirname(k.__file__)))")
    run = _run(code, ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == os.path.realpath(os.path.join(ROOT, "kernels"))


def test_pytest_collects_from_the_root():
    """The README's test command, from the root: collection imports transformers (and `kernels`) without error."""
    run = _run("import sys, pytest; sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', "
               "'tests/test_blocks.py']))", ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
