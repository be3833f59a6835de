"""What the simulator serves with: a layout of instances and each instance's scheduler limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["prefill_first", "chunked"]
Dispatch = Literal["least-loaded", "round-robin"]


@dataclass(frozen=True, slots=True)
class Layout:
    """How devices serve: `mono` (replicas doing both phases) or `disagg` (P prefill + D decode;
    with `prefill_threshold` > 0, prompts with fewer uncached tokens are prefilled on the decode side).
    `dispatch`: how the router spreads requests over mono replicas: to the one with the fewest in
    flight (the lab's router, by load) or in turn."""

    kind: Literal["mono", "disagg"]
    num_replicas: int = 1
    num_prefill: int = 0
    num_decode: int = 0
    policy: Policy = "prefill_first"
    prefill_threshold: int = 0  # tokens; selective disaggregation when > 0
    dispatch: Dispatch = "least-loaded"

    def __post_init__(self) -> None:
        if self.kind == "mono":
            if self.num_replicas < 1:
                raise ValueError(f"mono layout needs num_replicas >= 1, got {self.num_replicas}")
            if self.prefill_threshold:
                raise ValueError("prefill_threshold is for disaggregated layouts (a mono engine prefills everything)")
        elif self.kind == "disagg":
            if self.num_prefill < 1 or self.num_decode < 1:
                raise ValueError(
                    f"disagg layout needs num_prefill >= 1 and num_decode >= 1, "
                    f"got {self.num_prefill}P{self.num_decode}D"
                )
            if self.prefill_threshold < 0:
                raise ValueError(f"prefill_threshold must be >= 0 tokens, got {self.prefill_threshold}")
        else:
            raise ValueError(f"layout kind {self.kind!r} is not 'mono' or 'disagg'")
        if self.policy not in ("prefill_first", "chunked"):
            raise ValueError(f"policy {self.policy!r} is not 'prefill_first' or 'chunked'")
        if self.dispatch not in ("least-loaded", "round-robin"):
            raise ValueError(f"dispatch {self.dispatch!r} is not 'least-loaded' or 'round-robin'")

    @classmethod
    def mono(
        cls, num_replicas: int = 1, policy: Policy = "prefill_first", dispatch: Dispatch = "least-loaded"
    ) -> Layout:
        """One engine doing both phases; with num_replicas > 1, that many behind one router (mono-dp)."""
        return cls("mono", num_replicas=num_replicas, policy=policy, dispatch=dispatch)

    @classmethod
    def mono_dp(
        cls, num_replicas: int, policy: Policy = "prefill_first", dispatch: Dispatch = "least-loaded"
    ) -> Layout:
        """Data parallel: `num_replicas` one-device engines behind one router (each request to the least
        loaded replica, as the lab's router sends it; or round-robin)."""
        return cls.mono(num_replicas, policy, dispatch)

    @classmethod
    def disagg(cls, num_prefill: int, num_decode: int, prefill_threshold: int = 0) -> Layout:
        """xPyD; prefill_threshold > 0: selective (shorter uncached suffixes prefill on the decode side)."""
        return cls("disagg", num_prefill=num_prefill, num_decode=num_decode, prefill_threshold=prefill_threshold)

    @property
    def num_devices(self) -> int:
        return self.num_replicas if self.kind == "mono" else self.num_prefill + self.num_decode

    @property
    def label(self) -> str:
        if self.kind == "disagg":
            base = f"{self.num_prefill}P{self.num_decode}D"
            return f"{base} sel<{self.prefill_threshold}" if self.prefill_threshold else base
        name = "mono" if self.policy == "prefill_first" else "mono-chunked"
        rr = " round-robin" if self.dispatch == "round-robin" else ""
        return name if self.num_replicas == 1 else f"{name}-dp x{self.num_replicas}{rr}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-instance scheduler limits (as in vLLM / the lab's engine)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(f"Limits need max_num_seqs >= 1 and max_num_batched_tokens >= 1, got {self}")
