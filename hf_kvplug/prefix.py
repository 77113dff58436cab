"""Prefix caching across generate() calls: what decides the K/V a block holds, as keys of `blocks.PrefixIndex`.

A block's K/V are a function of the model (weights, config, adapters), the cache's format (dtype, kv_dtype, key
rotation, block size), the tokens in every slot up to the block's end and which of them the attention mask shows
(positions come from the mask's running count, visibility from its bits). The index chains blocks to their parents,
so a block's key holds its own slots' tokens and mask bits; the root holds the rest (`fingerprint`).
"""

from __future__ import annotations

import hashlib
import itertools

import torch

_IDENTITIES = itertools.count(1)
PROBES = 8  # elements of each weight read by `fingerprint`


def fingerprint(model, config) -> tuple:
    """What besides tokens and mask decides a block's K/V for `model` in a cache of `config`: the model object (a
    number it keeps for its life, never reused), its weights (`weights`), its active adapters, its config, and the
    cache's dtype, kv_dtype, key rotation and block size."""
    identity = model.__dict__.setdefault("_kvplug_identity", next(_IDENTITIES))
    versions = weights(model)
    try:
        adapters = tuple(model.active_adapters()) if getattr(model, "_hf_peft_config_loaded", False) else ()
    except (ValueError, AttributeError):
        adapters = ()
    return (identity, versions, adapters, model.config.to_json_string(), str(config.dtype), config.kv_dtype,
            config.key_rotation, config.block_size)


def weights(model) -> tuple:
    """Each weight's storage address and in-place version (a replaced Parameter, a `load_state_dict`, an optimizer
    step change them) and the bits of `PROBES` elements spread over it, which also see writes through `.data` (they
    leave the version as it was); one host read for them all. A write through `.data` that changes none of the
    probed elements goes unseen: call the cache's `clear_prefix_index()` then. A sharded weight (a DTensor, tensor
    parallelism) is probed in its local shard."""
    params = [p for p in model.parameters() if p.device.type != "meta"]
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    probes: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():
        for x in local:
            probes.setdefault(x.device, []).append(_probe(x.detach().reshape(-1)[::max(1, x.numel() // PROBES)]
                                                          [:PROBES]))
        bits = tuple(tuple(torch.cat(group).tolist()) for group in probes.values())
    return tuple((x.data_ptr(), p._version) for p, x in zip(params, local)), bits


def weights_digest(model) -> str:
    """A SHA-256 of each weight's name, shape, dtype and the bytes of `PROBES` elements spread over it (a sharded
    weight's local shard): what a cache file records of the model whose K/V it holds, the same in every process (no
    addresses). Like `weights`, it misses an edit that changes none of the probed elements."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                continue
            x = (p.to_local() if hasattr(p, "to_local") else p).detach()
            h.update(f"{name} {tuple(x.shape)} {x.dtype}".encode())
            h.update(_probe(x.reshape(-1)[::max(1, x.numel() // PROBES)][:PROBES]).cpu().numpy().tobytes())
    return h.hexdigest()


def _probe(x: torch.Tensor) -> torch.Tensor:
    """The bytes of `x` (1-D), as uint8: every bit of every dtype seen alike (a float32 view would round fp64 and
    int64); a dtype that cannot be viewed so (quantized tensors) as its float32 value's bytes."""
    try:
        return x.contiguous().view(torch.uint8)
    except (RuntimeError, TypeError):
        return x.to(torch.float32).contiguous().view(torch.uint8)


def row_blocks(tokens: list[int], mask: list[int], block_size: int, count: int) -> list[tuple]:
    """The first `count` full blocks of a row as index contents: per block, its tokens and mask bits."""
    return [(tuple(tokens[i * block_size:(i + 1) * block_size]), tuple(mask[i * block_size:(i + 1) * block_size]))
            for i in range(count)]
