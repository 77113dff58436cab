"""Benchmark providers and one measured case: the caches compared, the per-step timer, and the result row.

How a case is measured (`run_case`):
  * `_compile` providers start from a reset torch.compile state (`torch.compiler.reset()`), so every case compiles
    its own static-shape graphs as a fresh process would, and nothing counts against Dynamo's recompile limit;
  * one warm-up `generate` on the same cache object (compile and CUDA-graph capture happen there; by default with a
    32-token prompt, since the decode graphs do not depend on the prompt length; `--full-warmup` uses the whole
    prompt, which also warms the prefill), then one measured `generate`; `warmup_s` records the warm-up's time;
  * a `LogitsProcessor` (`StepTimer`) synchronises the device and records `time.perf_counter()` each time logits
    arrive: prefill ms = first record - the time `generate` was called (includes generate's own setup, a few ms);
    decode step i = record i - record i-1 (one decode forward + sampling + the sync), over `new_tokens - 1` steps;
  * tokens/s = rows x decode steps / (last record - first record), rows = batch x `--return-sequences`;
  * KV bytes = what the cache holds (a PlugCache: its preallocated buffers); KV in use = the bytes of the blocks
    the rows map at the end (a PlugCache stores a prompt once for the rows `num_return_sequences` expands from it),
    or, for HF's caches, KV bytes again;
  * peak memory = `torch.cuda.max_memory_allocated` over the measured run (reset before it; weights included);
  * bandwidth floor of a decode step = (weight bytes read per step, i.e. all parameters but an untied input
    embedding, + KV bytes read per step) / copy bandwidth (`models.copy_bandwidth`), with
    the KV read = rows x (context + new_tokens / 2) tokens x bytes/token (the mean over the decode steps) for caches
    that read only the filled slots, and rows x max_cache_len x bytes/token for HF's StaticCache (SDPA reads the
    whole buffer); `bw_floor_fraction` = floor / measured median step (1.0 = at the copy-bandwidth limit);
  * an out-of-memory error becomes a row with status OOM (and the provider's larger cases are not run), any other
    exception a row with status ERROR and its first line as the note (tracebacks go to errors.log in --out).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .models import dtype_name, sync
from ..cache import PlugCache
from ..config import layer_token_bytes
from ..geometry import Geometry
from ..patcher import patched
from ..compat import cache_kwargs as kv

OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass(frozen=True)
class Provider:
    name: str
    cache: str  # "dynamic" | "static" | "quantized" | "plug"
    kv_dtype: str | None = None
    compile: bool = False
    description: str = ""


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("hf_dynamic", "dynamic", description="HF DynamicCache, sdpa, eager"),
    Provider("hf_static_compile", "static", compile=True,
             description="HF StaticCache (max_cache_len = 2 x context) + generate's auto-compile"),
    Provider("hf_quantized", "quantized", description="HF QuantizedCache (quanto / hqq / fp8 backend), eager"),
    Provider("kvplug", "plug", description="PlugCache in the model dtype, eager"),
    Provider("kvplug_compile", "plug", compile=True,
             description="PlugCache in the model dtype + generate's auto-compile"),
    Provider("kvplug_int8", "plug", kv_dtype="int8", description="PlugCache INT8, eager"),
    Provider("kvplug_int8_compile", "plug", kv_dtype="int8", compile=True,
             description="PlugCache INT8 + generate's auto-compile"),
    Provider("kvplug_int4", "plug", kv_dtype="int4", description="PlugCache INT4, eager"),
    Provider("kvplug_int4_compile", "plug", kv_dtype="int4", compile=True,
             description="PlugCache INT4 + generate's auto-compile"),
)}


@dataclass(frozen=True)
class BenchCase:
    provider: str
    batch: int
    context: int
    new_tokens: int


@dataclass
class Settings:
    """What every case of one run shares."""

    model_label: str
    device: torch.device
    dtype: torch.dtype
    weights_read_bytes: int
    copy_bw: float  # bytes/s
    env: dict = field(default_factory=dict)  # gpu_name, torch, triton, transformers, git_commit, date
    seed: int = 0
    compile_on_cpu: bool = False
    plug_backend: str = "auto"
    block_size: int = 64
    full_warmup: bool = False
    warmup_prompt: int = 32
    return_sequences: int = 1  # > 1: sampling with num_return_sequences (rows expanded from each prompt)


@dataclass
class BenchRow:
    provider: str
    model: str
    dtype: str
    device: str
    batch: int
    context: int
    new_tokens: int
    max_cache_len: int | None = None
    prefill_ms: float | None = None
    decode_ms_p50: float | None = None
    decode_ms_p20: float | None = None
    decode_ms_p80: float | None = None
    tokens_per_s: float | None = None
    peak_mem_gb: float | None = None
    kv_bytes: int | None = None
    kv_in_use_bytes: int | None = None
    return_sequences: int = 1
    bw_floor_ms: float | None = None
    bw_floor_fraction: float | None = None
    copy_bw_gbps: float | None = None
    warmup_s: float | None = None
    status: str = "ok"
    note: str = ""
    gpu_name: str = ""
    torch: str = ""
    triton: str = ""
    transformers: str = ""
    git_commit: str = ""
    date: str = ""


class StepTimer(LogitsProcessor):
    """A `LogitsProcessor` that records a synchronised `perf_counter()` each time generate produces logits."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def empty_row(case: BenchCase, settings: Settings, **kw) -> BenchRow:
    return BenchRow(provider=case.provider, model=settings.model_label, dtype=dtype_name(settings.dtype),
                    device=str(settings.device), batch=case.batch, context=case.context,
                    new_tokens=case.new_tokens, copy_bw_gbps=round(settings.copy_bw / 1e9, 1),
                    return_sequences=settings.return_sequences, **settings.env, **kw)


def plug_cache_len(context: int, new_tokens: int, block_size: int) -> int:
    return math.ceil((context + new_tokens) / block_size) * block_size


def static_cache_len(context: int, new_tokens: int) -> int:
    return max(2 * context, context + new_tokens)


def kv_bytes_per_token(model, kv_dtype: str | None = None) -> int:
    """K, V (and INT8 scale) bytes per token over all layers: the model dtype is what HF's fp caches hold too."""
    geometry = Geometry.from_hf_config(model.config, dtype=model.dtype, device="cpu")
    return len(geometry.attention_layers) * layer_token_bytes(geometry, kv_dtype)


def max_cache_len_for(provider: Provider, case: BenchCase, block_size: int) -> int:
    if provider.cache == "plug":
        return plug_cache_len(case.context, case.new_tokens, block_size)
    if provider.cache == "static":
        return static_cache_len(case.context, case.new_tokens)
    return case.context + case.new_tokens


def predicted_kv_bytes(provider: Provider, case: BenchCase, model, block_size: int,
                       return_sequences: int = 1) -> int | None:
    """Bytes the case's cache will hold at its largest (None when unknown, e.g. quantized)."""
    if provider.cache == "quantized":
        return None
    rows = case.batch * return_sequences
    return rows * max_cache_len_for(provider, case, block_size) * kv_bytes_per_token(model, provider.kv_dtype)


# ------------------------------------------------------------------------------------------------ caches

def quantized_backend(config) -> tuple[str | None, str]:
    """The first QuantizedCache backend that builds here (quanto, hqq, then transformers' own fp8), and a note."""
    from transformers.cache_utils import QuantizedCache

    tried = []
    for backend, module in (("quanto", "optimum.quanto"), ("hqq", "hqq"), ("fp8", None)):
        if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            tried.append(f"{backend}: {module} not installed")
            continue
        try:
            QuantizedCache(backend, config=config)
        except Exception as e:  # noqa: BLE001 - any failure means "this backend is unavailable"
            tried.append(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
            continue
        return backend, "; ".join(tried + [f"using backend={backend}"])
    return None, "; ".join(tried)


class CacheFactory:
    """Makes the cache a provider generates with: one preallocated cache reused via reset(), or a fresh one per run."""

    def __init__(self, provider: Provider, case: BenchCase, model, settings: Settings):
        self.provider, self.case, self.model, self.settings = provider, case, model, settings
        self.max_cache_len = max_cache_len_for(provider, case, settings.block_size)
        self.note = ""
        self._cache = None
        if provider.cache == "plug":
            self._cache = PlugCache(model, max_batch_size=case.batch * settings.return_sequences,
                                    max_cache_len=self.max_cache_len,
                                    kv_dtype=provider.kv_dtype, block_size=settings.block_size,
                                    backend=settings.plug_backend)
        elif provider.cache == "static":
            from transformers import StaticCache

            self._cache = StaticCache(config=model.config, max_cache_len=self.max_cache_len)
        elif provider.cache == "quantized":
            self.backend, self.note = quantized_backend(model.config)

    def new(self):
        if self._cache is not None:
            self._cache.reset()
            return self._cache
        if self.provider.cache == "dynamic":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        from transformers.cache_utils import QuantizedCache

        return QuantizedCache(self.backend, config=self.model.config)


def cache_bytes(cache) -> int:
    """Bytes held by a cache's tensors (PlugCache: its buffers; HF caches: every tensor its layers hold)."""
    if isinstance(cache, PlugCache):
        return cache.nbytes
    seen: set[int] = set()
    return sum(_tensor_bytes(vars(layer), seen, depth=3) for layer in cache.layers)


def _tensor_bytes(obj, seen: set[int], depth: int) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen or obj.device.type == "meta":
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if depth <= 0:
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth - 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensor_bytes(vars(obj), seen, depth - 1)
    return 0


# ------------------------------------------------------------------------------------------------ one case

def skip_reason(provider: Provider, settings: Settings) -> str | None:
    if provider.compile and settings.device.type != "cuda" and not settings.compile_on_cpu:
        return "generate only auto-compiles on accelerators; pass --compile-on-cpu to compile on the CPU"
    return None


def random_prompt(batch: int, length: int, vocab: int, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).to(device)


def generate_kwargs(provider: Provider, settings: Settings, cache, new_tokens: int, timer: StepTimer) -> dict:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kv(cache),
              logits_processor=LogitsProcessorList([timer]), disable_compile=not provider.compile)
    if settings.return_sequences > 1:  # rows expanded from each prompt: sampled (seeded in timed_generate)
        kw.update(do_sample=True, top_k=50, num_return_sequences=settings.return_sequences)
    if provider.compile and settings.device.type != "cuda":
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, mode="default")
        config._compile_all_devices = True
        kw["compile_config"] = config
    return kw


def timed_generate(model, provider, settings, cache, prompt, new_tokens):
    """One generate; returns (sequences, generate start time, the timer's records)."""
    timer = StepTimer(settings.device)
    kw = generate_kwargs(provider, settings, cache, new_tokens, timer)
    mask = torch.ones_like(prompt)
    torch.manual_seed(settings.seed)
    sync(settings.device)
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=mask, **kw)  # generate runs under torch.no_grad() itself
    sync(settings.device)
    return out, start, timer.times


def median_p20_p80(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(values), q[1], q[7]


def _compiled_graphs() -> int:
    try:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return -1


def reset_compile_state(model) -> None:
    """Forget every compiled graph (and CUDA graph pool) so a case compiles afresh, as a new process would."""
    torch.compiler.reset()
    for attr in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(attr, None)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(model, case: BenchCase, settings: Settings) -> BenchRow:
    """Warm up and measure one (provider, batch, context); exceptions propagate (see `run_case_safe`)."""
    provider = PROVIDERS[case.provider]
    reason = skip_reason(provider, settings)
    if reason:
        return empty_row(case, settings, status="skipped", note=reason)
    if provider.compile:
        reset_compile_state(model)
    factory = CacheFactory(provider, case, model, settings)
    row = empty_row(case, settings, max_cache_len=factory.max_cache_len)
    if provider.cache == "quantized" and factory.backend is None:
        row.status, row.note = "skipped", "no QuantizedCache backend: " + factory.note
        return row
    notes = [factory.note] if factory.note else []
    vocab = model.config.get_text_config().vocab_size
    prompt = random_prompt(case.batch, case.context, vocab, settings.seed, settings.device)
    warm_len = case.context if settings.full_warmup else min(case.context, settings.warmup_prompt)
    with patched(model) if provider.cache == "plug" else contextlib.nullcontext():
        start = time.perf_counter()
        timed_generate(model, provider, settings, factory.new(), prompt[:, :warm_len], case.new_tokens)
        row.warmup_s = round(time.perf_counter() - start, 3)
        cache = factory.new()
        graphs = _compiled_graphs()
        if settings.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(settings.device)
        out, t0, times = timed_generate(model, provider, settings, cache, prompt, case.new_tokens)
        if settings.device.type == "cuda":
            row.peak_mem_gb = round(torch.cuda.max_memory_allocated(settings.device) / 1e9, 3)
    if _compiled_graphs() > graphs >= 0:
        notes.append("recompiled during the measured run")
    generated = out.shape[1] - case.context
    if generated != case.new_tokens:
        notes.append(f"generated {generated} tokens, not {case.new_tokens}")
    row.kv_bytes = cache_bytes(cache)
    row.kv_in_use_bytes = cache.stats()["bytes_in_use"] if isinstance(cache, PlugCache) else row.kv_bytes
    _fill_timings(row, t0, times)
    _fill_floor(row, provider, case, settings, model, generated)
    row.note = "; ".join(notes)
    return row


def _fill_timings(row: BenchRow, t0: float, times: list[float]) -> None:
    row.prefill_ms = round((times[0] - t0) * 1e3, 3)
    steps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    if not steps:
        return
    p50, p20, p80 = median_p20_p80(steps)
    row.decode_ms_p50, row.decode_ms_p20, row.decode_ms_p80 = round(p50, 4), round(p20, 4), round(p80, 4)
    row.tokens_per_s = round(row.batch * row.return_sequences * len(steps) / (times[-1] - times[0]), 2)


def _fill_floor(row: BenchRow, provider: Provider, case: BenchCase, settings: Settings, model, generated: int):
    rows = case.batch * settings.return_sequences
    if provider.cache == "static":
        kv_read = rows * row.max_cache_len * kv_bytes_per_token(model)
    else:
        if provider.cache == "quantized":  # what it holds per token at the end, residual window included
            bpt = row.kv_bytes / max(rows * (case.context + max(generated, 1) - 1), 1)
        else:
            bpt = kv_bytes_per_token(model, provider.kv_dtype)
        kv_read = rows * (case.context + case.new_tokens / 2) * bpt
    floor_s = (settings.weights_read_bytes + kv_read) / settings.copy_bw
    row.bw_floor_ms = round(floor_s * 1e3, 4)
    if row.decode_ms_p50:
        row.bw_floor_fraction = round(row.bw_floor_ms / row.decode_ms_p50, 4)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OOM_ERRORS) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def run_case_safe(model, case: BenchCase, settings: Settings, error_log=None) -> BenchRow:
    """`run_case`, with an out-of-memory recorded as status OOM and any other failure as ERROR (never raised).
    Compiled graphs and CUDA-graph pools are dropped afterwards, so the next case starts from a clean device."""
    try:
        row = run_case(model, case, settings)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row = empty_row(case, settings, status="OOM" if is_oom(e) else "ERROR",
                        note=f"{type(e).__name__}: {first}"[:300])
        if error_log is not None:
            error_log.write(f"--- {case}\n{traceback.format_exc()}\n")
            error_log.flush()
    # Past the except block the traceback, and the frames holding the failed case's cache, are gone.
    if PROVIDERS[case.provider].compile:
        reset_compile_state(model)
    free_memory(settings.device)
    return row
