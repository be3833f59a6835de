"""The paged KV cache: the tensors (`KVCache`) and the bookkeeping of their blocks (`BlockPool`).

A block holds `block_size` consecutive tokens of one sequence, for every layer. A sequence
owns a block table (its block ids in order); token at position p lives in slot
`table[p // block_size] * block_size + p % block_size`. With prefix caching, every full
block is named by a hash chained over all tokens up to its end, so two prompts that share a
prefix share its blocks (reference counted), and freed blocks keep their contents, in LRU
order, until a new allocation needs the space.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from labkit.engine.sequence import Sequence


class KVCache:
    """Keys and values of every layer, `[num_layers, num_blocks * block_size, kv_heads, head_dim]` each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        # Zeros, not empty: masked-out slots still enter the attention matmul, and a NaN
        # left in uninitialised memory would survive the mask.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's keys (or values) in one layer."""
        return self.k[0, : self.block_size].numel() * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores rows k, v [rows, kv_heads, head_dim] at `slots` [rows].

        Indexes the whole tensor (layer, slot) rather than writing into the view `self.k[layer]`:
        under torch.compile a write into a view of a graph input is replayed as a copy of the
        whole cache, every layer, every step (25x slower decode); this form updates in place.
        """
        at = (torch.full_like(slots, layer), slots)
        self.k.index_put_(at, k)
        self.v.index_put_(at, v)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: blocks [seqs, max_blocks] -> two [seqs, kv_heads, max_blocks * block_size, head_dim]."""
        seqs, nb = blocks.shape
        flat = blocks.reshape(-1)
        out = []
        for t in (self.k[layer], self.v[layer]):
            rows = t.view(self.num_blocks, -1).index_select(0, flat)  # one copy of whole blocks
            out.append(rows.view(seqs, nb * self.block_size, *t.shape[1:]).transpose(1, 2))
        return out[0], out[1]

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids [end - start] of positions start..end-1 of a sequence with `block_table`."""
        pos = np.arange(start, end)
        table = np.asarray(block_table, dtype=np.int64)
        return torch.from_numpy(table[pos // self.block_size] * self.block_size + pos % self.block_size).to(
            self.k.device
        )

    def read(
        self, block_table: list[int], num_tokens: int, layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of the first `num_tokens` positions: [num_layers, num_tokens, kv_heads, head_dim], or one layer's [num_tokens, ...]."""
        idx = self.slots(block_table, 0, num_tokens)
        if layer is not None:
            return self.k[layer].index_select(0, idx), self.v[layer].index_select(0, idx)
        return self.k.index_select(1, idx), self.v.index_select(1, idx)

    def load(self, block_table: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v [num_layers, num_tokens, kv_heads, head_dim] into the first positions of `block_table`."""
        idx = self.slots(block_table, 0, k.shape[1])
        self.k.index_copy_(1, idx, k.to(self.k.device, self.k.dtype))
        self.v.index_copy_(1, idx, v.to(self.v.device, self.v.dtype))


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: a 128-bit hash of its parent's name and its token ids."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class BlockPool:
    """Which blocks are free, who holds the others, and which full blocks are reusable by prefix."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # hold nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced but hashed: LRU first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)  # least recently freed cached block
            h = self.block_hash[b]
            if h is not None and self.by_hash.get(h) == b:
                del self.by_hash[h]
            self.block_hash[b] = None
        self.ref_count[b] = 1
        return b

    def match_prefix(self, seq: Sequence) -> int:
        """Adopts the cached full blocks that start `seq` (it must hold none); returns tokens reused.

        The last token is always recomputed, since its logits pick the next token.
        """
        assert not seq.block_table
        usable = (len(seq.token_ids) - 1) // self.block_size
        if not self.enable_prefix_caching:
            return 0
        h = b""
        for i in range(usable):
            h = chain_hash(h, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            b = self.by_hash.get(h)
            if b is None:
                break
            if self.ref_count[b] == 0:
                del self.evictable[b]
            self.ref_count[b] += 1
            seq.block_table.append(b)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must still get to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Gives `seq` blocks for `num_tokens` tokens; False (and nothing taken) when too few are free."""
        n = self.needed(seq, num_tokens)
        if n > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take() for _ in range(n))
        return True

    def commit(self, seq: Sequence) -> None:
        """Names the blocks that `seq` has filled and computed, so later prompts can reuse them."""
        full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = chain_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            # The first block with given content keeps the name; a duplicate stays anonymous.
            if self.enable_prefix_caching and self.block_hash[b] is None and h not in self.by_hash:
                self.block_hash[b] = h
                self.by_hash[h] = b

    def release(self, seq: Sequence) -> None:
        """Drops `seq`'s references; blocks nobody holds become free (or evictable, if named)."""
        for b in reversed(seq.block_table):  # tail blocks first, so they are evicted first
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} released twice"
            if self.ref_count[b] == 0:
                if self.block_hash[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
        seq.block_table.clear()
        seq.block_hashes.clear()
