"""Filling N devices with disaggregated serving units: which units, how many, and what is left idle.

Pure arithmetic over units whose sustainable rates are known (`labkit.plan.search` simulates
them). A deployment serves the sum of its units' rates: a router in front splits the load in
proportion to what each unit sustains. Idle devices serve nothing but count in the budget, so
goodput per device is the deployment's goodput over all N devices.

A disaggregated deployment fills the devices with xPyD units (copies of one, plus remainder
units of other splits); a device no xPyD unit can use (one left over in a node) may run a mono
replica, or stay idle. (The monolithic answer, N mono replicas, needs no packing.)

Nodes hold `devices_per_node` devices. A unit that fits a node is placed inside one (its KV
moves over the node's own link); a unit larger than a node spans nodes and moves its KV over the
network between them. Units of one node never straddle two: the N devices are cut into nodes
(the last one may be partial), units larger than a node take devices from the first nodes on,
and the rest of each node is packed on its own (an unbounded knapsack per node size).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

NEG = -math.inf


@dataclass(frozen=True, slots=True)
class Item:
    """A unit the packer may use any number of times: its devices, its rate, whether it is xPyD."""

    key: Hashable
    devices: int
    rate: float
    disagg: bool

    def __post_init__(self) -> None:
        if self.devices < 1 or not self.rate >= 0:
            raise ValueError(f"Item needs devices >= 1 and rate >= 0, got {self}")


@dataclass(frozen=True, slots=True)
class Packing:
    """Units (key -> copies) filling a budget of `devices`; `rate` is what they serve together."""

    counts: tuple[tuple[Hashable, int], ...]
    devices: int
    devices_used: int
    rate: float
    placement: tuple[tuple[int, Hashable], ...] = ()  # (first device, unit) of every copy

    @property
    def idle_devices(self) -> int:
        return self.devices - self.devices_used


def node_sizes(devices: int, devices_per_node: int) -> list[int]:
    """The nodes N devices make: full nodes, then a partial one if N is not a multiple."""
    if devices < 0 or devices_per_node < 1:
        raise ValueError(f"need devices >= 0 and devices_per_node >= 1, got {devices}, {devices_per_node}")
    full, rest = divmod(devices, devices_per_node)
    return [devices_per_node] * full + ([rest] if rest else [])


class _NodeTable:
    """Best packings of one node of c devices (c = 0..devices_per_node) with xPyD units and at most
    one mono replica (an odd device no xPyD unit can use), idle devices allowed: without any xPyD
    unit (state 0) and with at least one (state 1)."""

    def __init__(self, disagg: Sequence[Item], mono: Item | None, size: int) -> None:
        self.items, self.mono = list(disagg), mono
        # y[c]: at least one xPyD unit on c devices (the rest idle); choice: item index, or -1 = a device idle
        y, self.choice = [NEG] * (size + 1), [-1] * (size + 1)
        for c in range(1, size + 1):
            best, pick = y[c - 1], -1
            for i, it in enumerate(self.items):
                if it.devices <= c:
                    v = max(0.0, y[c - it.devices]) + it.rate
                    if v > best + 1e-12 or (best == NEG and v >= 0):
                        best, pick = v, i
            y[c], self.choice[c] = best, pick
        self.y = y
        m = mono.rate if mono is not None else NEG
        self.value = [[0.0] * (size + 1), [NEG] * (size + 1)]  # [state][c]
        self.use_mono = [[False] * (size + 1), [False] * (size + 1)]
        for c in range(1, size + 1):
            if m > 0:
                self.value[0][c], self.use_mono[0][c] = m, True
            with_mono = y[c - 1] + m if y[c - 1] > NEG and m > NEG else NEG
            self.value[1][c], self.use_mono[1][c] = (with_mono, True) if with_mono > y[c] + 1e-12 else (y[c], False)

    def units(self, c: int, state: int) -> Counter[Hashable]:
        """The units of the best packing of c devices in `state`."""
        out: Counter[Hashable] = Counter()
        if self.use_mono[state][c]:
            assert self.mono is not None
            out[self.mono.key] += 1
            c -= 1
        if state == 0:
            return out
        while c > 0 and self.y[c] > NEG:
            i = self.choice[c]
            if i < 0:
                c -= 1
                continue
            out[self.items[i].key] += 1
            c -= self.items[i].devices
            if not self.y[c] > 0:  # the rest of the node idles
                break
        return out


def _free_starts(devices: int, devices_per_node: int, taken: int) -> list[int]:
    """First free device of each node that still has room once the first `taken` devices are used."""
    starts, node_start = [], 0
    for size in node_sizes(devices, devices_per_node):
        if node_start + size > taken:
            starts.append(max(node_start, taken))
        node_start += size
    return starts


def _exact_fill(items: Sequence[Item], top: int) -> tuple[list[float], list[int]]:
    """Best rate of multi-node units filling exactly m devices (m = 0..top; -inf where impossible)."""
    value, choice = [0.0] + [NEG] * top, [-1] * (top + 1)
    for m in range(1, top + 1):
        for i, it in enumerate(items):
            if it.devices <= m and value[m - it.devices] > NEG:
                v = value[m - it.devices] + it.rate
                if v > value[m] + 1e-12:
                    value[m], choice[m] = v, i
    return value, choice


def best_packings(
    items: Sequence[Item],
    budgets: Sequence[int],
    devices_per_node: int = 8,
) -> dict[int, Packing | None]:
    """For each budget N: the best disaggregated packing of N devices (xPyD units, at most one
    mono replica per node on a device no xPyD unit can use, the rest idle), or None when no xPyD
    unit fits. Monolithic items are the replicas' candidates (the fastest one is used)."""
    if devices_per_node < 1:
        raise ValueError(f"devices_per_node must be >= 1, got {devices_per_node}")
    monos = [it for it in items if not it.disagg]
    mono = max(monos, key=lambda it: it.rate) if monos else None
    if mono is not None and mono.devices != 1:
        raise ValueError(f"a monolithic replica takes one device, {mono.key} takes {mono.devices}")
    inside = [it for it in items if it.disagg and it.devices <= devices_per_node]
    spanning = [it for it in items if it.disagg and it.devices > devices_per_node]
    table = _NodeTable(inside, mono, devices_per_node)
    top = max(budgets, default=0)
    multi, multi_choice = _exact_fill(spanning, top)
    every = {it.key: it for it in items}
    out: dict[int, Packing | None] = {}
    for n in budgets:
        if n < 1:
            raise ValueError(f"a budget must be >= 1 device, got {n}")
        best: tuple[float, int, list[int], list[int]] | None = None  # (rate, m, node caps, node states)
        for m in range(n + 1):
            if multi[m] == NEG:
                continue
            caps, left = [], m
            for size in node_sizes(n, devices_per_node):
                used = min(size, left)
                left -= used
                if size - used:
                    caps.append(size - used)
            states = [1 if table.value[1][c] > table.value[0][c] else 0 for c in caps]
            rate = multi[m] + sum(table.value[st][c] for st, c in zip(states, caps))
            if m == 0 and not any(states):  # some node must hold an xPyD unit: the cheapest one to switch
                costs = [table.value[0][c] - table.value[1][c] for c in caps]
                if not caps or min(costs) == math.inf:
                    continue
                j = min(range(len(caps)), key=lambda k: costs[k])
                states[j] = 1
                rate -= costs[j]
            if best is None or rate > best[0] + 1e-12:
                best = (rate, m, caps, states)
        if best is None:
            out[n] = None
            continue
        rate, m, caps, states = best
        counts: Counter[Hashable] = Counter()
        placement: list[tuple[int, Hashable]] = []
        slot = 0
        while m > 0:
            i = multi_choice[m]
            counts[spanning[i].key] += 1
            placement.append((slot, spanning[i].key))
            slot += spanning[i].devices
            m -= spanning[i].devices
        for c, st, start in zip(caps, states, _free_starts(n, devices_per_node, slot)):
            here = table.units(c, st)
            counts.update(here)
            for key in sorted(here, key=lambda k: -every[k].devices):
                for _ in range(here[key]):
                    placement.append((start, key))
                    start += every[key].devices
        used = sum(every[key].devices * cnt for key, cnt in counts.items())
        order = sorted(counts.items(), key=lambda kv: (-every[kv[0]].devices * kv[1], str(kv[0])))
        out[n] = Packing(tuple(order), n, used, rate, tuple(placement))
    return out
