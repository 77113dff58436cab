"""patch / unpatch / patched: swap the attention forwards of supported models, table-driven, and undo it exactly."""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import types
from typing import NamedTuple

import torch
from transformers.generation.utils import GenerationMixin

from . import compat, prefix, rope
from .attention import plug_attention_forward
from .cache import PlugCache
from .families import FAMILIES, Family
from .geometry import Geometry, RankLayout


SUPPORTED: dict[str, Family] = FAMILIES  # model_type -> its row (hf_kvplug/families.py)

_MARK = "_kvplug_original_forward"


def _spec(model) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"hf_kvplug does not support model type {model_type!r}; supported: "
                         f"{', '.join(sorted(SUPPORTED))}. The model was left unchanged.")
    return SUPPORTED[model_type]


def _attention_modules(model, spec: Family):
    cls = getattr(importlib.import_module(spec.module), spec.attention)
    found = [m for m in model.modules() if isinstance(m, cls)]
    if not found:
        raise ValueError(f"no {spec.attention} modules found in {type(model).__name__} (a pipeline stage that runs "
                         "no attention layer?); the model was left unchanged")
    return found


def _check_rank_layout(model) -> None:
    """Under tensor parallelism, heads that do not split evenly: transformers loads such a model and fails only in
    its first forward; say so now (the cache's geometry derivation raises the explanation)."""
    layout = RankLayout.from_model(model)
    if layout.tp_size > 1:
        Geometry.from_hf_config(model.config, dtype=model.dtype, device="meta", layout=layout,
                                tp_plan=getattr(model, "tp_plan", None))


def _forward_attr(module) -> str:
    # accelerate's device_map hooks keep the real forward in `_old_forward` and wrap it: patch beneath the hook.
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def patch(model):
    """Swap the attention forward of every attention module of a supported family in `model` (`SUPPORTED`: Llama,
    Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Qwen3-Next, Qwen3.5 and Qwen3.5-MoE). Idempotent.

    The patched forward runs the fused PlugCache path only when the cache it is given (`cache=` from transformers
    5.24, `past_key_values=` before) is a `PlugCache`; with a stock cache, or none, the original forward runs
    unchanged. Also installs what does the host-side work of a PlugCache before each forward on eager code (forward
    pre-hooks on the model and its decoder, generate()'s mask preparation and its compiled call), and wraps
    `model.generate` to validate a PlugCache (capacity, batch, `use_cache`, model match) before anything is written.
    Returns `model`.
    """
    spec = _spec(model)
    _check_rank_layout(model)
    for module in _attention_modules(model, spec):
        if _MARK in module.__dict__:
            continue
        attr = _forward_attr(module)
        module.__dict__[_MARK] = getattr(module, attr)
        module.__dict__["_kvplug_attr"] = (attr, module.__dict__.get(attr))
        module._kvplug_family = spec
        module._kvplug_num_layers = module.config.num_hidden_layers
        module.__dict__["_kvplug_rope"] = rope.probe(module)  # (a hub function is a Module: not a child)
        setattr(module, attr, types.MethodType(plug_attention_forward, module))
    if "_kvplug_generate" in model.__dict__:
        return model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    hooks = [] if decoder is model else [
        model.register_forward_pre_hook(_forward_pre_hook(model, top=True), with_kwargs=True)]
    hooks.append(decoder.register_forward_pre_hook(_forward_pre_hook(decoder, top=False), with_kwargs=True))
    model.__dict__["_kvplug_hooks"] = hooks
    for name, wrap in (("create_masks_for_generate", _masks_for_generate),
                       ("get_compiled_call", _compiled_call_getter)):
        own = model.__dict__.get(name)
        model.__dict__[f"_kvplug_{name}"] = own
        # Bound to the model (a method, not a closure over this model's bound method): a deep copy of the model binds
        # it to the copy, whose own compiled call and masks it then runs.
        of_class = inspect.getattr_static(type(model), name, None) if own is None else None
        if isinstance(of_class, types.FunctionType):  # a method of the class: called with the model at hand
            original = of_class
        else:  # an instance's own, a static function (called as they are), or none (transformers' function)
            found = own if own is not None else getattr(model, name, None)
            original = None if found is None else functools.partial(_called_as_is, found)
        model.__dict__[name] = types.MethodType(wrap(original), model)
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
    """Restore the original attention forwards, hooks and `generate` of `model` exactly. Returns `model`."""
    for module in model.modules():
        if _MARK not in module.__dict__:
            continue
        attr, previous = module.__dict__.pop("_kvplug_attr")
        del module.__dict__[_MARK]
        del module.__dict__["_kvplug_family"]
        del module.__dict__["_kvplug_num_layers"]
        del module.__dict__["_kvplug_rope"]
        if previous is None:
            module.__dict__.pop(attr, None)
        else:
            module.__dict__[attr] = previous
    for hook in model.__dict__.pop("_kvplug_hooks", []):
        hook.remove()
    for name in ("generate", "create_masks_for_generate", "get_compiled_call"):
        if f"_kvplug_{name}" in model.__dict__:
            previous = model.__dict__.pop(f"_kvplug_{name}")
            if previous is None:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = previous
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


# ------------------------------------------------------------------ host work before each forward, on eager code

def _call_arguments(module) -> dict[str, int]:
    """The position of each positional parameter of the module's forward after self, by name, to read a call's
    inputs, mask and cache."""
    forward = inspect.unwrap(type(module).forward)
    params = [p.name for p in list(inspect.signature(forward).parameters.values())[1:]
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {name: i for i, name in enumerate(params)}


def _arg(positions: dict[str, int], args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    i = positions.get(name)
    return args[i] if i is not None and i < len(args) else None


def _inputs(positions: dict[str, int], args, kwargs):
    """(cache, batch, q_len, attention_mask) of a model / decoder forward call; all None unless it passes a
    PlugCache, batch and q_len None without input ids or embeddings."""
    cache = None
    for name in compat.CACHE_KWARGS:
        cache = _arg(positions, args, kwargs, name)
        if cache is not None:
            break
    if not isinstance(cache, PlugCache):
        return None, None, None, None
    inputs = _arg(positions, args, kwargs, "input_ids")
    if inputs is None:
        inputs = _arg(positions, args, kwargs, "inputs_embeds")
    if inputs is None:
        return cache, None, None, None
    return cache, inputs.shape[0], inputs.shape[1], _arg(positions, args, kwargs, "attention_mask")


def _forward_pre_hook(module, top: bool):
    """The model's (top=True) or its decoder's pre-hook: prepare the cache's forward on eager code unless generate()
    or the model's own hook already did. The decoder's hook claims it; inside a forward compiled as a whole it can
    only record what needs no host work (`PlugCache.traced_forward`)."""
    positions = _call_arguments(module)

    def hook(mod, args, kwargs):
        cache, batch, q_len, mask = _inputs(positions, args, kwargs)
        if batch is None:  # (no PlugCache, or no inputs)
            return None
        state = cache.state
        if torch.compiler.is_compiling():
            if not top:
                if state.prepared:
                    state.claim()
                else:
                    cache.traced_forward(batch, q_len, mask)
            return None
        if not state.is_prepared(batch, q_len):  # (one prepared for another shape never ran: it is found open)
            cache.begin_forward(batch, q_len, mask, from_generate=cache.in_generate, first_step=None)
        if top:
            return None
        state.claim()
        return _step_mask(positions, args, kwargs, cache, batch, q_len, mask)

    return hook


def _step_mask(positions: dict[str, int], args, kwargs, cache, batch: int, q_len: int, mask):
    """The decoder's call with a decode step's 4D mask built in one op, or None (the call as it is). After the
    prefill, a step of one token per row: the cache has just recorded the 2D mask (`begin_forward`) and its layers
    bound each row by what it recorded, so the 4D mask is the one its mask sizes give (`PlugLayer.get_mask_sizes`,
    q x q: the token sees itself), `[batch, 1, 1, 1]` True. Transformers' mask functions return a 4D mask as built,
    instead of working it out from the 2D one for every step (about 25 us of host work a step on the CPU). Not in a
    model with linear-attention layers, which read the 2D mask."""
    if q_len != 1 or cache.linear_layers or cache.attn_layers[0].fresh:
        return None
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return None  # a mask built already (4D, a BlockMask, one per layer type): as it is
    step = torch.ones((batch, 1, 1, 1), dtype=torch.bool, device=cache.attn_layers[0].device)
    i = positions.get("attention_mask")
    if "attention_mask" in kwargs or i is None or i >= len(args):
        return args, {**kwargs, "attention_mask": step}
    return (*args[:i], step, *args[i + 1:]), kwargs


def _called_as_is(function, model, *args, **kwargs):
    """`function(*args, **kwargs)`, the model it is called for aside (a wrapped function that is not a method)."""
    return function(*args, **kwargs)


def _masks_for_generate(original):
    """generate() builds the attention mask of every step here for a compileable cache (eagerly, before the
    step's forward, compiled or not): the one place that still sees its 2D mask. Begin the forward there.
    `original(model, ...)`: what the model had, or None (transformers' module-level function)."""
    if original is None:
        from transformers.masking_utils import create_masks_for_generate as function

        def original(model, *args, **kwargs):
            return function(*args, **kwargs)

    def create_masks_for_generate(model, *args, **kwargs):
        mask = original(model, *args, **kwargs)
        cache = compat.cache_from_kwargs(kwargs)
        embeds = kwargs.get("inputs_embeds")
        if isinstance(cache, PlugCache) and embeds is not None:
            cache.begin_forward(embeds.shape[0], embeds.shape[1], kwargs.get("attention_mask"), from_generate=True,
                                first_step=bool(kwargs.get("is_first_iteration", True)))
        return mask

    return create_masks_for_generate


def _compiled_call_getter(original):
    """generate() runs its compiled decode steps through `get_compiled_call`: begin the forward on eager code
    before entering the compiled call (the model's own hook runs inside it, where no host work can be done)."""

    def get_compiled_call(model, compile_config):
        compiled = original(model, compile_config)

        @functools.wraps(compiled)
        def call(*args, **kwargs):
            cache = compat.cache_from_kwargs(kwargs)
            inputs = kwargs.get("input_ids")
            if inputs is None:
                inputs = kwargs.get("inputs_embeds")
            if isinstance(cache, PlugCache) and inputs is not None:
                batch, q_len = inputs.shape[:2]
                if not cache.state.is_prepared(batch, q_len):
                    cache.begin_forward(batch, q_len, kwargs.get("attention_mask"), from_generate=True)
                cache.write_waiting_codes()  # on eager code, not traced into the graph
            return compiled(*args, **kwargs)

        return call

    return get_compiled_call


# ------------------------------------------------------------------ generate()

def _checked_generate(generate):
    @functools.wraps(generate)
    def checked(self, *args, **kwargs):
        cache = compat.cache_from_kwargs(kwargs)
        if not isinstance(cache, PlugCache):
            return generate(self, *args, **kwargs)
        read = _generation_call(self, args, kwargs)  # (merging the configs copies them: once a call)
        if not _uses_cache(read):
            # generate(use_cache=False): stock would re-feed the whole sequence every step into the cache it was
            # given; the PlugCache is left untouched and generate() runs without a cache, as asked.
            return generate(self, *args, **{k: v for k, v in kwargs.items() if k not in compat.CACHE_KWARGS})
        call = validate_generate(self, cache, args, kwargs, read)
        assisted = bool(kwargs.get("prompt_lookup_num_tokens")) or kwargs.get("assistant_model") is not None
        # The index keys a block by its tokens and mask bits: a call whose K/V other inputs also decide (position_ids,
        # inputs_embeds beside the ids, a vision model's pixels) neither reuses nor indexes.
        indexing = cache.config.prefix_caching and call.ids is not None and not _inputs_beyond_ids(read[2])
        # No prefix reused where the prompt must run whole: assisted decoding feeds its whole first candidate sequence
        # whatever the cache holds, so does a chunked prefill before transformers 5.21, and a call that returns the
        # prompt's attentions or hidden states gets them for every prompt token, as stock's (the index still takes
        # its blocks when the call ends).
        chunked = read[1].prefill_chunk_size is not None and not compat.CHUNKED_PREFILL_SKIPS_CACHED
        reuse = indexing and call.empty and not assisted and not chunked and not _returns_prompt_states(read[1])
        cache.generate_begins(call.reserve, call.share, prefix.fingerprint(self, cache.config) if indexing else None,
                              (call.ids, call.mask) if reuse else None, filled=call.filled)
        failed, out = True, None
        try:
            with compat.eager_only(cache, call.eager or (assisted and compat.ASSISTED_REFUSES_COMPILEABLE)):
                out = generate(self, *args, **kwargs)
            failed = False
        finally:
            cache.generate_ends(failed, _finished_rows(out, call) if indexing and not failed else None)
        cache.check_status()  # one device read per call: a write that found no slot is never silent
        return out

    return checked


_GENERATE_PARAMS = [p for p in inspect.signature(GenerationMixin.generate).parameters if p != "self"][:2]


def _generation_call(model, args, kwargs):
    """(inputs and generation_config as generate() reads them, by keyword or position; the merged config)."""
    call = dict(zip(_GENERATE_PARAMS, args))  # generate(inputs, generation_config, ...)
    call.update({k: v for k, v in kwargs.items() if k in _GENERATE_PARAMS})
    extra = {k: v for k, v in kwargs.items() if k not in _GENERATE_PARAMS}
    config, model_kwargs = model._prepare_generation_config(call.get("generation_config"), **extra)
    return call, config, model_kwargs


def _inputs_beyond_ids(model_kwargs) -> list[str]:
    """The tensors a generate() call passes its model besides input_ids and attention_mask (`_generation_call`'s
    model kwargs)."""
    return [k for k, v in model_kwargs.items()
            if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")]


def _attended_mask(ids: torch.Tensor, config) -> torch.Tensor | None:
    """The 2D mask generate() builds for `ids [B, P]` passed without one (transformers'
    `_prepare_attention_mask_for_generation`): the pad token's positions hidden where it occurs in the ids and is no
    EOS token, else None (every token seen). The prefix index keys a block by the mask its K/V were computed under."""
    pad, eos = config.pad_token_id, config.eos_token_id
    if pad is None:
        return None
    pad = int(torch.as_tensor(pad).flatten()[0])  # (an int, a list, a tensor or a numpy int, as generate() takes)
    eos = [] if eos is None else torch.as_tensor(eos).flatten().tolist()
    if pad in eos or not bool((ids == pad).any()):
        return None
    return ids.ne(pad).long()


def _returns_prompt_states(config) -> bool:
    """Whether generate() under the merged `config` returns the prefill's attentions or hidden states (one per prompt
    token)."""
    return bool(config.return_dict_in_generate and (config.output_attentions or config.output_hidden_states))


def _uses_cache(read) -> bool:
    """Whether a generate() call read by `_generation_call` runs with a cache."""
    _, config, model_kwargs = read
    return config.use_cache is not False and model_kwargs.get("use_cache") is not False


class GenerateCall(NamedTuple):
    """What a generate() call means for its cache: tokens per row to map ahead, rows expanded from each prompt (and
    how many of them share its blocks: 1 when the cache already holds tokens), the prompt's token ids (None for
    inputs_embeds) and 2D mask, whether it runs beam search, whether the cache was empty when it began, whether
    generate() compiles none of its steps where it runs (`compat.generate_runs_eager`), and the tokens the cache
    holds once the prompt is in (`filled`: forwards before that are the prompt's, chunked or not)."""

    reserve: int
    expand: int
    share: int
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    beams: bool = False
    empty: bool = True
    eager: bool = False
    filled: int = 0


def validate_generate(model, cache: PlugCache, args, kwargs, read=None) -> GenerateCall:
    """Raise a ValueError, before anything is written, if a generate() call cannot run in `cache`. Reads the
    call as generate() does (inputs and generation_config by keyword or position, kwargs over the config), or takes
    `read`, what `_generation_call` read of it."""
    call, config, _ = read if read is not None else _generation_call(model, args, kwargs)
    cache.check_model(model)
    inputs = call.get("inputs")
    for name in ("input_ids", "inputs_embeds"):
        inputs = inputs if inputs is not None else kwargs.get(name)
    if inputs is None:
        return GenerateCall(0, 1, 1)
    batch, prompt = inputs.shape[0], inputs.shape[1]
    # Tokens the cache will hold before generating: the full history when input_ids carry it, the mask's length when
    # only the new turn is passed with a whole-conversation mask, cached + new when neither says more.
    mask = kwargs.get("attention_mask")
    seen = max(prompt, mask.shape[-1] if mask is not None and mask.dim() == 2 else 0)
    past = cache.get_seq_length()  # the host's count: no device read
    if past and seen <= past:
        seen = past + prompt
    expand = max(config.num_beams or 1, config.num_return_sequences or 1)
    rows = batch * expand
    if rows > cache.max_batch_size:
        raise ValueError(f"generate() needs {rows} cache rows (batch {batch} x max(num_beams, num_return_sequences)) "
                         f"but the PlugCache has max_batch_size={cache.max_batch_size}; build it with "
                         f"max_batch_size >= {rows}")
    if mask is not None and mask.dim() != 2:
        raise ValueError("a PlugCache follows a 2D attention_mask ([batch, tokens], 1 = attend); generate() was "
                         f"given one of {mask.dim()} dimensions")
    # the slots the call writes: the history and prompt, then every new token but the last (never fed back)
    new = _new_tokens(model, config, call, kwargs, inputs)
    total = seen + new - 1
    if total > cache.max_cache_len:
        raise ValueError(f"prompt ({seen} tokens) + {new} new tokens need {total} cache slots (the last new token is "
                         f"not stored), more than the PlugCache's max_cache_len={cache.max_cache_len}; build it with "
                         f"max_cache_len >= {total}")
    ids = inputs if not inputs.is_floating_point() and kwargs.get("inputs_embeds") is None else None
    if ids is not None and mask is None and cache.config.prefix_caching:  # (the index's key; one device read)
        mask = _attended_mask(ids, config)
    return GenerateCall(total, expand, expand if past == 0 else 1, ids, mask, (config.num_beams or 1) > 1, past == 0,
                        compat.generate_runs_eager(model, config, cache), seen)


def _new_tokens(model, config, call: dict, kwargs: dict, inputs: torch.Tensor) -> int:
    """The tokens a generate() call makes at most, as its `_prepare_generated_length` works them out: max_new_tokens;
    else with no max_length set anywhere (the call, the config it was given, the model's), 20 more than the input
    ids (none for inputs_embeds alone), capped at max_position_embeddings; else max_length less the inputs. At
    least one (generate() refuses a max_length under the prompt before any forward)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    given = call.get("generation_config")
    ids_len = 0 if inputs.is_floating_point() else inputs.shape[1]
    if (kwargs.get("max_length") is None and (given is None or given.max_length is None)
            and model.generation_config.max_length is None):
        limit = (config.max_length or 20) + ids_len
        longest = getattr(model.config, "max_position_embeddings", None)
        return max((limit if longest is None else min(limit, longest)) - ids_len, 1)
    return max((config.max_length or 0) - inputs.shape[1], 1)


def _finished_rows(out, call: GenerateCall) -> list[tuple[int, list[int], list[int]]] | None:
    """(row, tokens, mask bits) of the cache rows a generate() call into an empty cache leaves, for its prefix
    index: every row's sequence; with beam search, where rows do not follow the returned sequences, each prompt's
    first row and the prompt alone. None when the call's tokens are not all known (inputs_embeds)."""
    if call.ids is None or not call.empty:
        return None
    batch, length = call.ids.shape
    bits = call.mask.tolist() if call.mask is not None else [[1] * length] * batch
    sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if call.beams or sequences is None:
        return [(b * call.expand, row, bits[b]) for b, row in enumerate(call.ids.tolist())]
    new = sequences.shape[1] - length
    return [(r, row, bits[r // call.expand] + [1] * new) for r, row in enumerate(sequences.tolist())]
