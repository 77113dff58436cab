"""The host-side block allocator: reference counts, copy-on-write, exhaustion, no leaks."""

from __future__ import annotations

import random

import pytest

from hf_kvplug.blocks import BlockPool, BlockTable, PoolExhausted, PrefixIndex

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


def test_a_full_pool_writes_into_a_block_the_index_shares():
    """Rows filled the pool, and the prefix index holds their first blocks; a crop sends each row back into that
    block: with no block free for the copies, the index gives up its entries of those blocks (not the others) and
    the rows write in place. With a free block, the index keeps them and the row copies."""
    pool = BlockPool(4)
    pool.index = PrefixIndex(pool)
    table = BlockTable(pool, 2, 2)
    table.prepare_write([0, 1], 0, 8, 8, BS)  # two rows of two full blocks: no block free
    first = [table.rows[0][0], table.rows[1][0]]
    pool.index.insert([("a",)], [first[0]])
    pool.index.insert([("b",)], [first[1]])
    pool.index.insert([("a",), ("a2",)], [first[0], table.rows[0][1]])
    assert pool.nfree == 0 and pool.available() == 0
    assert table.blocks_needed([0, 1], 2, 3, 3, BS) == 0  # (the index's share of those blocks is given up)
    assert table.prepare_write([0, 1], 2, 3, 3, BS) == []  # slot 2 of each row: the shared first block
    assert [table.rows[0][0], table.rows[1][0]] == first and pool.index.blocks() == {table.rows[0][1]}
    want = [1] * 4
    want[table.rows[0][1]] = 2
    assert pool.refs == want
    table.release([1])  # now a block is free: the index keeps what it holds and the row copies
    pool.index.insert([("c",)], [first[0]])
    copies = table.prepare_write([0], 1, 2, 2, BS)
    assert copies == [(first[0], table.rows[0][0])] and first[0] in pool.index.blocks()


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


# ------------------------------------------------------------------------------------------------ Paging (groups)

def _paging(main=12, ring=6, rows=3, max_blocks=4):
    """A main group and a sliding-window group of rings of 2 blocks, as a PlugCache builds them."""
    from hf_kvplug.blocks import Paging

    return Paging({None: BlockPool(main), 2: BlockPool(ring)}, rows, max_blocks, BS)


def _check_paging(*pagings):
    for ring in pagings[0].tables:
        _check(pagings[0].tables[ring].pool, *(p.tables[ring] for p in pagings))


def test_paging_prepare_maps_every_group_and_copies_through_the_owner():
    paging = _paging()
    moved = []
    assert paging.prepare(2, 0, 6, 9, 1, lambda ring, pairs: moved.append((ring, pairs))) is None
    assert [len(r) for r in paging.tables[None].rows] == [3, 3, 0]  # 9 slots reserved ahead
    assert [len(r) for r in paging.tables[2].rows] == [2, 2, 0]  # a ring holds at most its blocks
    assert moved == [(None, []), (2, [])]  # fresh rows: nothing to copy, but every group is told
    _check_paging(paging)
    dense = dict(paging.dirty_tables())
    assert set(dense) == {None, 2} and set(dict(paging.dirty_tables())) == {None, 2}  # until loaded (a load may fail)
    for ring in dense:
        paging.loaded(ring)
    assert not list(paging.dirty_tables())  # each change synced once
    assert dense[2][0] == paging.tables[2].rows[0] * 2  # the ring repeats along the row


def test_paging_shares_a_prompt_and_returns_leaders():
    paging = _paging(main=20, ring=12, rows=4)
    leaders = paging.prepare(4, 0, 6, 6, 2, lambda ring, pairs: None)
    assert leaders == [0, 2]
    table = paging.tables[None]
    assert table.rows[1] == table.rows[0] and table.rows[3] == table.rows[2] and table.rows[0] != table.rows[2]
    assert table.pool.in_use == 4  # two prompts of 6 slots stored once each
    _check_paging(paging)


def test_paging_stats_count_every_group():
    paging = _paging(main=20, ring=12, rows=4)
    paging.prepare(4, 0, 6, 6, 2, lambda ring, pairs: None)  # two prompts, each shared by two rows
    got = paging.stats({None: 100, 2: 10}, rows=4)
    assert got == {"blocks_total": 20, "blocks_in_use": 4, "blocks_shared": 4, "block_size": BS,
                   "bytes_per_block": 100, "bytes_in_use": 4 * 100 + paging.tables[2].pool.in_use * 10, "rows": 4,
                   "window_blocks_total": 12, "window_blocks_in_use": paging.tables[2].pool.in_use,
                   "window_blocks_shared": paging.tables[2].pool.shared}


def test_paging_check_room_is_all_or_nothing_across_groups():
    paging = _paging(main=12, ring=3)  # the ring pool fits one row's ring and a half
    with pytest.raises(PoolExhausted, match="3 free blocks of 3 and 4 more"):
        paging.check_room(2, 0, 8, 8)  # two rows of 8 slots: 2 ring blocks each
    assert all(t.pool.in_use == 0 for t in paging.tables.values())  # nothing was taken, in either group
    paging.check_room(1, 0, 8, 8)


def test_paging_fork_select_release_and_copy_onto():
    paging = _paging()
    paging.prepare(2, 0, 6, 6, 1, lambda ring, pairs: None)
    fork = paging.fork()
    _check_paging(paging, fork)
    assert paging.tables[None].pool.shared == 4  # every block of both rows, once per cache
    paging.select([1, 1])  # beam reorder: row 0 takes row 1's blocks
    assert paging.tables[None].rows[0] == paging.tables[None].rows[1] == fork.tables[None].rows[1]
    _check_paging(paging, fork)
    fresh = {None: BlockPool(12), 2: BlockPool(6)}
    copy = fork.copy_onto(fresh)  # a deep copy: the same ids in pools of its own
    assert copy.tables[None].rows == fork.tables[None].rows and copy.pools == fresh
    _check_paging(copy)
    paging.release()
    fork.release()
    assert all(p.in_use == 0 for p in paging.pools.values())
    assert fresh[None].in_use == 4


def test_paging_reserve_counts_rows_private_to_the_end():
    paging = _paging(main=16, ring=8, rows=2)
    paging.prepare(2, 0, 3, 3, 1, lambda ring, pairs: None)
    fork = paging.fork()  # every block shared now
    assert paging.reserve(2, 3, 3, lambda ring, pairs: None) == 0  # shared blocks ahead: no row is compiled-safe
    moved = []
    assert paging.reserve(1, 3, 16, lambda ring, pairs: moved.extend(pairs)) == 1
    assert moved  # row 0's shared blocks were copied, the fork keeps the originals
    assert fork.tables[None].rows[0][0] != paging.tables[None].rows[0][0]
    _check_paging(paging, fork)
