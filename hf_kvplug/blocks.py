"""The host side of the paged layout: a pool of block ids with reference counts, and the rows that map them.

A block holds `block_size` consecutive tokens of one row in every layer of a cache (the K/V buffers of all layers are
indexed by the same block id), so one allocator serves all layers. The kernels only ever see the device copy of the
block table; everything here runs on the host, at points where the lengths are known without a device read
(a forward's start, beam reorder, crop, fork), never inside a compiled decode step.

Sharing is copy-on-write: a block referenced by several rows (or several forked caches) is read by all of them and
written by none; a row about to write into a shared block first gets a private copy (`BlockTable.prepare_write`).

Sliding-window layers keep only their window: their table is a ring of `ring` blocks per row. Logical block i of
a row lives in ring position i % ring, and the device table repeats the ring along the row (`to_dense`), so the
kernels index it by slot as any other table and need no notion of a ring. Slot t and slot t + ring * block_size
share a place: the cache writes a row's slots in order and never lets a write land on a slot still visible.
"""

from __future__ import annotations

import heapq
import math
import weakref


class PoolExhausted(ValueError):
    """The pool has fewer free blocks than a request needs; nothing was allocated."""


class BlockPool:
    """Block ids with a reference count each (free: 0). Shared by a cache and every cache forked from it.

    Hands out the ids a caller prefers where they are free (a row's next blocks, so that its blocks stay consecutive
    and the non-CUDA path can read the row where it lies), otherwise the lowest free ones.
    """

    def __init__(self, num_blocks: int, name: str = "the PlugCache's block pool", hint: str = ""):
        self.num_blocks = num_blocks
        self.name, self.hint = name, hint  # for the exhaustion message
        self.refs = [0] * num_blocks
        self.nfree = num_blocks
        # candidate free ids, lowest first; an id taken out of turn stays until popped (its count says it is taken)
        self._heap = list(range(num_blocks))
        self.index: PrefixIndex | None = None  # full blocks kept for later requests (prefix caching), evictable
        # the caches mapping this pool's blocks: one, and each cache forked from it (they share the buffers too)
        self.holders: weakref.WeakSet = weakref.WeakSet()

    def available(self) -> int:
        """Free blocks, and blocks only the prefix index holds (it gives them up when room is needed)."""
        return self.nfree + (self.index.idle() if self.index is not None else 0)

    def make_room(self, n: int) -> None:
        """Make `n` blocks free, taking them from the prefix index's least recently used idle blocks if needed;
        raises PoolExhausted, giving nothing up, if even that is not enough."""
        if n <= self.nfree:
            return
        if self.index is None or n > self.available():
            raise PoolExhausted(f"{self.name} has {self.nfree} free blocks of {self.num_blocks} and {n} more are "
                                f"needed{self.hint}")
        self.index.evict(n - self.nfree)

    @property
    def free(self) -> list[int]:
        """The free ids (for tests and inspection; `nfree` counts them)."""
        return [i for i, r in enumerate(self.refs) if r == 0]

    def allocate(self, n: int, prefer=()) -> list[int]:
        """`n` free block ids, each with one reference: those of `prefer` that are free, in its order, then the lowest
        free ones; raises PoolExhausted (allocating nothing) if fewer than `n` are free."""
        self.make_room(n)
        ids = []
        for i in prefer:
            if len(ids) == n:
                break
            if 0 <= i < self.num_blocks and self.refs[i] == 0:
                self.refs[i] = 1
                ids.append(i)
        while len(ids) < n:
            i = heapq.heappop(self._heap)
            if self.refs[i] == 0:
                self.refs[i] = 1
                ids.append(i)
        self.nfree -= n
        return ids

    def incref(self, ids) -> None:
        for i in ids:
            assert self.refs[i] > 0, f"block {i} is free"
            self.refs[i] += 1

    def decref(self, ids) -> None:
        for i in ids:
            assert self.refs[i] > 0, f"block {i} released twice"
            self.refs[i] -= 1
            if self.refs[i] == 0:
                heapq.heappush(self._heap, i)
                self.nfree += 1
        if len(self._heap) > 2 * self.num_blocks:  # ids taken out of turn left stale entries: drop them
            self._heap = self.free

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.nfree

    @property
    def shared(self) -> int:
        return sum(r > 1 for r in self.refs)


class BlockTable:
    """The host copy of one cache's block table: row b's i-th block id is `rows[b][i]` (rows grow from the front).
    With `ring` (a sliding-window group), a row holds at most `ring` blocks and logical block i is `rows[b][i % ring]`.

    Every mutation returns nothing and leaves `dirty` set; the owner copies the table to its devices once per host
    operation (`to_dense`). Copy-on-write copies are reported to the owner as (src, dst) pairs, which moves the data.
    """

    def __init__(self, pool: BlockPool, max_rows: int, max_blocks: int, ring: int | None = None):
        self.pool = pool
        self.max_blocks = max_blocks
        self.ring = ring
        self.width = max_blocks if ring is None else ring  # blocks a row can hold
        self.rows: list[list[int]] = [[] for _ in range(max_rows)]
        self.dirty = True

    def to_dense(self) -> list[list[int]]:
        """`[max_rows][max_blocks]` ids by logical block, -1 where a row maps no block (the kernels refuse to write
        there); a ring repeats along the row."""
        if self.ring is None:
            return [row + [-1] * (self.max_blocks - len(row)) for row in self.rows]
        reps = -(-self.max_blocks // self.ring)
        return [((row + [-1] * (self.ring - len(row))) * reps)[:self.max_blocks] for row in self.rows]

    def blocks_for(self, tokens: int, block_size: int) -> int:
        return min(-(-tokens // block_size), self.width)

    def positions_written(self, start: int, end: int, block_size: int) -> list[int]:
        """Positions in a row of the blocks that slots [start, end) write into (each once)."""
        if end <= start:
            return []
        first, last = start // block_size, (end - 1) // block_size
        if self.ring is None:
            return list(range(first, last + 1))
        return sorted({i % self.ring for i in range(first, min(last, first + self.ring - 1) + 1)})

    def blocks_needed(self, rows: list[int], start: int, end: int, reserve: int, block_size: int) -> int:
        """Fresh blocks `prepare_write` with the same arguments would take (mapped + copied), changing nothing."""
        return self._need(rows, self.blocks_for(max(end, reserve), block_size),
                          self.positions_written(start, end, block_size))[0]

    def _need(self, rows: list[int], cover: int, written: list[int]) -> tuple[int, set[int]]:
        """(fresh blocks, blocks the prefix index gives up) for rows that must cover `cover` blocks and write into
        positions `written`. Where the pool has too few, a block the index shares with a row that writes into it
        leaves the index (its entry is given up) rather than be copied: what the index keeps never makes a request
        that fits the cache fail."""
        needed = self._needed(rows, cover, written)
        index = self.pool.index
        if needed <= self.pool.available() or index is None:
            return needed, set()
        drop = {self.rows[b][i] for b in rows for i in written if i < len(self.rows[b])} & index.blocks()
        return (self._needed(rows, cover, written, drop), drop) if drop else (needed, drop)

    def _needed(self, rows: list[int], cover: int, written: list[int], unindexed: set[int] = frozenset()) -> int:
        """`_need`'s count, the index's reference to the blocks `unindexed` not counted."""
        writers: dict[int, int] = {}  # shared block -> rows of this write that will write into it
        new = 0
        for b in rows:
            row = self.rows[b]
            new += max(0, cover - len(row))
            for i in written:
                if i < len(row) and self.pool.refs[row[i]] - (row[i] in unindexed) > 1:
                    writers[row[i]] = writers.get(row[i], 0) + 1
        # A block every holder of which writes into it: the last writer keeps it, the others copy it.
        return new + (sum(n if self.pool.refs[blk] - (blk in unindexed) > n else n - 1 for blk, n in writers.items())
                      if writers else 0)

    def prepare_write(self, rows: list[int], start: int, end: int, reserve: int,
                      block_size: int) -> list[tuple[int, int]]:
        """Make slots [start, end) of `rows` writable: map missing blocks (so each row covers max(end, reserve)
        slots) and give each row a private copy of every shared block it will write into (a block shared with the
        prefix index only leaves the index instead, when the pool has no room for the copy: `_need`). Returns the
        (src, dst) block pairs whose data the caller must copy. All or nothing: raises PoolExhausted before changing
        anything."""
        cover = self.blocks_for(max(end, reserve), block_size)
        written = self.positions_written(start, end, block_size)
        needed, drop = self._need(rows, cover, written)
        if needed == 0 and not drop:
            return []
        self.pool.make_room(needed)  # all or nothing: raises before any change, naming the pool
        if drop:
            self.pool.index.forget(drop)
        # Each block goes where it keeps the row's blocks consecutive if that one is free: after the row's previous
        # block, or at the row's home (row b of a pool with room for every row: blocks [b * width, (b + 1) * width)).
        copies, taken = [], 0
        for b in rows:
            row = self.rows[b]
            for i in written:
                if i < len(row) and self.pool.refs[row[i]] > 1:  # the last writer of a shared block keeps it
                    (dst,) = self.pool.allocate(1, prefer=[row[i - 1] + 1 if i else b * self.width])
                    copies.append((row[i], dst))
                    self.pool.decref([row[i]])
                    row[i] = dst
                    taken += 1
            grow = cover - len(row)
            if grow > 0:
                after = row[-1] + 1 if row else b * self.width
                row.extend(self.pool.allocate(grow, prefer=range(after, after + grow)))
                taken += grow
        assert taken == needed, "copy-on-write count and copies disagree"
        self.dirty = True
        return copies

    def share_from(self, leaders: list[int], followers: list[list[int]], nblocks: int) -> None:
        """Map the first `nblocks` blocks of each follower row to its leader's (blocks it mapped are released)."""
        nblocks = min(nblocks, self.width)
        for lead, rows in zip(leaders, followers):
            src = self.rows[lead][:nblocks]
            self.release(rows)
            for r in rows:
                self.pool.incref(src)
                self.rows[r] = list(src)
        self.dirty = True

    def select(self, index: list[int]) -> None:
        """Row b becomes row index[b] for b < len(index) (beam reorder, batch select / repeat): moves ids and
        reference counts, copies no data. Rows past len(index) are released."""
        new = [list(self.rows[i]) for i in index]
        for row in new:
            self.pool.incref(row)
        self.release(range(len(self.rows)))
        self.rows[:len(new)] = new
        self.dirty = True

    def release(self, rows) -> None:
        for b in rows:
            self.pool.decref(self.rows[b])
            self.rows[b] = []
        self.dirty = True

    def fork(self) -> "BlockTable":
        """A second table over the same pool mapping the same blocks (one more reference each)."""
        other = BlockTable(self.pool, len(self.rows), self.max_blocks, self.ring)
        other.rows = [list(row) for row in self.rows]
        for row in other.rows:
            self.pool.incref(row)
        return other

    def mapped(self) -> list[int]:
        return [len(row) for row in self.rows]


class Paging:
    """The block tables of one cache: one per group of layers (None: the layers that keep up to max_cache_len; a
    ring size: sliding-window layers), each over its pool, which forks share. Decides which blocks a forward maps,
    copies or shares; the owner moves the data (`copy(ring, pairs)`) and the device tables (`dirty_tables`)."""

    def __init__(self, pools: dict, max_rows: int, max_blocks: int, block_size: int):
        self.max_rows, self.max_blocks, self.block_size = max_rows, max_blocks, block_size
        self.tables = {ring: BlockTable(pool, max_rows, max_blocks, ring) for ring, pool in pools.items()}

    @property
    def pools(self) -> dict:
        return {ring: table.pool for ring, table in self.tables.items()}

    def stats(self, bytes_per_block: dict, **counts) -> dict:
        """Blocks of the main pool in use and shared, bytes in use over every pool (`bytes_per_block[ring]`), the
        owner's `counts`, the prefix index's counts when there is one, the ring pools' blocks as
        `window_blocks_*`."""
        pools = self.pools
        main = pools.get(None) or BlockPool(0)
        out = {"blocks_total": main.num_blocks, "blocks_in_use": main.in_use, "blocks_shared": main.shared,
               "block_size": self.block_size, "bytes_per_block": bytes_per_block.get(None, 0),
               "bytes_in_use": sum(pool.in_use * bytes_per_block[ring] for ring, pool in pools.items()), **counts}
        if main.index is not None:
            out.update(prefix_cached_blocks=len(main.index.entries), prefix_hit_tokens=main.index.hit_tokens)
        rings = [pool for ring, pool in pools.items() if ring is not None]
        if rings:
            out.update(window_blocks_total=sum(p.num_blocks for p in rings),
                       window_blocks_in_use=sum(p.in_use for p in rings),
                       window_blocks_shared=sum(p.shared for p in rings))
        return out

    def check_room(self, rows: int, start: int, end: int, reserve: int) -> None:
        """Raise PoolExhausted, naming the pool, unless every group has room for `prepare(rows, start, end,
        reserve)`; all or nothing across groups."""
        for table in self.tables.values():
            need = table.blocks_needed(list(range(rows)), start, end, reserve, self.block_size)
            table.pool.make_room(need)  # raises, naming the pool

    def prepare(self, rows: int, start: int, end: int, reserve: int, share: int, copy) -> list[int] | None:
        """Make slots [start, end) of rows < `rows` writable, each row covering max(end, reserve) slots;
        `copy(ring, pairs)` moves the data of the blocks copied on write. With `share` > 1 (a prompt into empty
        rows, `rows` a multiple of it), each group of `share` rows maps its leader's prompt blocks, and the leaders
        are returned (only they are written); else None."""
        bs = self.block_size
        leaders = list(range(0, rows, share)) if share > 1 else None
        for ring, table in self.tables.items():
            if leaders is None:
                copy(ring, table.prepare_write(list(range(rows)), start, end, reserve, bs))
                continue
            followers = [list(range(b + 1, b + share)) for b in leaders]
            copies = table.prepare_write(leaders, 0, end, reserve, bs)
            table.share_from(leaders, followers, math.ceil(end / bs))
            copies += table.prepare_write([r for group in followers for r in group], end, end, reserve, bs)
            copy(ring, copies)
        return leaders

    def reserve(self, rows: int, start: int, tokens: int, copy) -> int:
        """Map private blocks for `tokens` slots of rows < `rows` (a ring: all its blocks, it serves any length),
        copying shared ones; returns how many leading rows have every block mapped and private from `start` on."""
        bs = self.block_size
        for ring, table in self.tables.items():
            copy(ring, table.prepare_write(list(range(rows)), start, max(tokens, start), tokens, bs))
        full = 0
        for b in range(rows):
            if any(len(t.rows[b]) < t.width or any(t.pool.refs[t.rows[b][i]] > 1
                                                   for i in t.positions_written(start, self.max_blocks * bs, bs))
                   for t in self.tables.values()):
                break
            full += 1
        return full

    def select(self, index: list[int]) -> None:
        for table in self.tables.values():
            table.select(index)

    def release(self) -> None:
        for table in self.tables.values():
            table.release(range(self.max_rows))

    def fork(self) -> "Paging":
        """The same rows over the same pools (one more reference to each block)."""
        other = object.__new__(Paging)
        other.max_rows, other.max_blocks, other.block_size = self.max_rows, self.max_blocks, self.block_size
        other.tables = {ring: table.fork() for ring, table in self.tables.items()}
        return other

    def copy_onto(self, pools: dict) -> "Paging":
        """The same rows mapping the same block ids in `pools` (fresh pools over copied buffers)."""
        other = Paging(pools, self.max_rows, self.max_blocks, self.block_size)
        for ring, table in other.tables.items():
            table.rows = [list(row) for row in self.tables[ring].rows]
            for row in table.rows:  # the same ids: each taken (once) and counted per row naming it
                for i in row:
                    if table.pool.refs[i] == 0:
                        table.pool.allocate(1, prefer=[i])
                    else:
                        table.pool.incref([i])
        return other

    def dirty_tables(self):
        """(ring, dense table `[max_rows][max_blocks]`) of each table changed since it was last `loaded`."""
        for ring, table in self.tables.items():
            if table.dirty:
                yield ring, table.to_dense()

    def loaded(self, ring: int | None) -> None:
        """The table of `ring` is on every device as it is now."""
        self.tables[ring].dirty = False

    def mark_dirty(self) -> None:
        for table in self.tables.values():
            table.dirty = True


class PrefixIndex:
    """Full blocks of finished requests, kept for later ones by what they hold (prefix caching, as vLLM's and
    SGLang's): an entry is keyed by its parent entry (the block before it in the row; the root names the model and
    cache format), the tokens of its slots and which of them the attention mask showed, so a key says exactly what
    K/V the block holds. Keys are compared whole, never by a hash alone, and a parent is named by a serial number that
    is never reused, so no stale entry can match. The index holds one reference to each block; blocks only it holds
    are "idle" and given back to the pool, least recently used first, when the pool needs room."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.root = None
        self.entries: dict = {}  # key -> (serial, block), least recently used first
        self.next_serial = 1
        self.hit_tokens = 0  # tokens requests did not prefill thanks to the index (since reset_stats())

    def set_root(self, root) -> None:
        """Entries made for another model or format (`root`) can never match again: give them up."""
        if root != self.root:
            self.clear()
            self.root = root

    def clear(self) -> None:
        self.pool.decref([block for _, block in self.entries.values()])
        self.entries.clear()

    def _keys(self, blocks):
        """Walk `blocks` (per block: a hashable of its tokens and mask bits), yielding (key, entry or None)."""
        parent = ("root", self.root)
        for content in blocks:
            key = (parent, content)
            entry = self.entries.get(key)
            yield key, entry
            if entry is None:
                return
            parent = entry[0]

    def match(self, blocks) -> list[int]:
        """The block ids of the longest indexed prefix of a row whose blocks hold `blocks` (per block, its
        tokens and mask bits); each found entry becomes the most recently used."""
        found = []
        for key, entry in self._keys(blocks):
            if entry is None:
                break
            self.entries[key] = self.entries.pop(key)  # most recently used last
            found.append(entry[1])
        return found

    def insert(self, blocks, ids: list[int]) -> None:
        """Index a row's full blocks `ids` holding `blocks` (as `match` takes them); entries already there stay."""
        parent = ("root", self.root)
        for content, block in zip(blocks, ids):
            key = (parent, content)
            entry = self.entries.get(key)
            if entry is None:
                entry = (self.next_serial, block)
                self.next_serial += 1
                self.pool.incref([block])
            else:
                self.entries.pop(key)
            self.entries[key] = entry  # most recently used last
            parent = entry[0]

    def idle(self) -> int:
        return sum(self.pool.refs[block] == 1 for _, block in self.entries.values())

    def blocks(self) -> set[int]:
        return {block for _, block in self.entries.values()}

    def forget(self, blocks: set[int]) -> None:
        """Give up the entries of `blocks` (their references; entries below them can no longer match, and go when
        the pool needs room, as idle ones do)."""
        self._drop([k for k, (_, block) in self.entries.items() if block in blocks])

    def evict(self, n: int) -> None:
        """Give up to `n` idle blocks back to the pool, least recently used first."""
        self._drop([k for k, (_, block) in self.entries.items() if self.pool.refs[block] == 1][:n])

    def _drop(self, keys: list) -> None:
        """Remove the entries `keys` and their references to their blocks."""
        for key in keys:
            _, block = self.entries.pop(key)
            self.pool.decref([block])
