"""patch / unpatch / patched: swap the attention forwards of supported models, table-driven, and undo it exactly."""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from dataclasses import dataclass

from . import compat
from .attention import plug_attention_forward
from .cache import PlugCache


@dataclass(frozen=True)
class ModelSpec:
    """How to find a model family's attention class; `qk_norm` marks Qwen3's per-head q/k RMSNorm."""

    module: str
    attention: str
    qk_norm: bool = False
    accelerated: str = "fused K/V write + paged attention (fp16/bf16/fp32, INT8)"


SUPPORTED: dict[str, ModelSpec] = {
    "llama": ModelSpec("transformers.models.llama.modeling_llama", "LlamaAttention"),
    "qwen2": ModelSpec("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),
    "qwen3": ModelSpec("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention", qk_norm=True),
    "mistral": ModelSpec("transformers.models.mistral.modeling_mistral", "MistralAttention"),
}

_MARK = "_kvplug_original_forward"


def _spec(model) -> ModelSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"hf_kvplug does not support model type {model_type!r}; supported: "
                         f"{', '.join(sorted(SUPPORTED))}. The model was left unchanged.")
    return SUPPORTED[model_type]


def _attention_modules(model, spec: ModelSpec):
    cls = getattr(importlib.import_module(spec.module), spec.attention)
    found = [m for m in model.modules() if isinstance(m, cls)]
    if not found:
        raise ValueError(f"no {spec.attention} modules found in {type(model).__name__}; the model was left unchanged")
    return found


def _forward_attr(module) -> str:
    # accelerate's device_map hooks keep the real forward in `_old_forward` and wrap it: patch beneath the hook.
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def patch(model):
    """Swap the attention forward of every Llama/Qwen2/Qwen3/Mistral attention module in `model`. Idempotent.

    The patched forward runs the fused PlugCache path only when `past_key_values` is a `PlugCache`; with a stock
    cache, or none, the original forward runs unchanged. Also wraps `model.generate` to validate a PlugCache
    (capacity, batch, `use_cache`, model match) before anything is written. Returns `model`.
    """
    spec = _spec(model)
    for module in _attention_modules(model, spec):
        if _MARK in module.__dict__:
            continue
        attr = _forward_attr(module)
        module.__dict__[_MARK] = getattr(module, attr)
        module.__dict__["_kvplug_attr"] = (attr, module.__dict__.get(attr))
        module._kvplug_qk_norm = spec.qk_norm
        setattr(module, attr, types.MethodType(plug_attention_forward, module))
    if "_kvplug_generate" not in model.__dict__:
        model.__dict__["_kvplug_generate"] = model.__dict__.get("generate")
        current = model.generate  # wrap what is there, an instance-level override included
        if isinstance(current, types.MethodType) and current.__self__ is model:
            base = current.__func__
        else:
            def base(self, *args, **kwargs):
                return current(*args, **kwargs)
        model.generate = types.MethodType(_checked_generate(base), model)
    return model


def unpatch(model):
    """Restore the original attention forwards and `generate` of `model` exactly. Returns `model`."""
    for module in model.modules():
        if _MARK not in module.__dict__:
            continue
        attr, previous = module.__dict__.pop("_kvplug_attr")
        del module.__dict__[_MARK]
        del module.__dict__["_kvplug_qk_norm"]
        if previous is None:
            module.__dict__.pop(attr, None)
        else:
            module.__dict__[attr] = previous
    if "_kvplug_generate" in model.__dict__:
        previous = model.__dict__.pop("_kvplug_generate")
        if previous is None:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = previous
    return model


def is_patched(model) -> bool:
    return any(_MARK in m.__dict__ for m in model.modules())


@contextlib.contextmanager
def patched(model):
    """`with hf_kvplug.patched(model): ...` patches for the block and restores the original forwards after."""
    was = is_patched(model)
    patch(model)
    try:
        yield model
    finally:
        if not was:
            unpatch(model)


def _checked_generate(generate):
    @functools.wraps(generate)
    def checked(self, *args, **kwargs):
        cache = compat.cache_from_kwargs(kwargs)
        if not isinstance(cache, PlugCache):
            return generate(self, *args, **kwargs)
        validate_generate(self, cache, args, kwargs)
        if kwargs.get("prompt_lookup_num_tokens") or kwargs.get("assistant_model") is not None:
            # transformers < 5.17 refuses assisted decoding with any compileable cache; assisted decoding never
            # compiles, so the cache presents itself as eager-only for this call.
            with _eager_only(cache):
                return generate(self, *args, **kwargs)
        return generate(self, *args, **kwargs)

    return checked


@contextlib.contextmanager
def _eager_only(cache: PlugCache):
    for layer in cache.layers:
        layer.is_compileable = False
    try:
        yield
    finally:
        for layer in cache.layers:
            del layer.is_compileable  # back to the class attribute


def validate_generate(model, cache: PlugCache, args, kwargs) -> None:
    """Raise a ValueError, before anything is written, if a generate() call cannot run in `cache`."""
    config = kwargs.get("generation_config") or model.generation_config

    def opt(name):
        value = kwargs.get(name)
        return getattr(config, name, None) if value is None else value

    if opt("use_cache") is False:
        raise ValueError("generate(use_cache=False) cannot use a PlugCache: drop past_key_values or use_cache=False")
    cache.check_model(model)
    inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        return
    batch, prompt = inputs.shape[0], inputs.shape[1]
    # Tokens the cache will hold before generating: the full history when input_ids carry it, the mask's length when
    # only the new turn is passed with a whole-conversation mask, cached + new when neither says more.
    mask = kwargs.get("attention_mask")
    seen = max(prompt, mask.shape[-1] if mask is not None and mask.dim() == 2 else 0)
    past = int(cache.get_seq_length())  # one read per generate() call, not per step
    if past and seen <= past:
        seen = past + prompt
    rows = batch * max(opt("num_beams") or 1, opt("num_return_sequences") or 1)
    if rows > cache.max_batch_size:
        raise ValueError(f"generate() needs {rows} cache rows (batch {batch} x max(num_beams, num_return_sequences)) "
                         f"but the PlugCache has max_batch_size={cache.max_batch_size}; build it with "
                         f"max_batch_size >= {rows}")
    if mask is not None and mask.dim() == 2 and mask.shape[-1] > 1:
        ones = mask.bool()
        holes = (ones[:, :-1] & ~ones[:, 1:]).any(dim=-1)  # a 0 after a 1: right padding or a gap
        if bool(holes.any()):  # one host read per generate() call
            row = int(holes.nonzero()[0, 0])
            raise ValueError(f"attention_mask row {row} has a 0 after a 1 (right padding or a gap); a PlugCache "
                             "follows left padding only, which is also what decoder-only generation expects: "
                             "pad on the left (tokenizer.padding_side = 'left'), and for a multi-turn mask mark "
                             "every earlier token 1, generated and EOS tokens included (a mask built as "
                             "ids != pad_token_id breaks when the pad token is EOS)")
    max_new = opt("max_new_tokens")
    total = seen + max_new if max_new is not None else max(opt("max_length") or 0, seen)
    if total > cache.max_cache_len:
        raise ValueError(f"prompt ({seen} tokens) + new tokens = {total} exceeds the PlugCache's max_cache_len="
                         f"{cache.max_cache_len}; build it with max_cache_len >= {total}")
