"""The host-side block allocator: reference counts, copy-on-write, exhaustion, no leaks."""

from __future__ import annotations

import random

import pytest

from hf_kvplug.blocks import BlockPool, BlockTable, PoolExhausted

BS = 4


def _check(pool: BlockPool, *tables: BlockTable):
    """Every reference count equals the number of table entries naming the block; free blocks are exactly those
    with none; no count is negative."""
    want = [0] * pool.num_blocks
    for table in tables:
        for row in table.rows:
            for i in row:
                want[i] += 1
    assert pool.refs == want
    assert sorted(pool.free) == [i for i, r in enumerate(want) if r == 0]
    assert all(r >= 0 for r in pool.refs)


def test_allocate_and_release():
    pool = BlockPool(10)
    table = BlockTable(pool, 3, 4)
    assert table.prepare_write([0, 1], 0, 6, 6, BS) == []  # fresh rows: blocks mapped, nothing to copy
    assert [len(r) for r in table.rows] == [2, 2, 0]
    _check(pool, table)
    table.release(range(3))
    _check(pool, table)
    assert pool.in_use == 0


def test_reserve_maps_ahead():
    pool = BlockPool(10)
    table = BlockTable(pool, 2, 4)
    table.prepare_write([0, 1], 0, 1, 13, BS)
    assert [len(r) for r in table.rows] == [4, 4]
    table.prepare_write([0, 1], 1, 13, 13, BS)  # the reserved writes need nothing more
    assert pool.in_use == 8


def test_copy_on_write_exactly_once_per_sharer():
    """Four rows share a prompt whose last block is partly filled: the first three writers copy it, the last
    finds it private; full blocks are never copied."""
    pool = BlockPool(20)
    table = BlockTable(pool, 4, 4)
    table.prepare_write([0], 0, 10, 10, BS)  # 10 tokens: blocks 0, 1 full, block 2 partial
    table.share_from([0], [[1, 2, 3]], 3)
    assert pool.shared == 3
    _check(pool, table)
    copies = table.prepare_write([0, 1, 2, 3], 10, 11, 11, BS)
    partial = table.rows[3][2]
    assert len(copies) == 3 and {src for src, _ in copies} == {partial}
    assert len({row[2] for row in table.rows}) == 4  # each row writes its own block now
    assert pool.shared == 2  # the two full blocks stay shared
    _check(pool, table)
    assert table.prepare_write([0, 1, 2, 3], 11, 12, 12, BS) == []  # and never again


def test_exhaustion_changes_nothing():
    pool = BlockPool(5)
    table = BlockTable(pool, 2, 4)
    table.prepare_write([0], 0, 12, 12, BS)
    before = ([list(r) for r in table.rows], list(pool.refs), list(pool.free))
    with pytest.raises(PoolExhausted, match="2 free blocks of 5 and 3 more"):
        table.prepare_write([1], 0, 12, 12, BS)
    assert ([list(r) for r in table.rows], list(pool.refs), list(pool.free)) == before


def test_select_moves_references():
    pool = BlockPool(12)
    table = BlockTable(pool, 3, 4)
    table.prepare_write([0, 1, 2], 0, 6, 6, BS)
    rows = [list(r) for r in table.rows]
    table.select([2, 2, 0])
    assert table.rows == [rows[2], rows[2], rows[0]]
    assert pool.in_use == 4  # row 1's blocks went back
    _check(pool, table)
    table.select([0])
    assert table.rows == [rows[2], [], []] and pool.in_use == 2
    _check(pool, table)


def test_fork_shares_then_diverges():
    pool = BlockPool(12)
    a = BlockTable(pool, 2, 4)
    a.prepare_write([0, 1], 0, 6, 6, BS)
    b = a.fork()
    assert pool.in_use == 4 and pool.shared == 4
    copies = b.prepare_write([0], 6, 7, 7, BS)  # b's row 0 writes into its partly filled second block
    assert len(copies) == 1 and b.rows[0][1] != a.rows[0][1] and b.rows[0][0] == a.rows[0][0]
    _check(pool, a, b)
    b.release(range(2))
    a.release(range(2))
    _check(pool, a, b)
    assert pool.in_use == 0


def test_random_operations_keep_counts_consistent():
    """A random walk over every table operation: counts always match the tables, nothing leaks at the end."""
    rng = random.Random(0)
    pool = BlockPool(64)
    tables = [BlockTable(pool, 4, 6)]
    lengths = [[0] * 4]
    for _ in range(400):
        t = rng.randrange(len(tables))
        table, length = tables[t], lengths[t]
        op = rng.choice(["write", "select", "fork", "release", "share"])
        try:
            if op == "write":
                rows = rng.sample(range(4), rng.randint(1, 4))
                start = min(length[r] for r in rows)
                end = min(24, start + rng.randint(1, 5))
                if end > start:
                    table.prepare_write(rows, start, end, end, BS)
                    for r in rows:
                        length[r] = end
            elif op == "select":
                index = [rng.randrange(4) for _ in range(rng.randint(1, 4))]
                table.select(index)
                lengths[t] = [length[i] for i in index] + [0] * (4 - len(index))
            elif op == "fork" and len(tables) < 4:
                tables.append(table.fork())
                lengths.append(list(length))
            elif op == "release":
                r = rng.randrange(4)
                table.release([r])
                length[r] = 0
            elif op == "share" and table.rows[0]:
                table.share_from([0], [[3]], rng.randint(1, len(table.rows[0])))
                length[3] = 0
        except PoolExhausted:
            pass
        _check(pool, *tables)
    for table in tables:
        table.release(range(4))
    _check(pool, *tables)
    assert pool.in_use == 0


def test_exact_copy_on_write_count_fits_an_exact_pool():
    """Two pairs of rows share a partly filled block each; when all four write, two copies are enough, and a pool
    with exactly two free blocks serves them (an upper-bound count would ask for four)."""
    pool = BlockPool(4)
    table = BlockTable(pool, 4, 1)
    table.prepare_write([0, 2], 0, 3, 3, BS)
    table.share_from([0, 2], [[1], [3]], 1)
    copies = table.prepare_write([0, 1, 2, 3], 3, 4, 4, BS)
    assert len(copies) == 2 and pool.in_use == 4
    _check(pool, table)
