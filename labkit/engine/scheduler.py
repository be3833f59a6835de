"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
A decode costs one token of budget; a prompt chunk costs its length. When a decode needs a
block and none is free, the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue, to be recomputed (prompt + output so far) later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from labkit.engine.config import EngineConfig
from labkit.engine.kv_cache import BlockPool
from labkit.engine.sequence import Sequence, Status


@dataclass(slots=True)
class Batch:
    """One step's work: decodes (one token each) and prompt chunks (sequence, tokens)."""

    decodes: list[Sequence] = field(default_factory=list)
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def phase(self) -> Literal["prefill", "decode", "mixed", "idle"]:
        if self.decodes and self.chunks:
            return "mixed"
        return "decode" if self.decodes else "prefill" if self.chunks else "idle"

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: BlockPool) -> None:
        self.cfg = cfg
        self.pool = pool
        self.waiting: deque[Sequence] = deque()  # FIFO; preempted sequences re-enter at the front
        self.running: deque[Sequence] = deque()  # oldest first; the newest is preempted first

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        for q in (self.waiting, self.running):
            if seq in q:
                q.remove(seq)

    def prefill_done(self, seq: Sequence) -> None:
        """`seq` computed its whole prompt and got a token: it decodes from now on."""
        self.waiting.remove(seq)
        self.add_running(seq)

    def schedule(self) -> Batch:
        """The next step's batch; empty (phase "idle") when there is nothing to run."""
        batch = Batch()
        budget = self.cfg.max_num_batched_tokens
        if self.cfg.policy == "chunked":
            # Decodes first, so a long prompt never stalls them; prompts fill what is left.
            self._decodes(batch, budget)
            self._prefills(batch, budget - len(batch.decodes), chunk_any=True)
        else:
            self._prefills(batch, budget, chunk_any=False)
            if not batch.chunks:
                self._decodes(batch, budget)
        if batch.phase == "idle" and self.waiting and self._free_a_waiter():
            return self.schedule()
        return batch

    def _prefills(self, batch: Batch, budget: int, chunk_any: bool) -> None:
        num_seqs = len(self.running)
        for seq in list(self.waiting):
            if budget <= 0 or num_seqs >= self.cfg.max_num_seqs:
                break
            fresh = not seq.block_table
            if fresh:
                hit = self.pool.match_prefix(seq)
                if not seq.output_ids:  # a recompute after preemption keeps its first count
                    seq.num_cached_tokens = hit
            n = min(seq.num_uncomputed, budget)
            # prefill_first runs whole prompts; only the first of a step may be cut to the budget,
            # so a prompt longer than the budget still makes progress.
            if (n < seq.num_uncomputed and not chunk_any and batch.chunks) or not self.pool.grow(
                seq, seq.num_computed_tokens + n
            ):
                if fresh:  # give back the prefix blocks it just adopted
                    self.pool.release(seq)
                    seq.num_computed_tokens = 0
                    if not seq.output_ids:
                        seq.num_cached_tokens = 0
                break
            batch.chunks.append((seq, n))
            budget -= n
            num_seqs += 1

    def _decodes(self, batch: Batch, budget: int) -> None:
        limit = min(budget, self.cfg.max_num_seqs)
        kept: deque[Sequence] = deque()
        while self.running and len(batch.decodes) < limit:
            seq = self.running.popleft()
            while not self.pool.grow(seq, len(seq.token_ids)):
                victim = self.running.pop() if self.running else seq
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.decodes.append(seq)
                kept.append(seq)
        self.running.extendleft(reversed(kept))

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.pool.release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _free_a_waiter(self) -> bool:
        """Nothing fits: preempt the newest partly prefilled sequence behind the head so the head can run."""
        for seq in reversed(list(self.waiting)[1:]):
            if seq.block_table:
                self.waiting.remove(seq)
                self._preempt(seq, Batch())
                self.waiting.remove(seq)
                self.waiting.append(seq)  # back in its place at the tail, not ahead of the head
                return True
        return False
