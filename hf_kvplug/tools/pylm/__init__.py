"""pylm: the small Llama (GQA) trained on the Python standard library that ships with hf_kvplug as package data.

`path()` is its checkpoint directory (config, fp16 weights, tokenizer, model card), for `from_pretrained`.
`stdlib_files()` / `is_heldout()` are the data split it was trained on (scripts/train_pylm.py), so the quality
benchmark reads text the model never saw.
"""

from __future__ import annotations

import os
import sysconfig
import zlib

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HELDOUT_MODULUS = 20


def path() -> str:
    """The checkpoint directory: `AutoModelForCausalLM.from_pretrained(path())` loads it (fp32)."""
    return os.path.dirname(os.path.abspath(__file__))


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of every usable `.py` file of this Python's standard library, sorted by path: test
    suites, site-packages and files that are not UTF-8 (or empty) left out."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            file = os.path.join(dirpath, name)
            try:
                with open(file, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                found.append((os.path.relpath(file, root).replace(os.sep, "/"), text))
    return sorted(found)


def is_heldout(relpath: str, modulus: int = HELDOUT_MODULUS) -> bool:
    """Held out from training (by file): crc32 of the path relative to the stdlib root, modulo `modulus`, is 0."""
    return zlib.crc32(relpath.encode()) % modulus == 0


def heldout_texts(modulus: int = HELDOUT_MODULUS) -> list[str]:
    """The held-out files' texts, in path order."""
    return [text for rel, text in stdlib_files() if is_heldout(rel, modulus)]
