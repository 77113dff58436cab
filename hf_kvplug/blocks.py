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

from collections import deque


class PoolExhausted(ValueError):
    """The pool has fewer free blocks than a request needs; nothing was allocated."""


class BlockPool:
    """A free list of block ids and a reference count per block. Shared by a cache and every cache forked from it."""

    def __init__(self, num_blocks: int, name: str = "the PlugCache's block pool", hint: str = ""):
        self.num_blocks = num_blocks
        self.name, self.hint = name, hint  # for the exhaustion message
        self.refs = [0] * num_blocks
        self.free = deque(range(num_blocks))

    def allocate(self, n: int) -> list[int]:
        """`n` fresh block ids, each with one reference; raises PoolExhausted (allocating nothing) if short."""
        if n > len(self.free):
            raise PoolExhausted(f"{self.name} has {len(self.free)} free blocks of {self.num_blocks} and {n} more are "
                                f"needed{self.hint}")
        ids = [self.free.popleft() for _ in range(n)]
        for i in ids:
            self.refs[i] = 1
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
                self.free.append(i)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self.free)

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
        cover = self.blocks_for(max(end, reserve), block_size)
        written = self.positions_written(start, end, block_size)
        writers: dict[int, int] = {}  # shared block -> rows of this write that will write into it
        new = 0
        for b in rows:
            row = self.rows[b]
            new += max(0, cover - len(row))
            for i in written:
                if i < len(row) and self.pool.refs[row[i]] > 1:
                    writers[row[i]] = writers.get(row[i], 0) + 1
        # A block every holder of which writes into it: the last writer keeps it, the others copy it.
        return new + sum(n if self.pool.refs[blk] > n else n - 1 for blk, n in writers.items())

    def prepare_write(self, rows: list[int], start: int, end: int, reserve: int,
                      block_size: int) -> list[tuple[int, int]]:
        """Make slots [start, end) of `rows` writable: map missing blocks (so each row covers max(end, reserve)
        slots) and give each row a private copy of every shared block it will write into. Returns the (src, dst)
        block pairs whose data the caller must copy. All or nothing: raises PoolExhausted before changing anything."""
        cover = self.blocks_for(max(end, reserve), block_size)
        written = self.positions_written(start, end, block_size)
        needed = self.blocks_needed(rows, start, end, reserve, block_size)
        if needed == 0:
            return []
        fresh = self.pool.allocate(needed)
        copies = []
        for b in rows:
            row = self.rows[b]
            for i in written:
                if i < len(row) and self.pool.refs[row[i]] > 1:
                    dst = fresh.pop()
                    copies.append((row[i], dst))
                    self.pool.decref([row[i]])
                    row[i] = dst
            row.extend(fresh.pop() for _ in range(cover - len(row)))
        assert not fresh, "copy-on-write count and copies disagree"
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
