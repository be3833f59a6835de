"""Deterministic KV exports for tests and benchmarks: same seed, same bytes, in any process."""

from __future__ import annotations

import torch

from labkit.kv import KVExport


def make_kv(
    request_id: str,
    num_tokens: int,
    *,
    num_layers: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    dtype: str = "bfloat16",
    block_size: int = 16,
    seed: int = 0,
    model_fingerprint: str = "synthetic",
) -> KVExport:
    """A KVExport with seeded random K and V; returns it (bit-identical for the same arguments)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    g = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_tokens, num_kv_heads, head_dim)
    dt = getattr(torch, dtype)
    k = torch.randn(shape, generator=g, dtype=torch.float32).to(dt)
    v = torch.randn(shape, generator=g, dtype=torch.float32).to(dt)
    prompt = torch.randint(0, 256, (num_tokens,), generator=g).tolist()
    return KVExport(
        request_id=request_id,
        model_fingerprint=model_fingerprint,
        prompt_ids=prompt,
        first_token_id=int(prompt[-1]),
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        block_size=block_size,
        k=k,
        v=v,
        extra={"seed": seed},
    )


def make_kv_fast(
    request_id: str,
    nbytes: int,
    *,
    num_layers: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> KVExport:
    """A KVExport of about `nbytes` (whole tokens, at least one) filled with a cheap byte pattern, for benchmarks.

    The values are arbitrary bit patterns (some may be NaN): compare them as bytes, not as floats.
    """
    dt = getattr(torch, dtype)
    per_token = 2 * num_layers * num_kv_heads * head_dim * dt.itemsize
    num_tokens = max(1, nbytes // per_token)
    shape = (num_layers, num_tokens, num_kv_heads, head_dim)
    half = per_token * num_tokens // 2
    pattern = torch.arange(seed, seed + 2 * half, dtype=torch.int32).remainder_(251).to(torch.uint8)
    k = pattern[:half].view(dt).view(shape)
    v = pattern[half:].view(dt).view(shape)
    return KVExport(
        request_id=request_id,
        model_fingerprint="synthetic",
        prompt_ids=[7] * num_tokens,
        first_token_id=7,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        block_size=16,
        k=k,
        v=v,
    )


def kv_digest(kv: KVExport) -> str:
    """sha256 hex of K bytes then V bytes: compares exports bit for bit across processes."""
    import hashlib

    h = hashlib.sha256()
    for t in (kv.k, kv.v):
        h.update(memoryview(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()
