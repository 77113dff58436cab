"""Test setup: Triton kernels run on the CPU interpreter when no GPU is present; GPU tests skip cleanly."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py


def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or None. Triton < 3.7's interpreter turns scalars
    loaded from memory into 1-element arrays, which NumPy >= 2.3 refuses to convert to loop bounds."""
    try:
        import numpy
        import triton
    except ImportError as e:
        return f"Triton is not importable: {e}"
    version = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 3):
        return (f"Triton {triton.__version__}'s interpreter needs NumPy < 2.3 (have {numpy.__version__}): "
                "pip install 'numpy<2.3' to run the kernels on the CPU")
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    problem = _interpreter_problem()
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
        elif problem and "interpreter" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
