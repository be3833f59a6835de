"""The native CPU kernels against their PyTorch references; bf16 on a CPU; the fallback when they cannot run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labkit.engine import Engine, EngineConfig, SamplingParams, kernels

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.unavailable_reason()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 64])
def test_gemm_on_onednn_bytes_equals_linear_with_every_epilogue(rows: int) -> None:
    n, k = 256, 320
    w, b = weight(n, k), torch.randn(n)
    pw = kernels.adopt_onednn(torch.ops.mkldnn._reorder_linear_weight(w, 2048), w)
    if pw is None:
        pytest.skip("oneDNN packs fp32 in another layout on this CPU: the engine keeps oneDNN for every row count")
    assert pw.onednn is not None and not pw.bf16
    x, other = torch.randn(rows, k), torch.randn(rows, n)
    assert rel_err(kernels.gemm(x, pw), F.linear(x, w)) < 1e-5
    assert rel_err(kernels.gemm(x, pw, b, act="silu", mul=other), F.silu(F.linear(x, w, b)) * other) < 1e-5
    assert rel_err(kernels.gemm(x, pw, add=other), F.linear(x, w) + other) < 1e-5
    # A strided row view (the engine passes slices of wider tensors).
    wide = torch.randn(rows, 2 * k)
    assert rel_err(kernels.gemm(wide[:, :k], pw), F.linear(wide[:, :k], w)) < 1e-5


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("n", [64, 100, 200])
@pytest.mark.parametrize("k", [96, 102])  # 102: K/4 odd and K % 4 = 2, the k-rows the few-row kernel leaves
def test_gemm_bf16_equals_linear_within_bf16_rounding(rows: int, n: int, k: int) -> None:
    """bf16 weights and activations, fp32 accumulation: the reference is fp32 math on the same bf16 values."""
    w = weight(n, k, seed=n).bfloat16()
    pw = kernels.pack_bf16(w)
    assert pw.bf16 and pw.onednn is None and pw.data.numel() == -(-n // 64) * 64 * k  # padded, one copy
    x, other, b = torch.randn(rows, k).bfloat16(), torch.randn(rows, n).bfloat16(), torch.randn(n).bfloat16()
    ref = F.silu(F.linear(x.float(), w.float(), b.float())) * other.float()
    got = kernels.gemm(x, pw, b, act="silu", mul=other)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert rel_err(got, ref) < 1e-2          # bf16 has 8 bits of mantissa: ~4e-3 per rounding
    assert rel_err(kernels.gemm(x, pw), F.linear(x.float(), w.float())) < 1e-2


@needs_kernels
def test_adopt_refuses_bytes_it_cannot_read() -> None:
    w = weight(192, 320)  # oneDNN's blocks are not 64 columns wide for this shape here: refused, not misread
    pw = kernels.adopt_onednn(torch.ops.mkldnn._reorder_linear_weight(w, 2048), w)
    assert pw is None or rel_err(kernels.gemm(torch.ones(1, 320), pw), F.linear(torch.ones(1, 320), w)) < 1e-5
    w = weight(128, 64)
    assert kernels.adopt_onednn(w.clone(), w) is None                  # a dense tensor is not oneDNN's
    assert kernels.adopt_onednn(torch.ops.mkldnn._reorder_linear_weight(w, 2048), weight(128, 64, seed=1)) is None


@needs_kernels
def test_gemm_bad_input_names_the_problem() -> None:
    pw = kernels.pack_bf16(weight(64, 32))
    with pytest.raises(ValueError, match=r"\[rows, 32\]"):
        kernels.gemm(torch.randn(2, 31).bfloat16(), pw)
    with pytest.raises(ValueError, match="activation"):
        kernels.gemm(torch.randn(2, 32).bfloat16(), pw, act="gelu")
    with pytest.raises(ValueError, match="mul/add"):
        kernels.gemm(torch.randn(2, 32).bfloat16(), pw, add=torch.randn(3, 64))


def _paged(seqs: int, ctx: list[int], kv_heads: int, dim: int, bs: int, dtype: torch.dtype, seed: int = 0):
    """A shuffled block pool holding each sequence's context, and its block tables."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-c // bs) for c in ctx)
    num_blocks = seqs * width + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = order[:seqs * width].view(seqs, width).clone()
    k = torch.randn(num_blocks * bs, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(num_blocks * bs, kv_heads, dim, generator=g).to(dtype)
    return k, v, tables


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,ctx",
    [
        (8, 2, 64, [1, 17, 45]),  # few sequences: the kernels' pool
        (6, 2, 40, [1, 17, 45, 3, 64, 16, 33, 8, 100]),  # more: OpenMP's team; 3 queries per kv head, dim 5 x 8
        (4, 4, 128, [5, 70, 31, 2, 9]),  # one query per kv head
    ],
)
def test_decode_attention_equals_sdpa_over_gathered_blocks(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, ctx: list[int]
) -> None:
    seqs, bs = len(ctx), 16
    k, v, tables = _paged(seqs, ctx, kv_heads, dim, bs, dtype)
    wide = torch.randn(seqs, heads + kv_heads, dim).to(dtype)   # q is a strided view, as in the engine
    q = wide[:, :heads]
    got = kernels.decode_attention(q, k, v, tables, torch.tensor(ctx), bs)
    for s, n in enumerate(ctx):
        slots = (tables[s, :, None] * bs + torch.arange(bs)).reshape(-1)[:n]
        ks, vs = k[slots].float().transpose(0, 1), v[slots].float().transpose(0, 1)   # [kv_heads, n, dim]
        ref = F.scaled_dot_product_attention(q[s].float()[:, None], ks.repeat_interleave(heads // kv_heads, 0),
                                             vs.repeat_interleave(heads // kv_heads, 0))[:, 0]
        assert rel_err(got[s], ref) < (1e-5 if dtype == torch.float32 else 1e-2), f"sequence {s} (context {n})"


@needs_kernels
def test_decode_attention_refuses_a_context_beyond_its_table() -> None:
    k, v, tables = _paged(1, [16], 1, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="context length"):
        kernels.decode_attention(torch.randn(1, 1, 8), k, v, tables, torch.tensor([17]), 16)


@needs_kernels
def test_stream_read_sums_the_buffer() -> None:
    buf = torch.arange(1 << 20, dtype=torch.float32) % 7
    assert kernels.stream_read(buf) == pytest.approx(float(buf.double().sum()), rel=1e-6)


@needs_kernels
def test_native_and_reference_engines_agree_on_small_and_big_batches() -> None:
    """Batch 1, 4 and 9 decode through the kernels gives the reference path's tokens (9: the matmuls in oneDNN,
    attention still native)."""
    prompts = [[256] + [(29 * i + 7 * s) % 256 for i in range(n)] for s, n in enumerate((5, 16, 33, 60))]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = {}
    for native in (True, False):
        eng = Engine(EngineConfig(model="tiny", native_kernels=native))
        assert eng.model.native == native
        outs[native] = [o.output_token_ids for o in eng.generate(prompts, sp)]
        outs[native, 1] = [o.output_token_ids for o in eng.generate(prompts[:1], sp)]
        outs[native, 9] = [o.output_token_ids for o in eng.generate(prompts + prompts + prompts[:1], sp)]
        assert eng.num_free_blocks == eng.num_total_blocks
    assert outs[True] == outs[False] and outs[True, 1] == outs[False, 1] and outs[True, 9] == outs[False, 9]


def _step_logits(eng: Engine, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prefill step and of the first decode step (one row per prompt), and the first tokens."""
    seen: list[torch.Tensor] = []
    real = eng.model.logits
    eng.model.logits = lambda h: seen.append(real(h)) or seen[-1]  # type: ignore[method-assign]
    outs = eng.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    eng.model.logits = real  # type: ignore[method-assign]
    assert [t.shape[0] for t in seen] == [len(prompts), len(prompts)]  # one prefill step, then one decode step
    return [t.float() for t in seen], [o.output_token_ids[0] for o in outs]


@needs_kernels
@pytest.mark.parametrize("model", ["tiny", "tiny-qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_call_decode_step_equals_the_per_op_path_bit_for_bit(model: str, dtype: str, monkeypatch) -> None:
    """A small decode step runs every layer in one native call (lk_decode_layers): the same kernels in the same
    order as the per-op loop, so batch 1-4 decode logits are equal, not just close (qwen2: with the qkv bias)."""
    calls: list[int] = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    for rows in (1, 2, 4):
        prompts = [[256] + [(13 * i + 5 * s) % 256 for i in range(n)] for s, n in enumerate((7, 20, 33, 48)[:rows])]
        fused = Engine(EngineConfig(model=model, dtype=dtype, kv_cache_bytes=8 << 20))
        loop = Engine(EngineConfig(model=model, dtype=dtype, kv_cache_bytes=8 << 20))
        assert fused.model.decode_table is not None
        loop.model.decode_table = None
        (pre_f, dec_f), first_f = _step_logits(fused, prompts)
        (pre_l, dec_l), first_l = _step_logits(loop, prompts)
        assert torch.equal(pre_f, pre_l) and first_f == first_l  # prefill takes the loop in both
        assert torch.equal(dec_f, dec_l), f"{rows} rows: max diff {float((dec_f - dec_l).abs().max())}"
        assert fused.num_free_blocks == fused.num_total_blocks
    assert calls == [1, 2, 4]  # one call per decode step, from the fused engines only


@needs_kernels
def test_one_call_decode_refuses_what_it_cannot_run() -> None:
    eng = Engine(EngineConfig(model="tiny", kv_cache_bytes=8 << 20))
    table, cache = eng.model.decode_table, eng.cache
    assert table is not None
    one = torch.zeros(1, dtype=torch.int64)
    args = (eng.model.cos, eng.model.sin, one, cache.k, cache.v, one, one[None], one + 1, cache.block_size)
    with pytest.raises(ValueError, match=r"x \[1..4, \d+\]"):
        kernels.decode_layers(torch.zeros(5, table.hidden), table, *args)
    with pytest.raises(ValueError, match="activation dtype"):
        kernels.decode_layers(torch.zeros(1, table.hidden), table, eng.model.cos, eng.model.sin, one,
                              cache.k.bfloat16(), cache.v.bfloat16(), one, one[None], one + 1, cache.block_size)
    with pytest.raises(RuntimeError, match="context length outside its block table"):
        kernels.decode_layers(torch.zeros(1, table.hidden), table, eng.model.cos, eng.model.sin, one, cache.k,
                              cache.v, one, one[None], one + cache.block_size + 1, cache.block_size)


@needs_kernels
def test_bf16_on_cpu_equals_fp32_within_bf16_tolerance() -> None:
    """bf16 is a CPU dtype of the engine: first-step logits equal fp32's within bf16 rounding, and so does
    the first decode step (native kernels) over the same tokens.

    Greedy tokens are not compared: with random weights a near tie flips under bf16 rounding, and
    the runs part ways (the GPU bf16 test says the same).
    """
    prompts = [[256] + [(31 * i + s) % 256 for i in range(n)] for s, n in enumerate((9, 40))]
    bf = Engine(EngineConfig(model="small", dtype="bfloat16", kv_cache_bytes=32 << 20))
    fp = Engine(EngineConfig(model="small", dtype="float32", kv_cache_bytes=32 << 20))
    assert bf.model.native and bf.model.layers[0].qkv.bf16  # type: ignore[union-attr]
    (pre_bf, dec_bf), first = _step_logits(bf, prompts)
    (pre_fp, _), _ = _step_logits(fp, prompts)
    assert 0 < rel_err(pre_bf, pre_fp) < 0.05   # really computed in bf16, and close
    for i, p in enumerate(prompts):  # the decode step's input is bf16's own first token: fp32 over the same tokens
        ref = fp.prompt_logits(p + [first[i]])[-1]
        assert rel_err(dec_bf[i], ref) < 0.05, f"prompt {i}"
    assert bf.num_free_blocks == bf.num_total_blocks


def test_without_kernels_the_engine_says_why_once_and_matches(monkeypatch) -> None:
    """LABKIT_NATIVE=0 stands for a machine where the kernels cannot build: one warning line, same tokens."""
    monkeypatch.setenv("LABKIT_NATIVE", "0")
    kernels._lib.cache_clear()
    try:
        assert not kernels.available() and kernels.unavailable_reason() == "LABKIT_NATIVE=0"
        with pytest.warns(RuntimeWarning, match=r"native CPU kernels not used \(LABKIT_NATIVE=0\)"):
            eng = Engine(EngineConfig(model="tiny"))
        assert not eng.model.native
        out = eng.generate([[256, 72, 105]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
        assert len(out.output_token_ids) == 6
    finally:
        monkeypatch.delenv("LABKIT_NATIVE")
        kernels._lib.cache_clear()
    ref = Engine(EngineConfig(model="tiny", native_kernels=False))
    assert ref.generate([[256, 72, 105]], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_token_ids \
        == out.output_token_ids
