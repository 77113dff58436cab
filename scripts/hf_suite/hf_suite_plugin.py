"""pytest plugin for scripts/hf_suite/run.py: transformers' own GenerationTesterMixin tests, stock or plugged.

Loaded with `-p hf_suite_plugin` (run.py puts this folder on PYTHONPATH). Configured by environment variables,
which run.py sets:

  HF_SUITE_MODE     "stock" (default) or "plug"
  HF_SUITE_RESULTS  path of the JSON file written at the end of the session (one record per test)
  HF_SUITE_SLACK    tokens added to each injected cache's max_cache_len (default 64; see README)
  HF_SUITE_KV_DTYPE kv_dtype of the injected caches: "" (model dtype, default), "int8" or "int4"
  HF_SUITE_THREADS  torch.set_num_threads (default: leave torch's choice)
  HF_SUITE_ALL      "1": do not narrow collection to the GenerationTesterMixin tests

What it does:

* Selection: keeps only the tests whose name is a test method defined on `GenerationTesterMixin` itself (found in
  the test class's MRO, so overrides of those tests in a model's test class are kept too); the rest is deselected.
* Plug mode: wraps `transformers.generation.utils.GenerationMixin.generate`. Every top-level `generate()` call on
  a model whose `config.model_type` is in `hf_kvplug.SUPPORTED` gets `hf_kvplug.patch(model)` and a fresh
  `PlugCache(model, max_batch_size=batch x max(num_beams, num_return_sequences), max_cache_len=prompt + new
  tokens + slack)` under `hf_kvplug.CACHE_KWARG`, unless the call passes a cache already, runs with
  `use_cache=False`, or asks for a `cache_implementation` (those run as written and are counted). The call then
  goes through `model.generate` again, i.e. through the patched model's own validating `generate`, exactly as a
  user's `model.generate(**inputs, cache=cache)` would. Calls made from inside a generate() (the assistant's
  in assisted decoding) run as written and are counted as "nested".
* Records, per test: outcome (passed / failed / error / skipped), the first line of the error or skip reason,
  and the plug counters (how many generate() calls got a PlugCache, and why the others did not).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import traceback

import pytest

MODE = os.environ.get("HF_SUITE_MODE", "stock")
RESULTS = os.environ.get("HF_SUITE_RESULTS")
SLACK = int(os.environ.get("HF_SUITE_SLACK", "64"))
KV_DTYPE = os.environ.get("HF_SUITE_KV_DTYPE") or None
THREADS = os.environ.get("HF_SUITE_THREADS")
SELECT_ALL = os.environ.get("HF_SUITE_ALL") == "1"

COUNTER_KEYS = ("injected", "has_cache", "use_cache_false", "cache_implementation", "unsupported_model", "nested",
                "inject_error")

_records: dict[str, dict] = {}
_order: list[str] = []
_collection_errors: list[dict] = []
_deselected = 0
_counters = dict.fromkeys(COUNTER_KEYS, 0)
_totals = dict.fromkeys(COUNTER_KEYS, 0)
_local = threading.local()
_lock = threading.Lock()


def _count(key: str) -> None:
    with _lock:
        _counters[key] += 1
        _totals[key] += 1


# ------------------------------------------------------------------ selection

def _mixin_test_names(cls) -> set[str] | None:
    for klass in getattr(cls, "__mro__", ()):
        if klass.__name__ == "GenerationTesterMixin":
            return {name for name, value in vars(klass).items() if name.startswith("test") and callable(value)}
    return None


def pytest_collection_modifyitems(session, config, items):
    global _deselected
    if SELECT_ALL:
        return
    keep, drop = [], []
    for item in items:
        names = _mixin_test_names(getattr(item, "cls", None))
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        (keep if names and name in names else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        _deselected += len(drop)
    items[:] = keep


def pytest_collectreport(report):
    if report.failed:
        _collection_errors.append({"nodeid": report.nodeid, "message": _first_line(report)})


# ------------------------------------------------------------------ plug mode: the generate() wrapper

def _generation_config(model, args, kwargs):
    config = kwargs.get("generation_config")
    if config is None and len(args) > 1:
        config = args[1]
    return config if config is not None else getattr(model, "generation_config", None)


def _setting(name, kwargs, config, default=None):
    if name in kwargs and kwargs[name] is not None:
        return kwargs[name]
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else value


def _sizes(model, args, kwargs, config) -> tuple[int, int]:
    """(max_batch_size, max_cache_len) for a generate() call, as a user would size them (README, "Use it")."""
    tensors = [args[0] if args else kwargs.get("inputs"), kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
    tensors = [t for t in tensors if t is not None and hasattr(t, "shape") and t.dim() >= 2]
    mask = kwargs.get("attention_mask")
    batch = tensors[0].shape[0] if tensors else (mask.shape[0] if mask is not None and mask.dim() == 2 else 1)
    prompt = max([t.shape[1] for t in tensors] + [mask.shape[-1] if mask is not None and mask.dim() == 2 else 0]
                 + [1])
    expand = max(int(_setting("num_beams", kwargs, config, 1)), int(_setting("num_return_sequences", kwargs,
                                                                            config, 1)))
    max_new = _setting("max_new_tokens", kwargs, config)
    if max_new is not None:
        total = prompt + int(max_new)
    else:
        total = max(int(_setting("max_length", kwargs, config, 20)), prompt)
    return batch * expand, total + SLACK


def _passthrough_reason(model, args, kwargs, config) -> str | None:
    import hf_kvplug

    if getattr(_local, "active", False):
        return "nested"
    if getattr(getattr(model, "config", None), "model_type", None) not in hf_kvplug.SUPPORTED:
        return "unsupported_model"
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        return "has_cache"
    if kwargs.get("use_cache") is False or (config is not None and getattr(config, "use_cache", None) is False):
        return "use_cache_false"
    if kwargs.get("cache_implementation") is not None or (
            config is not None and getattr(config, "cache_implementation", None) is not None):
        return "cache_implementation"
    return None


def _install_plug_wrapper() -> None:
    from transformers.generation.utils import GenerationMixin

    import hf_kvplug

    original = GenerationMixin.generate
    if getattr(original, "_hf_suite_wrapped", False):
        return

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        if getattr(_local, "reentry", None) is not None and any(
                kwargs.get(name) is _local.reentry for name in ("cache", "past_key_values")):
            # our own call below, back here through the patched model's generate(): run it, count nothing
            _local.reentry = None
            return original(self, *args, **kwargs)
        config = _generation_config(self, args, kwargs)
        reason = _passthrough_reason(self, args, kwargs, config)
        if reason is not None:
            _count(reason)
            return original(self, *args, **kwargs)
        try:
            rows, length = _sizes(self, args, kwargs, config)
            hf_kvplug.patch(self)
            cache = hf_kvplug.PlugCache(self, max_batch_size=rows, max_cache_len=length, kv_dtype=KV_DTYPE)
        except Exception:
            _count("inject_error")  # raised as the test's error: the plugged run cannot even start
            raise
        _count("injected")
        _local.active, _local.reentry = True, cache
        try:
            # through the patched model's own generate(), which validates the cache as it does for a user
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}  # None-valued
            return self.generate(*args, **{hf_kvplug.CACHE_KWARG: cache}, **kwargs)
        finally:
            _local.active, _local.reentry = False, None

    generate._hf_suite_wrapped = True
    GenerationMixin.generate = generate


# ------------------------------------------------------------------ session

def pytest_configure(config):
    if THREADS:
        import torch

        torch.set_num_threads(int(THREADS))
    if MODE == "plug":
        _install_plug_wrapper()
    elif MODE != "stock":
        raise pytest.UsageError(f"HF_SUITE_MODE must be 'stock' or 'plug', not {MODE!r}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    with _lock:
        for key in COUNTER_KEYS:
            _counters[key] = 0
    _local.active, _local.reentry = False, None


def _first_line(report) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip: (path, line, reason)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None and getattr(crash, "message", None) else str(longrepr)
        if crash is None:
            lines = [line for line in text.splitlines() if line.startswith("E ")]
            text = lines[0][1:].strip() if lines else text.strip().splitlines()[-1] if text.strip() else ""
    text = text.strip()
    return text.splitlines()[0][:400] if text else ""


def pytest_runtest_logreport(report):
    nodeid = report.nodeid
    record = _records.get(nodeid)
    if record is None:
        record = _records[nodeid] = {"outcome": None, "message": "", "duration": 0.0, "subtests_failed": 0,
                                     "plug": None, "_main": None}
        _order.append(nodeid)
    record["duration"] += getattr(report, "duration", 0.0) or 0.0
    is_subtest = hasattr(report, "context")  # pytest >= 9 reports unittest subTest()s separately
    if report.when in ("setup", "teardown"):
        if report.failed:
            record["outcome"] = "error"
            record["message"] = record["message"] or f"[{report.when}] {_first_line(report)}"
        elif report.skipped and report.when == "setup":
            record["_main"] = "skipped"
            record["message"] = record["message"] or _first_line(report)
        if report.when == "teardown":
            with _lock:
                record["plug"] = dict(_counters)
            _finish(record)
        return
    if report.failed:
        if is_subtest:
            record["subtests_failed"] += 1
        if record["outcome"] != "error":
            record["outcome"] = "failed"
        if not record["message"] or record["_main"] == "skipped":
            record["message"] = _first_line(report)
    elif not is_subtest:
        record["_main"] = "skipped" if report.skipped else "passed"
        if report.skipped and not record["message"]:
            record["message"] = _first_line(report)


def _finish(record: dict) -> None:
    if record["outcome"] is None:
        record["outcome"] = record["_main"] or "passed"
    if record["outcome"] == "passed":
        record["message"] = ""


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    tests = {}
    for nodeid in _order:
        record = dict(_records[nodeid])
        record.pop("_main", None)
        if record["outcome"] is None:
            record["outcome"] = "error"
            record["message"] = record["message"] or "no teardown report (the session was interrupted)"
        tests[nodeid] = record
    data = {
        "mode": MODE,
        "transformers": _version("transformers"),
        "torch": _version("torch"),
        "hf_kvplug": _version("hf_kvplug"),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "exitstatus": int(exitstatus),
        "deselected": _deselected,
        "collection_errors": _collection_errors,
        "plug_totals": dict(_totals),
        "slack": SLACK,
        "kv_dtype": KV_DTYPE,
        "tests": tests,
    }
    os.makedirs(os.path.dirname(os.path.abspath(RESULTS)), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1)


def _version(name: str) -> str | None:
    try:
        module = __import__(name)
        return getattr(module, "__version__", None)
    except Exception:  # noqa: BLE001 - informational only
        return "unimportable: " + traceback.format_exc(limit=0).strip().splitlines()[-1]
