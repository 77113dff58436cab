"""The host work around each forward of a PlugCache, on eager code: checks, mapping blocks and copying shared ones
(`blocks.Paging`), recording the attention mask (`device`), and the forward's transitions (`state.ForwardState`).

The patcher's hooks call `begin_forward` before a forward (from generate()'s mask preparation, its compiled call, or
the model's forward pre-hooks) and `traced_forward` inside a forward compiled as a whole; the attention forward calls
`enter` at each layer. Nothing here runs inside a compiled decode step but `enter`'s checks.
"""

from __future__ import annotations

import gc

import torch

from . import prefix, torchpath
from .blocks import PoolExhausted
from .device import read_mask, read_mask_traced
from .layers import PlugLayer

KEEP_MASK = object()  # begin_forward: leave the recorded mask as it is (a layer called without the model around it)


class inference_mode_explained:
    """`with inference_mode_explained(what):` says why, when a cache built inside torch.inference_mode() cannot be
    written here. (A class, not a generator: it wraps every forward's host work, and costs two plain calls.)"""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if kind is RuntimeError and "Inplace update to inference tensor outside InferenceMode" in str(e):
            raise RuntimeError(f"{self.what}: this PlugCache was built inside torch.inference_mode() and is used "
                               "outside it (inference tensors cannot be written there). Build the cache outside "
                               "inference_mode (it works inside torch.no_grad() and inference_mode alike), or keep "
                               "every use inside it.") from e
        return False


class all_or_broken:
    """`with all_or_broken(cache, what):` around changes to a cache's rows that must all happen once begun (its
    checks passed): an exception inside (out of memory, KeyboardInterrupt) marks the rows broken
    (`ForwardState.broke`), so that every later use raises until reset() instead of reading half-changed rows (a
    forward compiled as a whole too: it needs reserve() again, which refuses)."""

    def __init__(self, cache: "ForwardHost", what: str):
        self.cache, self.what = cache, what

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if kind is not None:
            self.cache.state.broke(f"{self.what} stopped part-way ({kind.__name__})")
            self.cache._compiled_rows = 0
        return False


class ForwardHost:
    """PlugCache's host side of a forward (a mixin: the state it works on is the cache's, `cache.py`)."""

    def begin_forward(self, batch: int, q_len: int, attention_mask=None, *, from_generate: bool = False,
                      first_step: bool | None = True) -> None:
        """Host work before a forward of `batch` rows x `q_len` new tokens, on eager code: checks (the previous
        forward completed, sizes), records `attention_mask` (2D, None, or `KEEP_MASK`), maps blocks and makes
        shared blocks private where this forward writes. `from_generate` / `first_step`: a forward of a generate()
        call, its first or a later one (None: the first this call prepares). Raises before anything is written."""
        with inference_mode_explained("PlugCache.begin_forward"):
            self.state.check_whole()
            self._writable_here()
            if self.state.open:
                self.sync_lengths()  # the last forward stopped part-way or never ran: go on only if the layers agree
            length = self.state.length_now()
            if batch > self.max_batch_size:
                raise ValueError(f"batch of {batch} rows (after beams / return sequences) exceeds the PlugCache's "
                                 f"max_batch_size={self.max_batch_size}; build it with max_batch_size >= {batch}")
            if length and batch != self.batch:
                raise ValueError(f"the PlugCache holds {self.batch} rows of {length} tokens and this forward has "
                                 f"{batch} rows; call cache.reset() to start a new batch")
            if length + q_len > self.max_cache_len:
                raise ValueError(f"{length + q_len} tokens would exceed the PlugCache's max_cache_len="
                                 f"{self.max_cache_len}; build it larger or call cache.reset()")
            fresh = self.attn_layers[0].fresh
            hints = self._generate or {}
            if first_step is None:
                first_step = not hints.get("begun", False)
            # a forward of the prompt (a chunk of it, or a prefill that goes on from a cache) reads its mask whatever
            # generate() says: only later forwards add generated tokens, whose columns are 1
            first_step = first_step or length < hints.get("filled", 0)
            reserve = max(length + q_len, hints.get("reserve", 0))
            share = hints.get("share", 1)
            share = share if fresh and share > 1 and batch % share == 0 and q_len > 0 else 1
            # all or nothing: every group's pool has room before anything changes (one group's `prepare` checks that
            # by itself; a fresh cache sharing a prompt maps only its rows)
            if share == 1 and len(self.paging.tables) > 1:
                self.paging.check_room(batch, length, length + q_len, reserve)
            mask = None
            if attention_mask is not KEEP_MASK:  # read (raising on a bad mask) before anything changes
                mask = read_mask(attention_mask, batch, length + q_len, q_len, from_generate, first_step, fresh)
            try:
                leaders = self.paging.prepare(batch, length, length + q_len, reserve, share, self._copy_blocks)
            except PoolExhausted:
                if share > 1:  # the followers found no room after the leaders took theirs: the rows held nothing
                    self.paging.release()  # (a fresh cache), and hold nothing again
                raise
            finally:
                self._sync_tables()  # the device tables always match the host's
            if fresh:
                self.linear.begin(batch)
            if mask is not None:
                for dev in self.device_states.values():
                    dev.record(batch, mask)
                self.state.mask_recorded(mask.holes)
            self._plan(batch, length, q_len, leaders)
            self.state.prepare(batch, q_len, leaders)
            if self._generate is not None:
                self._generate["begun"] = True

    def _plan(self, batch: int, length: int, q_len: int, leaders: list[int] | None) -> None:
        """The PyTorch fast path's plans for this forward (layers off CUDA): one per device and (ring, window), built
        once here from what the host knows and shared by every layer with that key. A prefill's only say where its
        new tokens go (`DeviceState.writes`): the rows written (`leaders`, or all) hold `length` tokens, and every
        slot of the new ones is mapped (`Paging.prepare` has just made sure)."""
        for dev in self.device_states.values():
            dev.plans, dev.step_views, dev.rope, dev.writes = {}, {}, None, {}
        if not q_len or not self.plan_layers:
            return
        if self.attn_layers[0].fresh:
            rows = leaders if leaders is not None else list(range(batch))
            for layer in self.plan_layers:  # (a ring keeps the last of a long prompt: its own write)
                if layer.ring is None and all(torchpath.paged_layout(buf) for buf in layer.kv if buf.numel()):
                    layer.dev.writes[layer.plan_key] = torchpath.WritePlan(
                        len(rows), q_len, torchpath.write_rows(layer.block_table, rows, length, q_len,
                                                               self.config.block_size, self.config.nheads_k,
                                                               torchpath.slot_strides(layer.kv.k)))
            return
        for layer in self.plan_layers:
            key = layer.plan_key
            if q_len > (layer.chunk if layer.ring else q_len):
                continue
            first = max(0, length - layer.window + 1) if layer.window else 0
            layer.dev.plans[key] = torchpath.plan(
                layer.block_table, layer.cache_seqlens, layer.dev.starts, layer.dev.valid if self.state.holes else None,
                batch, q_len, q_len, key[1], True, self.config.block_size, self.config.nheads_k,
                (first, length + q_len), length=length,
                rows=self.paging.tables[None].rows if layer.ring is None else None,  # a ring's repeat on the device
                strides=torchpath.slot_strides(layer.kv.k), lead_free=layer.dev.lead_free)
        for slab in self.slabs:  # a decode step in the model dtype or codes: the views of every layer of a slab at once
            dev = self.device_states[slab.device]
            plan = dev.plans.get(slab.plan_key)
            if plan is None or not plan.step:
                continue
            if slab.buf.dtype == self.config.dtype:
                new, spans = torchpath.step_views(slab.buf, plan)
                n = len(slab.layers)
                for j, i in enumerate(slab.layers):
                    dev.step_views[i] = torchpath.StepViews(new[j], new[n + j], spans[j], spans[n + j])
            elif slab.scales is not None and isinstance(plan.ends, int):  # INT8 or INT4 codes
                dev.step_views.update(zip(slab.layers, torchpath.code_step_views(slab.buf, slab.scales, slab.tails,
                                                                                  plan)))

    def reuse_prefix(self, ids: torch.Tensor, mask: torch.Tensor | None, expand: int) -> int:
        """Before a generate() call into an empty cache (prefix caching): map the longest prefix of full blocks every
        prompt of `ids [B, P]` (with `mask`) finds in the index, to each of its `expand` rows, shared; the cache then
        holds that many tokens, and generate() feeds only the rest (at least one token). Returns the tokens reused
        per row."""
        index, table, bs = self.pools[None].index, self.paging.tables[None], self.config.block_size
        batch, length = ids.shape
        rows = batch * expand
        if self.state.length or length < 2 or any(table.rows[:rows]):
            return 0
        tokens, bits = ids.tolist(), (mask.tolist() if mask is not None else [[1] * length] * batch)
        found = [index.match(prefix.row_blocks(tokens[b], bits[b], bs, (length - 1) // bs)) for b in range(batch)]
        reused = min(len(f) for f in found)
        if not reused:
            return 0
        with all_or_broken(self, "prefix reuse"):
            for r in range(rows):
                blocks = list(found[r // expand][:reused])
                table.pool.incref(blocks)  # (before the row names them: a release never frees a block twice)
                table.rows[r] = blocks
            table.dirty = True
            self._sync_tables()
            for layer in self.attn_layers:
                layer.cache_seqlens[:rows].fill_(reused * bs)
                layer.fresh = False
            self.state.restore(rows, reused * bs, False, reused * bs)  # the first forward records the mask over all
        index.hit_tokens += batch * reused * bs
        return reused * bs

    def index_rows(self, finished: list[tuple[int, list[int], list[int]]]) -> None:
        """After a generate() call (prefix caching): index the full blocks of rows `(row, tokens, mask bits)` the
        cache holds, their tokens and mask over (at least) the tokens the cache holds."""
        index, table, bs = self.pools[None].index, self.paging.tables[None], self.config.block_size
        length = self.seq_length_now()
        self._compiled_rows = 0  # the index holds these blocks too: a crop back into them must copy them first
        for row, tokens, bits in finished:
            count = min(len(tokens), length) // bs
            if len(tokens) >= count * bs and len(bits) >= count * bs and len(table.rows[row]) >= count:
                index.insert(prefix.row_blocks(tokens, bits, bs, count), table.rows[row][:count])

    def enter(self, layer_idx: int, k: torch.Tensor) -> PlugLayer:
        """An attention forward reaches layer `layer_idx` with new keys `k [B, L, nheads_k, D]`: its checks, and the
        host work of the forward when nothing did it (a layer called directly, without the model around it)."""
        layer = self.layer(layer_idx)
        layer.check_states(k)
        if not torch.compiler.is_compiling() and not self.state.open:
            self.begin_forward(k.shape[0], k.shape[1], KEEP_MASK)
            self.state.claim()
        return layer

    def traced_forward(self, batch: int, q_len: int, attention_mask) -> None:
        """What a forward compiled as a whole, with no eager code before it (`torch.compile(model)` in a loop of
        your own), can do: device-side mask recording. Blocks must already be mapped (`reserve()`)."""
        self.state.check_whole()
        if self._compiled_rows < batch:
            raise ValueError("a forward compiled as a whole cannot map cache blocks; call cache.reserve() before "
                             "the loop, and again after a fork, a crop below the length at reserve() or a generate() "
                             "call that indexed blocks for prefix caching (or compile model.forward and call the "
                             "model, whose pre-hook maps blocks eagerly)")
        mask = read_mask_traced(attention_mask, self.max_cache_len)
        if mask is not None:
            for dev in self.device_states.values():
                dev.record(batch, mask)
            self.state.mask_recorded(mask.holes)
        self.state.traced(batch)

    def sync_lengths(self) -> None:
        """Read every layer's row lengths (one device read) and take them as the host's count. Raises if the layers
        disagree (a forward stopped part-way: the cache must be reset) or if a write found no slot."""
        per_layer = torch.stack([layer.cache_seqlens[:max(self.batch, 1)].to("cpu", non_blocking=False)
                                 for layer in self.attn_layers])
        if any(int(dev.status[0]) for dev in self.device_states.values()):
            raise RuntimeError("a PlugCache write found no slot (past max_cache_len, or a block a forward compiled "
                               "as a whole could not map): the outputs of that step are NaN. Call cache.reset(); "
                               "build the cache larger or call cache.reserve() before compiled loops.")
        if (per_layer != per_layer[0, 0]).any() or len({layer.fresh for layer in self.attn_layers}) > 1:
            raise ValueError("the PlugCache's layers hold different numbers of tokens: a forward stopped part-way "
                             "(an exception or KeyboardInterrupt inside the model). Call cache.reset() and run the "
                             "request again.")
        self.state.synced(int(per_layer[0, 0]))

    def check_status(self) -> None:
        """Raise if a write on the device found no slot since the last reset (one device read)."""
        if any(int(dev.status[0]) for dev in self.device_states.values()):
            self.sync_lengths()  # raises with the explanation

    def reserve(self, tokens: int | None = None, rows: int | None = None) -> None:
        """Map private blocks for `tokens` slots (default max_cache_len) of the first `rows` rows (default all), so
        that forwards compiled as a whole (which cannot map blocks) can run. Raises if the pool is too small."""
        rows = self.max_batch_size if rows is None else rows
        tokens = self.max_cache_len if tokens is None else tokens
        self.state.check_whole()
        with inference_mode_explained("PlugCache.reserve"):
            self._writable_here()  # (before any table changes)
            start = self.seq_length_now()
            try:
                full = self.paging.reserve(rows, start, tokens, self._copy_blocks)
            finally:
                self._sync_tables()
        self._compiled_rows, self._reserved_from = full, start

    def _copy_blocks(self, ring: int | None, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's data into block dst, in every layer of group `ring`."""
        if copies:  # the tables already map the copies: a copy that stops leaves a row reading a block never filled
            src, dst = [c[0] for c in copies], [c[1] for c in copies]
            with all_or_broken(self, "copy on write"):
                for layer in self.attn_layers:
                    if layer.ring == ring:
                        layer.kv.copy_blocks(src, dst)

    def _sync_tables(self) -> None:
        for ring, dense in self.paging.dirty_tables():
            dense = torch.tensor(dense, dtype=torch.int32)
            for dev in self.device_states.values():
                dev.load_table(ring, dense)
            self.paging.loaded(ring)  # (only once on every device: a load that raised is tried again)
            self._compiled_rows = 0  # reserve() says again which rows a forward compiled as a whole may use

    def _shares_pool(self) -> bool:
        """Whether another live cache maps blocks of this cache's pools, sharing its buffers: a fork, or the cache
        this one was forked from (`BlockPool.holders`)."""
        if all(len(pool.holders) <= 1 for pool in self.pools.values()):
            return False
        gc.collect()  # (a dropped fork that reference cycles keep until collected holds nothing)
        return any(len(pool.holders) > 1 for pool in self.pools.values())

    def _writable_here(self) -> None:
        """A cache built inside torch.inference_mode() holds inference tensors, which cannot be written outside it.
        Used outside, it moves its state into ordinary tensors once (new addresses: a compiled graph re-records),
        as a stock DynamicCache, which makes new tensors every step, simply works there."""
        first = self.attn_layers[0]
        if torch.is_inference_mode_enabled() or not (first.cache_seqlens.is_inference() or first.kv.k.is_inference()):
            return
        if first.kv.k.is_inference() and self._shares_pool():  # a copy would part from theirs: writes unseen
            raise RuntimeError(
                "this PlugCache was built inside torch.inference_mode() and shares its blocks with another cache (a "
                "fork, or the cache it was forked from); outside inference_mode its inference tensors cannot be "
                "written, and a copy of its own would no longer see the other cache's writes to blocks they share. "
                "Use both inside torch.inference_mode(), give it a pool of its own with copy.deepcopy(cache), or "
                "build the cache outside inference_mode (it works inside torch.no_grad() and inference_mode alike).")
        for key, dev in self.device_states.items():
            self.device_states[key] = dev.clone()
        moved = False
        for layer in self.attn_layers:
            moved |= layer.unpin_from_inference_mode()
            layer.dev = self.device_states[layer.device]
        if moved:
            self.slabs = []  # each layer's buffers are a copy of their own now
