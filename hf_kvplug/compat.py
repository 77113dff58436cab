"""Every difference between the transformers releases hf_kvplug supports (>=5.4, <6), in one place.

Each entry names the release that changed it. The rest of the package asks this module and never compares versions
itself. Where a release can be recognised by the feature itself (a parameter name), the check reads the feature, so a
backport or a development build is judged by what it does, not by its number.
"""

from __future__ import annotations

import abc
import contextlib
import inspect

import torch
import transformers
from packaging.version import Version
from transformers import PreTrainedModel, cache_utils
from transformers.cache_utils import DynamicLayer
from transformers.models.llama import modeling_llama

TRANSFORMERS_VERSION = Version(transformers.__version__)

# 5.24: `past_key_values` is renamed `cache` in every attention, decoder layer and model forward, in generate() and in
# the masking utilities (the old keyword still works, with a FutureWarning, until 5.40 / 6.0). Before 5.24 only
# `past_key_values` exists.
CACHE_KWARG = "cache" if "cache" in inspect.signature(modeling_llama.LlamaAttention.forward).parameters \
    else "past_key_values"
CACHE_KWARGS = ("cache", "past_key_values")  # every name a cache may arrive under, the preferred one first

# 5.15: `Cache.crop(tokens_to_remove)` takes a negative count of tokens to drop (a positive count raises). Before,
# `crop(max_length)` kept the first `max_length` tokens (and a negative one dropped that many from the end).
LEGACY_CROP = "tokens_to_remove" not in inspect.signature(DynamicLayer.crop).parameters

# 5.5: assisted / prompt-lookup decoding refuses only an exact `StaticCache`. In 5.4 it refused every cache with a
# compileable layer, so the generate wrapper presents a PlugCache as eager-only for assisted calls there.
ASSISTED_REFUSES_COMPILEABLE = TRANSFORMERS_VERSION < Version("5.5.0")

# 5.21: generate()'s chunked prefill (`prefill_chunk_size`) feeds only what a non-empty cache does not hold. Before,
# it fed the whole prompt from its first token whatever the cache held, so a prefix reused from the index (which
# stock's empty cache never holds) would be fed again: the generate wrapper reuses none there.
CHUNKED_PREFILL_SKIPS_CACHED = TRANSFORMERS_VERSION >= Version("5.21.0")

# 5.13: the maximum cache length is asked with `get_max_length()`; 5.4-5.12 ask `get_max_cache_shape()` (kept,
# deprecated, afterwards). A PlugCache and its layers answer both names (`answer_max_length_under_both_names`).
MAX_LENGTH_METHODS = ("get_max_length", "get_max_cache_shape")


def answer_max_length_under_both_names(cls):
    """`cls.get_max_cache_shape` answers as `cls.get_max_length` does (the name 5.4-5.12 ask, abstract in their
    CacheLayerMixin: the class's abstract methods are counted again)."""
    cls.get_max_cache_shape = cls.get_max_length
    return abc.update_abstractmethods(cls)


def generate_runs_eager(model, config, cache) -> bool:
    """Whether generate() compiles none of a call's steps because of where it runs: the model and every attention
    layer of `cache` on the CPU, and no `compile_config._compile_all_devices` (no release auto-compiles on the CPU
    without it), or `disable_compile`. `config`: the call's generation config, merged as generate() merges it."""
    if model.device.type != "cpu" or any(layer.device.type != "cpu" for layer in cache.attn_layers):
        return False
    compile_config = getattr(config, "compile_config", None)
    return bool(getattr(config, "disable_compile", False)) or not getattr(compile_config, "_compile_all_devices", False)


@contextlib.contextmanager
def eager_only(cache, eager: bool):
    """For a generate() call that compiles nothing (`eager`), the cache presents its layers as eager-only
    (`is_compileable` False). generate() then builds no 4D mask for each step (it materializes one for every
    compileable cache, which the plugged attention does not read: the model's forward pre-hook does the cache's
    host work instead), and 5.4, which refuses assisted / prompt-lookup decoding with any compileable cache (later
    releases refuse only an exact StaticCache), runs it: assisted decoding never compiles. Elsewhere this does
    nothing."""
    if not eager:
        yield
        return
    for layer in cache.attn_layers:
        layer.is_compileable = False
    try:
        yield
    finally:
        for layer in cache.attn_layers:
            del layer.is_compileable  # back to the class attribute


def mark_static(*tensors: torch.Tensor) -> None:
    """Mark buffers as static inputs for torch.compile / CUDA graphs, outside tracing. torch 2.6-2.8 default to
    `guard=True`, newer releases to False: always False here, so the buffers are lifted as graph inputs instead of
    being baked in behind an ID_MATCH guard, and a second cache of the same geometry reuses the compiled graph
    (CUDA graphs re-record for the new addresses instead of recompiling)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t, guard=False)

# 5.24: attention forwards call `cache.update(key_states, value_states, layer_idx, kwargs=kwargs)` (before: no
# `kwargs=`). A patched forward never calls update on a PlugCache; PlugLayer.update takes any arguments and explains.
# Every method transformers calls on a PlugCache or its layers takes `*args, **kwargs` beyond what it uses, as
# transformers' own base classes do, so a keyword a later release adds is never a TypeError (5.25 added
# `activate_past_recording(recurrent_states_to_keep=)`, below).

# 5.4 only: generate() pre-builds a compileable cache's 4D mask (through `create_masks_for_generate`) only when a 2D
# attention mask is given; later releases also without one. Either way the patched model's forward pre-hooks and
# generate()'s compiled call see every forward, so nothing depends on it.


def cache_from_call(args: tuple, kwargs: dict, position: int):
    """The cache an attention / decoder / model forward was called with, under either name, by keyword or at
    `position` (index into `args`, which excludes `self`); None when there is none."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[position] if len(args) > position else None


def cache_from_kwargs(kwargs: dict):
    """The cache handed to generate() or a model forward by keyword, under either name (None if neither)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(outputs):
    """The cache a model forward returned (`outputs.cache` from 5.24, `outputs.past_key_values` before)."""
    for name in CACHE_KWARGS:
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def cache_kwargs(cache) -> dict:
    """`{name: cache}` under the name the installed release prefers, for generate() and model forwards."""
    return {CACHE_KWARG: cache}


# 5.5: hybrid models (Qwen3-Next, Qwen3.5) keep their linear-attention state in generic cache layers
# (`cache_utils.LinearAttentionLayer`) of any `Cache`. In 5.4 each model had its own cache class, which a PlugCache
# cannot stand in for.
HYBRID_CACHE_LAYERS = hasattr(cache_utils, "LinearAttentionLayer")


def linear_attention_layers(config, kinds: list[str]) -> dict:
    """transformers' own cache layers for a hybrid model's linear-attention layers, by layer index: the ones its
    `DynamicCache(config=...)` builds, so that their state stays in the classes transformers maintains."""
    if "linear" not in kinds:
        return {}
    if not HYBRID_CACHE_LAYERS:
        raise ValueError(f"hf_kvplug supports hybrid linear-attention models ({config.model_type}) from transformers "
                         f"5.5, where their state lives in generic cache layers; this is {transformers.__version__}")
    stock = cache_utils.DynamicCache(config=config)
    return {i: stock.layers[i] for i, kind in enumerate(kinds) if kind == "linear"}


# 5.25: hybrid models may decode with an assistant: linear-attention layers record their recurrent states while
# `record_past` (`activate_past_recording(recurrent_states_to_keep=N)`, which assisted decoding always calls with that
# keyword) and `crop` restores one. Before 5.25, generate() refuses assisted decoding for stateful models (a class
# attribute `_is_stateful` the hybrids set) and the layers' `activate_past_recording()` takes no argument.
ASSISTED_REFUSES_STATEFUL = hasattr(PreTrainedModel, "_is_stateful")
_ACTIVATE = getattr(getattr(cache_utils, "LinearAttentionLayer", None), "activate_past_recording", None)
RECORDS_RECURRENT_STATES = _ACTIVATE is not None and \
    "recurrent_states_to_keep" in inspect.signature(_ACTIVATE).parameters


def recording(layer) -> dict | None:
    """A linear-attention layer's past recording: None when off, else the keywords that switch it on as it is."""
    if not getattr(layer, "record_past", False):
        return None
    return {"recurrent_states_to_keep": layer.recurrent_states_to_keep} if RECORDS_RECURRENT_STATES else {}


def record_like(layer, other) -> None:
    """Switch `layer`'s past recording on as `other`'s is (a layer built anew for another batch size)."""
    kwargs = recording(other)
    if kwargs is not None:
        layer.activate_past_recording(**kwargs)


def stop_recording(layer) -> None:
    """Switch a linear-attention layer's past recording off, keeping its state: the conv states (grown while
    recording) back to the kernel's width in tensors of their own (static addresses again, as transformers' layers
    allocate them) and no recorded history, as `crop(0)` leaves a recording layer."""
    if not getattr(layer, "record_past", False):
        return
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            conv = layer.conv_states[i][..., -layer.conv_kernel_size[i]:].clone()
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(conv)
            layer.conv_states[i] = conv
    if hasattr(layer, "recurrent_states_history"):
        layer.recurrent_states_history = {i: [] for i in range(layer.number_of_states)}
    layer.record_past = False


# 5.23: under tensor parallelism a sharded weight is a DTensor whose shape is the global one; before, a plain tensor
# holding this rank's part.
def local_shape(weight) -> torch.Size:
    """The shape of the part of `weight` this rank holds."""
    return (weight.to_local() if hasattr(weight, "to_local") else weight).shape


# 5.23: `transformers.distributed.tensor_parallel.get_kv_heads_per_rank`, the rule generate() uses to size a static
# cache under tensor parallelism. 5.4 has no such helper (nor pipeline parallelism); the same rule is written out.
def kv_heads_per_rank(tp_plan: dict | None, nheads_k: int, tp_size: int) -> int:
    """KV heads one rank holds: split over `tp_size` when the plan splits k_proj by output features (transformers'
    default plans do; None stands for them), all of them otherwise."""
    plan = tp_plan if tp_plan is not None else {"model.layers.*.self_attn.k_proj": "colwise"}
    try:
        from transformers.distributed.tensor_parallel import get_kv_heads_per_rank
    except ImportError:
        split = any(key.rsplit(".", 1)[-1] in ("k_proj", "qkv_proj", "query_key_value") and style == "colwise"
                    for key, style in plan.items())
        local = (nheads_k // tp_size if nheads_k % tp_size == 0 else None) if split else nheads_k
    else:
        local = get_kv_heads_per_rank(plan, nheads_k, tp_size)
    if local is None:
        raise ValueError(f"{nheads_k} KV heads do not split over {tp_size} tensor-parallel ranks")
    return local


# RoPE's parameters: `rope_parameters` (5.x), `rope_scaling` where a config keeps the older name; either a dict with a
# `rope_type` (older: `type`), or one such dict per layer type.
def rope_types(config) -> set[str]:
    """The RoPE types a transformers config names (its text config's, for a multimodal one)."""
    config = getattr(config, "text_config", None) or config
    found = set()
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            for p in (params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]):
                kind = p.get("rope_type", p.get("type"))
                if kind:
                    found.add(kind)
    return found
