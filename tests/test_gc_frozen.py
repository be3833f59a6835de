"""labkit.proc.gc_frozen: what is alive at its start is out of the GC's reach, and only inside the block."""
from __future__ import annotations

import gc

import pytest

from labkit.proc import gc_frozen


def _oldest_generation_ids() -> set[int]:
    return {id(o) for o in gc.get_objects(generation=2)}


def test_the_heap_is_frozen_inside_the_block_and_back_after_it() -> None:
    alive = [[i] for i in range(1000)]  # tracked objects alive across the block
    with gc_frozen() as frozen:
        assert frozen >= 1000
        oldest = _oldest_generation_ids()
        assert not any(id(x) in oldest for x in alive)  # frozen: no collection looks at them
        cycle: list[object] = []
        cycle.append(cycle)  # garbage made inside the block is still collected
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
    oldest = _oldest_generation_ids()
    assert all(id(x) in oldest for x in alive)  # back where the oldest-generation pass sees them


def test_an_error_inside_the_block_unfreezes_the_heap() -> None:
    with pytest.raises(RuntimeError, match="inside"), gc_frozen():
        raise RuntimeError("inside")
    assert gc.get_freeze_count() == 0
