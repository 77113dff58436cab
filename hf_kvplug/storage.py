"""PlugCache files: a prefilled cache written with safetensors and read back, in this process or another.

Layout: `layer.{i}.k` / `layer.{i}.v` `[n, nheads_k, block_size, head_dim]` (storage dtype; INT8 and INT4 add
`layer.{i}.k_scale` / `.v_scale`, an exact tail `layer.{i}.k_tail` / `.v_tail` `[batch, nheads_k, block_size,
head_dim]`) hold the n blocks the rows use, each once; `table` `[batch, blocks]` int32 names
them per row (-1: none), and `table.ring{r}` does the same for the sliding-window layers kept in rings of r blocks
(numbered apart: each group of layers has its own blocks); `seqlens` `[num_layers, batch]`, `starts` `[batch]` and,
when the recorded mask has holes, `valid` `[batch, length]`. The metadata says what the cache was built for (and
a digest of the model's weights, `prefix.weights_digest`, where the cache knows its model) and carries a SHA-256 of
every tensor's bytes and of the metadata itself, so a truncated or altered file is refused instead of read.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

FORMAT = "hf_kvplug.PlugCache/1"  # (files whose checksum covers their metadata too say so: "sha256_covers")
_FINGERPRINT = ("model_type", "num_layers", "nheads", "nheads_k", "head_dim", "kv_dtype", "block_size",
                "layer_windows")


def _fingerprint(config) -> dict:
    out = {name: getattr(config, name) for name in _FINGERPRINT}
    out["dtype"] = str(config.dtype).replace("torch.", "")
    if any(config.layer_rings):  # (absent from files without rings, which stay readable)
        out["layer_rings"] = config.layer_rings
    if config.key_rotation:  # (absent from files of unrotated keys: fp caches' files stay readable)
        out["key_rotation"] = config.key_rotation
    if config.exact_tail:  # (absent from files without one: int4 files from before it load as caches without)
        out["exact_tail"] = True
    return out


def _table_name(ring) -> str:
    return "table" if ring is None else f"table.ring{ring}"


def _digest(tensors: dict, meta: dict | None = None) -> str:
    """SHA-256 of the tensors (names, shapes, dtypes, bytes) and, where given, of the metadata but its checksum."""
    h = hashlib.sha256()
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_cache(cache, path, weights: str | None = None) -> None:
    """Write `cache` to `path`; `weights`: the digest of its model's weights (`prefix.weights_digest`), or None."""
    from safetensors.torch import save_file

    cfg = cache.config
    if cache.linear_layers:
        raise ValueError("saving a hybrid model's cache is not supported: its linear-attention states live in "
                         "transformers' own cache layers; keep the cache in memory (fork() or copy.deepcopy)")
    length, batch = cache.state.length, cache.batch
    tensors, used = {}, {}
    for ring, rows in cache.tables.items():
        nblocks = min(math.ceil(length / cfg.block_size), rows.width)
        used[ring], compact, table = [], {}, []
        for row in rows.rows[:batch]:
            ids = []
            for i in row[:nblocks]:
                if i not in compact:
                    compact[i] = len(used[ring])
                    used[ring].append(i)
                ids.append(compact[i])
            table.append(ids + [-1] * (nblocks - len(ids)))
        tensors[_table_name(ring)] = torch.tensor(table, dtype=torch.int32).reshape(batch, nblocks)
    for layer in cache.attn_layers:
        for name, blocks in layer.kv.blocks(used[layer.ring]).items():
            tensors[f"layer.{layer.layer_idx}.{name}"] = blocks
        for name, tail in zip(("k_tail", "v_tail"), layer.tail or ()):
            tensors[f"layer.{layer.layer_idx}.{name}"] = tail[:batch].cpu().clone()
    tensors["seqlens"] = torch.stack([layer.cache_seqlens[:batch].cpu() for layer in cache.attn_layers])
    dev = next(iter(cache.device_states.values()))
    tensors["starts"] = dev.starts[:batch].cpu().clone()
    if cache.holes:
        tensors["valid"] = dev.valid[:batch, :length].cpu().clone()
    meta = dict(format=FORMAT, config=_fingerprint(cfg), length=length, batch=batch, holes=cache.holes,
                max_batch_size=cfg.max_batch_size, max_cache_len=cfg.max_cache_len, max_tokens=cfg.max_tokens,
                top=cache.state.top, window_slack=cfg.window_slack,
                fresh=cache.attn_layers[0].fresh, weights=weights, sha256_covers="tensors and metadata")
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(path), metadata={"hf_kvplug": json.dumps(meta)})


def _read(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a short or garbled file
        raise ValueError(f"{path} is not a readable PlugCache file (truncated or corrupted?): {e}") from None
    if "hf_kvplug" not in header:
        raise ValueError(f"{path} is a safetensors file but not a PlugCache file (no hf_kvplug metadata)")
    try:
        meta = json.loads(header["hf_kvplug"])
    except ValueError:
        raise ValueError(f"{path} was altered after it was written (its metadata is not JSON)") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} holds a {meta.get('format')!r} cache; this hf_kvplug reads {FORMAT!r}")
    # (files written before the checksum covered the metadata: their tensors', and the checks below)
    if _digest(tensors, meta if "sha256_covers" in meta else None) != meta.get("sha256"):
        raise ValueError(f"{path} was altered after it was written (its contents do not match their checksum)")
    seqlens, length, batch = tensors.get("seqlens"), meta.get("length"), meta.get("batch")
    if (seqlens is None or not isinstance(length, int) or not isinstance(batch, int) or batch < 0
            or tuple(seqlens.shape[1:]) != (batch,) or bool((seqlens != length).any())
            or any(t.shape[0] != batch for name, t in tensors.items() if name.startswith("table"))):
        raise ValueError(f"{path} was altered after it was written (its metadata disagrees with its tensors)")
    return meta, tensors


def load_cache(cls, path, model_or_config, weights: str | None = None, **kwargs):
    """A `cls` cache holding what `save_cache` wrote to `path`; `weights`: the digest of the model it is loaded for,
    refused where the file names other weights (None: not checked)."""
    meta, tensors = _read(path)
    length, batch = meta["length"], meta["batch"]
    # the capacity the cache was saved with, unless told otherwise (files from before it was recorded: the rows and
    # tokens held, or a ring cache's own max_cache_len, as a ring exists only where it is smaller than that)
    kwargs.setdefault("max_batch_size", meta.get("max_batch_size", batch))
    if "max_batch_size" in meta or "layer_rings" in meta["config"]:
        kwargs.setdefault("max_cache_len", meta["max_cache_len"])
    kwargs.setdefault("max_cache_len", max(length, 1))
    if meta.get("max_tokens") is not None:
        kwargs.setdefault("max_tokens", meta["max_tokens"])
    kwargs.setdefault("trim_windows", "layer_rings" in meta["config"])  # the file's layout unless told otherwise
    # keys as the file stores them: files from before quantized keys were rotated load as caches that do not rotate
    kwargs.setdefault("rotate_keys", "key_rotation" in meta["config"])
    kwargs.setdefault("exact_tail", "exact_tail" in meta["config"])  # int4 files from before it: no tail
    # files from before window_slack existed kept rings of 2 x window - 1 slots: a slack of the (widest) window
    old = max((w for w in meta["config"].get("layer_windows") or [] if w), default=None)
    kwargs.setdefault("window_slack", meta["window_slack"] if "window_slack" in meta else old)
    if kwargs.get("kv_dtype", meta["config"]["kv_dtype"]) != meta["config"]["kv_dtype"]:
        raise ValueError(f"{path} holds a kv_dtype={meta['config']['kv_dtype']!r} cache, not {kwargs['kv_dtype']!r}")
    kwargs["kv_dtype"] = meta["config"]["kv_dtype"]
    kwargs.setdefault("block_size", meta["config"]["block_size"])
    cache = cls(model_or_config, **kwargs)
    mine = _fingerprint(cache.config)
    diffs = [f"{k}: file {meta['config'].get(k)!r} vs here {mine.get(k)!r}"
             for k in {**meta["config"], **mine} if meta["config"].get(k) != mine.get(k)]
    if diffs:
        rings = " (sliding-window rings: pass trim_windows=, window_slack= and max_cache_len= as the saved cache " \
            "had them)" \
            if any(d.startswith("layer_rings") for d in diffs) else ""
        rotation = " (rotate_keys= must match how the file stores keys)" \
            if any(d.startswith("key_rotation") for d in diffs) else ""
        tail = " (exact_tail= must match whether the file holds exact tails)" \
            if any(d.startswith("exact_tail") for d in diffs) else ""
        raise ValueError(f"{path} was saved for another model or cache (" + "; ".join(diffs) + ")" + rings + rotation
                         + tail)
    if weights is not None and meta.get("weights") not in (None, weights):
        raise ValueError(f"{path} was saved for a model with other weights (the same architecture, other values): "
                         "its K/V would not be this model's")
    if batch > cache.max_batch_size or length > cache.max_cache_len:
        raise ValueError(f"{path} holds {batch} rows of {length} tokens; build the cache with max_batch_size >= "
                         f"{batch} and max_cache_len >= {length}")
    placed = {}
    for ring, rows in cache.tables.items():
        table = tensors[_table_name(ring)].tolist()
        nused = 1 + max((i for row in table for i in row), default=-1)
        ids = rows.pool.allocate(nused)
        for b, row in enumerate(table):
            row = [ids[i] for i in row if i >= 0]
            rows.pool.incref(row)
            rows.rows[b] = row
        rows.pool.decref(ids)  # the allocation's own reference: each block is now held by the rows naming it
        rows.dirty = True
        placed[ring] = ids
    for n, layer in enumerate(cache.attn_layers):
        prefix = f"layer.{layer.layer_idx}."
        layer.kv.put_blocks(placed[layer.ring],
                            {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)})
        for name, tail in zip(("k_tail", "v_tail"), layer.tail or ()):
            tail[:batch].copy_(tensors[prefix + name])
        layer.cache_seqlens[:batch].copy_(tensors["seqlens"][n])
        layer.fresh = meta["fresh"]
    for dev in cache.device_states.values():
        dev.load_starts(batch, tensors["starts"])
        if meta["holes"]:
            dev.valid[:batch, :length].copy_(tensors["valid"])
    # top: how far the rings were written (a crop may not reach below it - ring)
    cache.state.restore(batch, length, meta["holes"], meta.get("top", length))
    cache._sync_tables()
    return cache
