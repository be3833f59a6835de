"""The router's view of which instance caches which prompt prefix: a block-hash chain index.

Like NVIDIA Dynamo's KV router and llm-d's prefix-cache scorer, the router does not ask the
workers what they cache. It hashes each prompt in blocks of `block_size` tokens, each hash
chained to the one before (so a block's hash names the whole prefix up to it), and records
that the instance it picked now holds those blocks. The next prompt sharing a prefix goes to
the instance that matches the most leading blocks. Each instance's record is LRU-bounded
to roughly its KV capacity, since the real cache evicts too. Block size and capacity come
from the workers' /health, so the chains match the blocks the engines really hash.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is not cached)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out: list[bytes] = []
    parent = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        h = hashlib.blake2b(parent + b"|" + ",".join(map(str, block)).encode(), digest_size=16).digest()
        out.append(h)
        parent = h
    return out


class PrefixIndex:
    """Block hash -> instances holding it, with an LRU of hashes per instance."""

    def __init__(self, capacity_blocks: int = 65536) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.default_capacity_blocks = capacity_blocks
        self._owners: dict[bytes, set[str]] = {}
        self._lru: dict[str, OrderedDict[bytes, None]] = {}
        self._capacity: dict[str, int] = {}

    def set_capacity(self, instance: str, capacity_blocks: int) -> None:
        """Bounds what is remembered for `instance` (its KV pool size, in blocks)."""
        self._capacity[instance] = max(1, int(capacity_blocks))
        self._evict(instance)

    def match(self, hashes: Sequence[bytes], instances: Iterable[str]) -> dict[str, int]:
        """Leading blocks of `hashes` each instance holds (0 when none)."""
        result: dict[str, int] = {}
        for inst in instances:
            lru = self._lru.get(inst)
            n = 0
            if lru:
                for h in hashes:
                    if h not in lru:
                        break
                    n += 1
            result[inst] = n
        return result

    def insert(self, instance: str, hashes: Sequence[bytes]) -> None:
        """Records that `instance` now caches these blocks (most recent last)."""
        lru = self._lru.setdefault(instance, OrderedDict())
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._owners.setdefault(h, set()).add(instance)
        self._evict(instance)

    def remove_instance(self, instance: str) -> None:
        """Forgets everything `instance` held (it restarted or went down: its cache is gone)."""
        for h in self._lru.pop(instance, {}):
            owners = self._owners.get(h)
            if owners is not None:
                owners.discard(instance)
                if not owners:
                    del self._owners[h]

    def num_blocks(self, instance: str) -> int:
        return len(self._lru.get(instance, ()))

    def _evict(self, instance: str) -> None:
        lru = self._lru.get(instance)
        if lru is None:
            return
        cap = self._capacity.get(instance, self.default_capacity_blocks)
        while len(lru) > cap:
            h, _ = lru.popitem(last=False)
            owners = self._owners.get(h)
            if owners is not None:
                owners.discard(instance)
                if not owners:
                    del self._owners[h]


class ActiveBlocks:
    """KV blocks of the requests the router has open on each instance (Dynamo's "active blocks").

    A block that two open requests share (the same chained hash: a shared prefix) counts once, as
    the engine holds it once; a request's partial last block counts for that request alone.
    """

    def __init__(self) -> None:
        self._refs: dict[str, Counter[bytes]] = {}
        self._partial: Counter[str] = Counter()

    def add(self, instance: str, hashes: Sequence[bytes], partial: bool) -> None:
        """A request with these full blocks (and a partial last one when `partial`) is open on `instance`."""
        self._refs.setdefault(instance, Counter()).update(hashes)
        self._partial[instance] += int(partial)

    def remove(self, instance: str, hashes: Sequence[bytes], partial: bool) -> None:
        """That request ended (or failed) on `instance`."""
        refs = self._refs.get(instance)
        if refs is not None:
            refs.subtract(hashes)
            for h in [h for h in hashes if refs[h] <= 0]:
                del refs[h]
        self._partial[instance] = max(0, self._partial[instance] - int(partial))

    def count(self, instance: str) -> int:
        """Distinct blocks of the requests open on `instance`."""
        return len(self._refs.get(instance, ())) + self._partial[instance]
