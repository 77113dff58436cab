"""Triton kernels and their launchers (installed as `hf_kvplug.kernels`): cache write, fused decode, extend.

This directory sits at the top of the checkout, where `python -m ...` or `python -c ...` started in the repository
root finds it under the bare name `kernels`. That name belongs to HuggingFace's `kernels` package (a dependency of
transformers >= 5.25, imported by `transformers.modeling_utils`): imported as `kernels`, this file loads that package
from the rest of `sys.path` and hands the name over to it, so this directory never shadows it; where that package is
not installed, the name is an empty stand-in that every transformers release takes for no package. The rest of
`sys.path` leaves out every checkout's directory like this one (a second checkout on PYTHONPATH, say), whose file
would hand the name back.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _checkout(entry: str) -> bool:
        """Whether `entry/kernels` is an hf_kvplug checkout's directory like this one (this first line says so)."""
        try:
            with open(os.path.join(entry or os.curdir, "kernels", "__init__.py"), "rb") as f:
                return b"installed as `hf_kvplug.kernels`" in f.readline()
        except OSError:
            return False

    _path = [p for p in sys.path if not _checkout(p)]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        # HuggingFace's package is not installed. Stand in as what Python makes of a bare directory of that name, a
        # namespace package (PEP 420: no file, nothing in it), with a version below every release of the package:
        # transformers before 5.25 (which made `kernels` a dependency) probes a module it finds on the path but not
        # among the installed distributions by importing it and comparing its version. An ImportError raised here
        # broke `import transformers` in the checkout's root (5.20: `transformers.modeling_utils` probes it).
        __file__, __path__, __version__ = None, [], "0+absent"
        del importlib, os, sys, _checkout, _path, _spec
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file ran
        _spec.loader.exec_module(_module)
else:
    import triton  # noqa: F401  (ImportError here makes hf_kvplug fall back to the reference)

    from .launch import attend_with_kvcache, write_kvcache

    __all__ = ["attend_with_kvcache", "write_kvcache"]
