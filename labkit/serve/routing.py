"""Which prefill worker gets a request: the choice as a named, pure function, and how to name one.

A policy is any callable with this signature (a plain function, or an object with `__call__`
when it keeps state, as round-robin would):

    def choose_prefill(block_hashes: Sequence[bytes],
                       candidates: Sequence[PrefillCandidate]) -> PrefillCandidate: ...

`block_hashes`: the prompt's chained block hashes (labkit.serve.prefix_index.block_hashes: the
i-th names the whole prefix up to the end of block i; a partial last block has none).
`candidates`: the prefill workers that are up (never empty), each with its `name`, the leading
blocks of the prompt it is believed to cache (`matched_blocks`), its load (`in_flight`: requests
open or running on it) and its free and total KV blocks. Return one of the candidates, unchanged.
The same policy picks among mono workers in a monolithic deployment.

The router takes a policy by spec (`--prefill-policy`, `start_router(prefill_policy=...)`):
a registered name (`POLICIES`; the default `prefix-then-load` is today's rule), or
`package.module:function`, or `path/to/file.py:function` (a learner's cell written to a file).
`load_policy` checks the spec when the router starts and names what is wrong.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class PrefillCandidate:
    """One prefill worker as a policy sees it."""

    name: str
    matched_blocks: int     # leading blocks of the prompt it caches (the router's prefix index)
    in_flight: int          # requests open or running on it
    free_kv_blocks: int
    total_kv_blocks: int


PrefillPolicy = Callable[[Sequence[bytes], Sequence[PrefillCandidate]], PrefillCandidate]


def prefix_then_load(block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
    """The longest cached prefix wins (its prefill is shortest); ties go to the least loaded, then to the
    one with the most free KV blocks, then to the first listed."""
    return min(candidates, key=lambda c: (-c.matched_blocks, c.in_flight, -c.free_kv_blocks))


# Registered policies by name: "module:function" specs, imported when named.
POLICIES: dict[str, str] = {"prefix-then-load": "labkit.serve.routing:prefix_then_load"}
DEFAULT_POLICY = "prefix-then-load"


def load_spec(spec: str, registry: dict[str, str], what: str) -> Any:
    """The object `spec` names: a key of `registry`, `package.module:attr` or `path/to/file.py:attr`.

    Raises ValueError saying what is wrong (unknown name, missing file or module, no such attribute).
    """
    target = registry.get(spec, spec)
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{what} {spec!r}: not a registered name ({', '.join(registry)}), nor 'module:function' "
                         "nor 'path/to/file.py:function'")
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{what} {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"labkit_user_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"{what} {spec!r}: {path.name} failed to load: {e.__class__.__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"{what} {spec!r}: cannot import {mod_name} ({e})") from None
    if not hasattr(module, attr):
        raise ValueError(f"{what} {spec!r}: {mod_name} has no {attr!r}")
    return getattr(module, attr)


def load_policy(spec: str = DEFAULT_POLICY) -> PrefillPolicy:
    """The policy `spec` names, checked to be a callable of two arguments; ValueError otherwise."""
    fn = load_spec(spec, POLICIES, "prefill policy")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ValueError(f"prefill policy {spec!r} must be a callable taking (block_hashes, candidates); "
                         f"got {fn!r}") from None
    except ValueError:   # no signature to inspect (a builtin): trust it, the first request will tell
        pass
    return fn  # type: ignore[no-any-return]  # load_spec returns what the module holds


def choose(policy: PrefillPolicy, block_hashes: Sequence[bytes],
           candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
    """`policy`'s choice, checked to be one of `candidates` (TypeError naming the policy otherwise)."""
    chosen = policy(block_hashes, candidates)
    if not any(chosen is c or chosen == c for c in candidates):
        name = getattr(policy, "__name__", type(policy).__name__)
        raise TypeError(f"prefill policy {name} returned {chosen!r}, not one of the candidates it was given")
    return chosen
