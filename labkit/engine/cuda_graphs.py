"""Decode steps replayed as CUDA graphs: one launch per step instead of hundreds.

A decode step of a small batch moves a few GB in a few milliseconds on a GPU, while Python
launches several hundred kernels for it one by one (norms, rotary, cache writes, attention,
matmuls, per layer). On a GPU whose host CPU is slow, the launches take longer than the work
and the step is CPU-bound: batch-1 decode then shows a low MBU that says nothing about memory.
vLLM and SGLang capture decode steps as CUDA graphs for this reason, and so does the lab's
engine (`EngineConfig(cuda_graphs=True)`).

A graph replays fixed addresses and shapes, so each graph belongs to one (batch, block-width)
bucket: the batch is padded up to the next power of two (at most `max_num_seqs`: padding rows
cost compute, which a decode step has to spare) and the block table width up to the next of four
steps per octave (at most the model length in blocks: padding columns cost KV reads, the decode
step's scarce resource, so at most a quarter is added). The inputs live in
static tensors that each step overwrites: token ids, context lengths and block tables. Padding
rows attend to one slot of a scratch block that no sequence owns, and write their K/V there;
padding columns of the block table point at the scratch block too and are masked out.
Positions, cache slots and the mask are computed inside the graph from the context lengths.

On a CPU the same padded path runs without capture (`capture=False`): the tests check it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from labkit.engine.model import AttentionMeta

if TYPE_CHECKING:
    from labkit.engine.kv_cache import KVCache
    from labkit.engine.sequence import Sequence

Forward = Callable[..., torch.Tensor]


def bucket(n: int, cap: int, *, per_octave: int = 1) -> int:
    """n rounded up to a bucket, at most `cap` (n must be in 1..cap).

    per_octave=1: powers of two. per_octave=4: four steps between powers of two (8, 10, 12, 14,
    16, 20, ...), so padding adds at most a quarter: for block tables, where padding is KV read.
    """
    if not 1 <= n <= cap:
        raise ValueError(f"{n} is outside 1..{cap}")
    top = 1 << (n - 1).bit_length()  # the power of two at or above n
    step = max(1, top // (2 * per_octave)) if per_octave > 1 else top
    return min(-(-n // step) * step, cap)


@dataclass
class _Graph:
    ids: torch.Tensor  # [B] int64 token ids
    ctx: torch.Tensor  # [B] int64 context length including the new token
    blocks: torch.Tensor  # [B, W] int64 block tables
    host: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # pinned copies of the three (CPU: unused)
    out: torch.Tensor | None = None  # [B, hidden]: the graph's output
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Runs decode-only steps through per-bucket CUDA graphs (or, with capture=False, the same padded inputs eagerly)."""

    def __init__(
        self,
        forward: Forward,
        cache: KVCache,
        block_size: int,
        scratch_block: int,
        max_batch: int,
        max_blocks: int,
        device: torch.device,
        *,
        capture: bool = True,
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.forward, self.cache, self.bs = forward, cache, block_size
        self.scratch, self.max_batch, self.max_blocks = scratch_block, max_batch, max_blocks
        self.device, self.capture = device, capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.num_captures = 0
        self.num_replays = 0

    def fits(self, seqs: list[Sequence]) -> bool:
        return 1 <= len(seqs) <= self.max_batch and max(len(s.block_table) for s in seqs) <= self.max_blocks

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Final hidden states [len(seqs), hidden] of one decode step (each sequence's last token)."""
        nd, width = len(seqs), max(len(s.block_table) for s in seqs)
        key = (bucket(nd, self.max_batch), bucket(width, self.max_blocks, per_octave=4))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._build(*key)
        self._fill(g, seqs)
        if g.graph is not None:
            g.graph.replay()
            self.num_replays += 1
            out = g.out
        else:
            out = self._body(g)
        assert out is not None
        return out[:nd]

    # --- inside -------------------------------------------------------------------------
    def _body(self, g: _Graph) -> torch.Tensor:
        """The step on the static inputs: what the graph records."""
        pos = g.ctx - 1
        slots = g.blocks.gather(1, (pos // self.bs)[:, None])[:, 0] * self.bs + pos % self.bs
        width = g.blocks.shape[1] * self.bs
        mask = (torch.arange(width, device=self.device)[None, :] < g.ctx[:, None]).view(g.ctx.shape[0], 1, 1, width)
        meta = AttentionMeta(slots, g.ctx.shape[0], g.blocks, mask, [], g.ctx)
        return self.forward(g.ids, pos, meta, self.cache, None)

    def _pad(self, g: _Graph) -> None:
        """Every row a padding row: one token at the scratch block's first slot."""
        g.ids.zero_()
        g.ctx.fill_(1)
        g.blocks.fill_(self.scratch)

    def _build(self, batch: int, width: int) -> _Graph:
        dev = self.device
        z = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=dev)
        pin = self.capture
        h = lambda *shape: torch.zeros(shape, dtype=torch.int64, pin_memory=pin)
        g = _Graph(z(batch), z(batch), z(batch, width), (h(batch), h(batch), h(batch, width)))
        self._pad(g)
        if not self.capture:
            return g
        # Warm up on a side stream (allocator, cuBLAS workspaces, lazy inits), then record.
        # Padding inputs only: these runs write nothing but the scratch block.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(g)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads (HTTP, KV transfers) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            g.out = self._body(g)
        g.graph = graph
        self.num_captures += 1
        return g

    def _fill(self, g: _Graph, seqs: list[Sequence]) -> None:
        ids, ctx, blocks = (h.numpy() for h in g.host)
        ids[:] = 0
        ctx[:] = 1
        blocks[:] = self.scratch
        for i, s in enumerate(seqs):
            ids[i] = s.token_ids[-1]
            ctx[i] = len(s.token_ids)
            blocks[i, : len(s.block_table)] = np.asarray(s.block_table, dtype=np.int64)
        for dst, src in zip((g.ids, g.ctx, g.blocks), g.host):
            dst.copy_(src, non_blocking=self.capture)
