"""Block manager and scheduler bookkeeping, without a model."""

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Request, Sequence
from minivllm.sampling_params import SamplingParams


class _NoText:
    def add(self, token_id):
        return ""


def make_seq(tokens, priority=0):
    request = Request("r", None, list(tokens), SamplingParams(), priority)
    return Sequence(request, 0, request.params, _NoText())


def test_prefix_blocks_are_shared_and_refcounted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(range(10))
    assert bm.allocate_cached_prefix(a) == 0
    assert bm.ensure_slots(a, 10) and len(a.block_table) == 3
    bm.cache_full_blocks(a, 10)
    b = make_seq(list(range(8)) + [99, 98, 97])
    assert bm.allocate_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert bm.num_free_blocks == 10 - 2
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_last_token_block_is_never_taken_from_cache():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq(range(8))
    bm.ensure_slots(a, 8)
    bm.cache_full_blocks(a, 8)
    same = make_seq(range(8))
    assert bm.allocate_cached_prefix(same) == 4  # the block with the last token is recomputed


def test_freed_cached_blocks_are_reused_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.ensure_slots(a, 5)
    bm.cache_full_blocks(a, 5)
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 9])
    assert bm.allocate_cached_prefix(b) == 4
    bm.free(b)
    c = make_seq(range(100, 108))  # needs all four blocks: evicts the cached ones
    assert bm.ensure_slots(c, 8)
    bm.free(c)
    assert bm.allocate_cached_prefix(make_seq([1, 2, 3, 4, 9])) == 0


def test_disabled_prefix_caching_shares_nothing():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_seq(range(10))
    bm.ensure_slots(a, 10)
    bm.cache_full_blocks(a, 10)
    assert bm.allocate_cached_prefix(make_seq(range(10))) == 0


def test_scheduler_budget_chunks_and_preempts_newest():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    old, new = make_seq(range(8)), make_seq(range(50, 58))
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()
    assert [(s is old, n) for s, n in batch] == [(True, 6)]
    old.num_computed_tokens += 6
    batch = sched.schedule()
    assert [(s is old, n) for s, n in batch] == [(True, 2), (False, 4)]
    for s, n in batch:
        s.num_computed_tokens += n
    # Grow `old` past its blocks while the pool is full: the newest sequence is preempted.
    old.token_ids += list(range(100, 110))
    new.token_ids += [1]
    batch = sched.schedule()
    assert sched.num_preemptions == 1 and new in sched.waiting and new.block_table == []
    assert batch[0][0] is old
