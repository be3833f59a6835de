// The engine's CPU kernels (AVX2 + FMA), loaded through ctypes by labkit/engine/kernels.py.
//
// Why they exist: a batch-1 decode step is all matrix-vector products, and PyTorch's CPU paths
// read the weights well below the memory bandwidth at M <= 4 (MKL's small-M sgemm, oneDNN's
// kernels tuned for many rows). These kernels stream each weight once, at the bandwidth roof,
// straight from the layout oneDNN packs for prefill ([N/64][K][64] fp32), so one copy of the
// weights serves both paths. bf16 weights use the same blocking, two bytes per weight.
//
//   lk_gemm              y = epilogue(x @ W^T): any M, packed W (fp32, or bf16 pairs), fp32 accumulation
//   lk_decode_attention  one-token queries over a paged KV cache: one pass over K and V, no gather copy
//   lk_rms_norm, lk_rope_write  the small per-layer ops of decode, one call each
//   lk_decode_layers     every layer of a small decode step in one call (the calls above, in order)
//   lk_stream_read       sum of a buffer: the read-bandwidth roof, measured the way lk_gemm reads
//   lk_pin_threads       starts the pool's workers (pool.h), each pinned to one CPU
//
// Threads: small decode-time work (up to 4 rows or sequences, and the roof) runs on the pool of pool.h,
// whose caller waits for the work rather than for every thread; bigger work (prefill, the attention of
// a big decode batch) uses OpenMP (torch's team), like the matmuls beside it.
//
// Layouts. Packed weight: block j holds output columns [64j, 64j+64) for every k, row k of the
// block at offset (j*K + k)*64 elements. fp32: column c of the block at c. bf16: in each group
// of 16 columns the pair (c, c+8) shares a 32-bit word (c in the low half), so one 256-bit load
// gives columns c..c+7 by a shift and c+8..c+15 by a mask. Activations are row-major fp32 or bf16.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "pool.h"

namespace {

constexpr int kBlock = 64;  // output columns per packed block (oneDNN's choice for fp32 on AVX2)
constexpr int64_t kSmallM = 4;  // rows (sequences) up to which calls run on the pool: kernels.SMALL_M

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// 8 consecutive values (fp32 or bf16) as fp32.
inline __m256 load8(const void* p, bool bf16) {
  if (!bf16) return _mm256_loadu_ps(static_cast<const float*>(p));
  __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void store8(void* p, __m256 v, bool bf16) {
  if (!bf16) {
    _mm256_storeu_ps(static_cast<float*>(p), v);
    return;
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  uint16_t* o = static_cast<uint16_t*>(p);
  for (int i = 0; i < 8; ++i) o[i] = f32_to_bf16(t[i]);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats (Cephes polynomial, relative error ~1e-7): the SiLU epilogue.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// --- the matmul ------------------------------------------------------------------------------

struct Epilogue {
  const void* bias;    // [N] or null
  const void* other;   // [M, ldo] or null: multiplied (op 1) or added (op 2) after the activation
  int64_t ldo;
  int op;
  int act;             // 0 none, 1 SiLU
  bool bf16;           // bias, other and y are bf16 (else fp32)
};

// acc rows -> y[m, n0:n0+8*W] for the columns below N.
template <int MR, int W>
inline void finish(__m256 (&acc)[MR][W], int64_t m0, int64_t n0, int64_t N, void* y, int64_t ldy,
                   const Epilogue& e) {
  const int esz = e.bf16 ? 2 : 4;
  for (int i = 0; i < MR; ++i) {
    for (int w = 0; w < W; ++w) {
      const int64_t n = n0 + 8 * w;
      if (n >= N) break;
      __m256 v = acc[i][w];
      const bool full = n + 8 <= N;
      alignas(32) float tmp[8];
      if (!full) {  // a partial vector at the end of N: go through a scratch row
        _mm256_store_ps(tmp, v);
      }
      auto ld = [&](const void* base, int64_t off) -> __m256 {
        if (full) return load8(static_cast<const char*>(base) + off * esz, e.bf16);
        alignas(32) float t[8] = {0};
        for (int64_t c = 0; c < N - n; ++c)
          t[c] = e.bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[off + c])
                        : static_cast<const float*>(base)[off + c];
        return _mm256_load_ps(t);
      };
      if (!full) v = _mm256_load_ps(tmp);
      if (e.bias) v = _mm256_add_ps(v, ld(e.bias, n));
      if (e.act == 1) v = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
      if (e.op) {
        __m256 o = ld(e.other, (m0 + i) * e.ldo + n);
        v = e.op == 1 ? _mm256_mul_ps(v, o) : _mm256_add_ps(v, o);
      }
      char* dst = static_cast<char*>(y) + ((m0 + i) * ldy + n) * esz;
      if (full) {
        store8(dst, v, e.bf16);
      } else {
        _mm256_store_ps(tmp, v);
        for (int64_t c = 0; c < N - n; ++c) {
          if (e.bf16) reinterpret_cast<uint16_t*>(dst)[c] = f32_to_bf16(tmp[c]);
          else reinterpret_cast<float*>(dst)[c] = tmp[c];
        }
      }
    }
  }
}

// MR rows of A (fp32, row stride lda) times W*8 columns of one packed block, starting at column c0.
template <int MR, int W, bool WBF16>
inline void micro(const float* A, int64_t lda, const void* blk, int64_t K, int c0, __m256 (&acc)[MR][W]) {
  static_assert(!WBF16 || W % 2 == 0, "bf16 columns come in groups of 16");
  // Local accumulators, copied out at the end: through the reference, the compiler would store
  // them on every k (it cannot prove the output does not alias the weights).
  __m256 c[MR][W];
  for (int i = 0; i < MR; ++i)
    for (int w = 0; w < W; ++w) c[i][w] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[W];
    if (WBF16) {
      const uint16_t* row = static_cast<const uint16_t*>(blk) + k * kBlock + c0;
      if (W == 8) _mm_prefetch(reinterpret_cast<const char*>(row + 8 * kBlock), _MM_HINT_T0);
      for (int w = 0; w < W; w += 2) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * w));
        b[w] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        b[w + 1] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
      }
    } else {
      const float* row = static_cast<const float*>(blk) + k * kBlock + c0;
      if (W == 8) _mm_prefetch(reinterpret_cast<const char*>(row + 8 * kBlock), _MM_HINT_T0);
      for (int w = 0; w < W; ++w) b[w] = _mm256_loadu_ps(row + 8 * w);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      for (int w = 0; w < W; ++w) c[i][w] = _mm256_fmadd_ps(a, b[w], c[i][w]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int w = 0; w < W; ++w) acc[i][w] = c[i][w];
}

// All columns of block j for rows m0..m0+MR: W*8 columns at a time (W chosen so MR*W accumulators fit).
template <int MR, int W, bool WBF16>
void rows_of_block(const float* A, int64_t lda, int64_t m0, const char* w, int64_t j, int64_t K, int64_t N,
                   void* y, int64_t ldy, const Epilogue& e) {
  const void* blk = w + j * K * kBlock * (WBF16 ? 2 : 4);
  for (int c0 = 0; c0 < kBlock; c0 += 8 * W) {
    if (j * kBlock + c0 >= N) break;
    __m256 acc[MR][W];
    micro<MR, W, WBF16>(A + m0 * lda, lda, blk, K, c0, acc);
    finish<MR, W>(acc, m0, j * kBlock + c0, N, y, ldy, e);
  }
}

template <bool WBF16>
void rows(int mr, const float* A, int64_t lda, int64_t m0, const char* w, int64_t j, int64_t K, int64_t N,
          void* y, int64_t ldy, const Epilogue& e) {
  // Register budget (16 ymm): MR*W accumulators + W weight vectors + one broadcast.
  switch (mr) {
    case 1: rows_of_block<1, 8, WBF16>(A, lda, m0, w, j, K, N, y, ldy, e); break;
    case 2: rows_of_block<2, 4, WBF16>(A, lda, m0, w, j, K, N, y, ldy, e); break;
    case 3: rows_of_block<3, 2, WBF16>(A, lda, m0, w, j, K, N, y, ldy, e); break;
    case 4: rows_of_block<4, 2, WBF16>(A, lda, m0, w, j, K, N, y, ldy, e); break;
    case 5: rows_of_block<5, 2, WBF16>(A, lda, m0, w, j, K, N, y, ldy, e); break;
    default: rows_of_block<6, 2, WBF16>(A, lda, m0, w, j, K, N, y, ldy, e); break;
  }
}

// --- few rows (M <= 4): each weight byte read once, from several places at a time -----------------
//
// Measured on an AMD EPYC VM: one sequential read stream per core leaves DRAM bandwidth unused (its
// prefetcher keeps few lines in flight); reading a block from 4 places at once (the K range cut in
// 4 sub-streams, interleaved row by row) reads 20-30% faster. One row keeps its sums in registers;
// for 2-4 rows they live in L1 (they would not fit the 16 ymm registers), and all rows go in one
// pass over two k-rows at a time, so each block is read once and each sum is loaded and stored once
// per two k-rows. Paired against rows in pairs over an L2-sized tile (the previous kernel, same
// results to the bit) on `small`'s matrices: 1.05-1.14x at 3-4 rows in fp32, 1.10-1.42x in bf16.
constexpr int kStreams = 4;

// One 64-column row of the block as 8 vectors of fp32.
template <bool WBF16>
inline void load_row(const void* blk, int64_t k, __m256 (&b)[8]) {
  if (WBF16) {
    const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const uint16_t* row = static_cast<const uint16_t*>(blk) + k * kBlock;
    for (int q = 0; q < 8; q += 2) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * q));
      b[q] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      b[q + 1] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
    }
  } else {
    const float* row = static_cast<const float*>(blk) + k * kBlock;
    for (int q = 0; q < 8; ++q) b[q] = _mm256_loadu_ps(row + 8 * q);
  }
}

// One row (batch-1 decode): the sub-streams are k ranges of the same 64 outputs, so they share one set
// of 8 accumulators, all in registers.
template <bool WBF16>
void one_row_block(const float* A, const char* w, int64_t j, int64_t K, int64_t N, void* y, int64_t ldy,
                   const Epilogue& e) {
  const void* blk = w + j * K * kBlock * (WBF16 ? 2 : 4);
  const int64_t per = K / kStreams;
  __m256 c[8], b[8];  // locals, so they stay in registers (through an array reference they were stored every row)
  for (auto& v : c) v = _mm256_setzero_ps();
  for (int64_t k = 0; k < per; ++k) {
    for (int s = 0; s < kStreams; ++s) {
      load_row<WBF16>(blk, s * per + k, b);
      const __m256 a = _mm256_broadcast_ss(A + s * per + k);
      for (int q = 0; q < 8; ++q) c[q] = _mm256_fmadd_ps(a, b[q], c[q]);
    }
  }
  for (int64_t kk = per * kStreams; kk < K; ++kk) {  // the last K % 4 rows
    load_row<WBF16>(blk, kk, b);
    const __m256 a = _mm256_broadcast_ss(A + kk);
    for (int q = 0; q < 8; ++q) c[q] = _mm256_fmadd_ps(a, b[q], c[q]);
  }
  __m256 out[1][8];
  for (int q = 0; q < 8; ++q) out[0][q] = c[q];
  finish<1, 8>(out, 0, j * kBlock, N, y, ldy, e);
}

// acc[s][i][64] += A[i, kk] * W[kk, :] for the k-rows kk of each sub-stream s in [t0, t1), one at a time
// (the k-rows rows_pair_of_k leaves: an odd last one per sub-stream, and the last K % 4).
template <int MR, bool WBF16>
inline void few_rows_tile(const float* A, int64_t lda, const void* blk, int64_t per, int64_t t0, int64_t t1,
                          int streams, float* acc) {
  for (int64_t k = t0; k < t1; ++k) {
    for (int s = 0; s < streams; ++s) {
      const int64_t kk = s * per + k;
      __m256 b[8];
      load_row<WBF16>(blk, kk, b);
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_broadcast_ss(A + i * lda + kk);
        float* ac = acc + (s * MR + i) * kBlock;
        for (int q = 0; q < 8; ++q) _mm256_store_ps(ac + 8 * q, _mm256_fmadd_ps(a, b[q], _mm256_load_ps(ac + 8 * q)));
      }
    }
  }
}

// acc[s][i][64] += A[i, k] * W[k, :] for rows i < MR, over k-rows kk and kk+1 of each sub-stream s: each
// weight vector is loaded once for all MR rows and each sum is loaded and stored once per two k-rows.
template <int MR, bool WBF16>
inline void rows_pair_of_k(const float* A, int64_t lda, const void* blk, int64_t kk, float* ac) {
  __m256 a0[MR], a1[MR];
  for (int i = 0; i < MR; ++i) {
    a0[i] = _mm256_broadcast_ss(A + i * lda + kk);
    a1[i] = _mm256_broadcast_ss(A + i * lda + kk + 1);
  }
  if (WBF16) {
    const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    const uint16_t* r = static_cast<const uint16_t*>(blk) + kk * kBlock;
    for (int q = 0; q < 8; q += 2) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 8 * q));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + kBlock + 8 * q));
      const __m256 w0l = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
      const __m256 w0h = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
      const __m256 w1l = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
      const __m256 w1h = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
      for (int i = 0; i < MR; ++i) {
        float* c = ac + i * kBlock + 8 * q;
        _mm256_store_ps(c, _mm256_fmadd_ps(a1[i], w1l, _mm256_fmadd_ps(a0[i], w0l, _mm256_load_ps(c))));
        _mm256_store_ps(c + 8, _mm256_fmadd_ps(a1[i], w1h, _mm256_fmadd_ps(a0[i], w0h, _mm256_load_ps(c + 8))));
      }
    }
  } else {
    const float* r = static_cast<const float*>(blk) + kk * kBlock;
    for (int q = 0; q < 8; ++q) {
      const __m256 w0 = _mm256_loadu_ps(r + 8 * q), w1 = _mm256_loadu_ps(r + kBlock + 8 * q);
      for (int i = 0; i < MR; ++i) {
        float* c = ac + i * kBlock + 8 * q;
        _mm256_store_ps(c, _mm256_fmadd_ps(a1[i], w1, _mm256_fmadd_ps(a0[i], w0, _mm256_load_ps(c))));
      }
    }
  }
}

// Rows 0..MR of y for the 64 columns of block j: every k-row of the block read once, two at a time.
template <int MR, bool WBF16>
void few_rows_block(const float* A, int64_t lda, const char* w, int64_t j, int64_t K, int64_t N, void* y, int64_t ldy,
                    const Epilogue& e) {
  const void* blk = w + j * K * kBlock * (WBF16 ? 2 : 4);
  alignas(32) float acc[kStreams][MR][kBlock];
  memset(acc, 0, sizeof(acc));
  const int64_t per = K / kStreams;
  int64_t k = 0;
  for (; k + 2 <= per; k += 2)
    for (int s = 0; s < kStreams; ++s) rows_pair_of_k<MR, WBF16>(A, lda, blk, s * per + k, &acc[s][0][0]);
  if (k < per) few_rows_tile<MR, WBF16>(A, lda, blk, per, k, per, kStreams, &acc[0][0][0]);
  if (K > per * kStreams) {  // the last K % 4 rows
    const char* rest = static_cast<const char*>(blk) + per * kStreams * kBlock * (WBF16 ? 2 : 4);
    few_rows_tile<MR, WBF16>(A + per * kStreams, lda, rest, 0, 0, K - per * kStreams, 1, &acc[0][0][0]);
  }
  for (int i = 0; i < MR; ++i) {
    __m256 sum[1][8];
    for (int q = 0; q < 8; ++q) {
      __m256 v = _mm256_setzero_ps();
      for (int s = 0; s < kStreams; ++s) v = _mm256_add_ps(v, _mm256_load_ps(&acc[s][i][8 * q]));
      sum[0][q] = v;
    }
    finish<1, 8>(sum, i, j * kBlock, N, y, ldy, e);
  }
}

template <bool WBF16>
void few_rows(int64_t M, const float* A, int64_t lda, const char* w, int64_t j, int64_t K, int64_t N, void* y,
              int64_t ldy, const Epilogue& e) {
  switch (M) {
    case 2: few_rows_block<2, WBF16>(A, lda, w, j, K, N, y, ldy, e); break;
    case 3: few_rows_block<3, WBF16>(A, lda, w, j, K, N, y, ldy, e); break;
    default: few_rows_block<4, WBF16>(A, lda, w, j, K, N, y, ldy, e); break;
  }
}

// Runs body(i) for i in [0, items) on `threads` threads of the pool (see pool.h).
template <class Body>
void parallel(int threads, int64_t items, Body&& body) {
  using B = std::remove_reference_t<Body>;  // a named lambda (an lvalue) as well as a temporary one
  lk::Pool::get().run(threads, items, [](void* ctx, int64_t i) { (*static_cast<B*>(ctx))(i); }, &body);
}

}  // namespace

extern "C" {

int lk_version() { return 6; }

// 1 when this CPU runs the kernels (AVX2 and FMA), else 0.
int lk_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

void lk_set_pinning(int on) { lk::Pool::get().set_pinning(on != 0); }

// Starts the pool's workers for `threads` threads (the caller is one) and returns how many workers
// are pinned, one CPU each, after waiting up to 0.1 s for them to start.
int lk_pin_threads(int threads) {
  lk::Pool& pool = lk::Pool::get();
  pool.grow(threads - 1);
  for (int i = 0; i < 1000 && pool.started() < threads - 1; ++i)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  return pool.pinned();
}

// y[M, N] (row stride ldy) = epilogue(x[M, K] (row stride ldx) @ W^T), W packed as described above.
// act_bf16: x, bias, other, y are bf16; w_bf16: W is bf16. Returns 0, or -1 on bad arguments.
// threads: how many threads share the work for M <= 4 (the pool); more rows use OpenMP's team.
int lk_gemm(int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx, int act_bf16, const void* w, int w_bf16,
            const void* bias, const void* other, int64_t ldo, int op, int act, void* y, int64_t ldy, int threads) {
  if (M < 1 || N < 1 || K < 1 || !x || !w || !y || (op && !other) || op < 0 || op > 2 || act < 0 || act > 1) return -1;
  const float* A = static_cast<const float*>(x);
  int64_t lda = ldx;
  std::vector<float> ax;
  if (act_bf16) {  // rows to fp32 once: the inner loop broadcasts each value N/8 times
    ax.resize(static_cast<size_t>(M * K));
    const uint16_t* xs = static_cast<const uint16_t*>(x);
#pragma omp parallel for schedule(static) if (M * K > (1 << 16))
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) ax[m * K + k] = bf16_to_f32(xs[m * ldx + k]);
    A = ax.data();
    lda = K;
  }
  const Epilogue e{bias, other, ldo, op, act, act_bf16 != 0};
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const char* wp = static_cast<const char*>(w);
  if (M <= kSmallM) {  // decode: reading the weights is the work
    // Blocks handed out one at a time by the pool: a thread the OS takes away for a while (a
    // shared machine) then delays the call by one block, not by half the matrix.
    parallel(threads, nblocks, [&](int64_t j) {
      if (M == 1) {
        if (w_bf16) one_row_block<true>(A, wp, j, K, N, y, ldy, e);
        else one_row_block<false>(A, wp, j, K, N, y, ldy, e);
      } else if (w_bf16) {
        few_rows<true>(M, A, lda, wp, j, K, N, y, ldy, e);
      } else {
        few_rows<false>(M, A, lda, wp, j, K, N, y, ldy, e);
      }
    });
    return 0;
  }
  // Many rows: register tiles of 6 rows x 16 columns (a remainder group is as good first as last).
  const int64_t groups = (M + 5) / 6;
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t j = 0; j < nblocks; ++j) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = g * 6;
      const int mr = static_cast<int>(std::min<int64_t>(6, M - m0));
      if (w_bf16) rows<true>(mr, A, lda, m0, wp, j, K, N, y, ldy, e);
      else rows<false>(mr, A, lda, m0, wp, j, K, N, y, ldy, e);
    }
  }
  return 0;
}

}  // extern "C"

namespace {

// Attention of one sequence's queries of kv heads [h0, h1) over its context: the work item of
// lk_decode_attention. DV = head_dim / 8 when known at compile time (64, 128), else 0.
struct AttnArgs {
  int64_t heads, kv_heads, dim, q_row, max_blocks, block_size;
  const char *Q, *Kc, *Vc;
  const int64_t *tables, *ctx;
  float scale;
  bool bf16;
  char* O;
};

template <int DV>
void attend(const AttnArgs& a, int64_t s, int64_t h0, int64_t h1) {
  const int64_t kv_heads = a.kv_heads, group = a.heads / kv_heads, esz = a.bf16 ? 2 : 4, heads = a.heads;
  const int64_t n = a.ctx[s], nh = h1 - h0, dv = DV ? DV : a.dim / 8, dim = 8 * dv, bs = a.block_size;
  const bool bf16 = a.bf16;
  // The queries in fp32, pre-scaled, each head's group padded with zero queries to a multiple of 4:
  // scores are computed 4 queries at a time and reduced together.
  const int64_t g4 = (group + 3) / 4 * 4;
  std::vector<float> qf(static_cast<size_t>(nh * g4 * dim), 0.0f);
  std::vector<float> p(static_cast<size_t>(n * nh * g4));  // p[t][head][query]
  for (int64_t hh = 0; hh < nh; ++hh)
    for (int64_t g = 0; g < group; ++g)
      for (int64_t c = 0; c < dv; ++c) {
        const char* src = a.Q + (s * a.q_row + ((h0 + hh) * group + g) * dim + 8 * c) * esz;
        _mm256_storeu_ps(&qf[(hh * g4 + g) * dim + 8 * c], _mm256_mul_ps(load8(src, bf16), _mm256_set1_ps(a.scale)));
      }
  const int64_t* table = a.tables + s * a.max_blocks;
  const int64_t slot_bytes = kv_heads * dim * esz;
  // Token t's slot (every kv head's row, contiguous), walked block by block: reading whole slots in
  // order keeps the reads sequential, and a division per token cost more than the math. With `ahead`,
  // the slot that many tokens on is prefetched as each is read, across block edges (blocks lie anywhere
  // in the cache): 8 tokens on for K made batch-64 attention 5-15% faster in pairs; V gained nothing.
  const int64_t slot_lines = (nh * dim * esz + 63) / 64;
  auto for_slots = [&](const char* base, int64_t ahead, auto&& body) {
    int64_t pb = 0, pi = 0, pt = 0;  // the slot prefetched next: block pb, row pi, token pt
    auto prefetch_next = [&] {
      const char* r = base + (table[pb] * bs + pi) * slot_bytes + h0 * dim * esz;
      for (int64_t l = 0; l < slot_lines; ++l) _mm_prefetch(r + 64 * l, _MM_HINT_T0);
      if (++pi == bs) pi = 0, ++pb;
      ++pt;
    };
    while (pt < std::min(ahead, n)) prefetch_next();
    for (int64_t b = 0, t = 0; t < n; ++b) {
      const char* r = base + table[b] * bs * slot_bytes + h0 * dim * esz;
      for (int64_t i = 0; i < bs && t < n; ++i, ++t) {
        if (ahead && pt < n) prefetch_next();
        body(t, r + i * slot_bytes);
      }
    }
  };
  // Pass 1 over K: scores, and each query's maximum.
  std::vector<float> mx(static_cast<size_t>(nh * g4), -INFINITY);
  for_slots(a.Kc, 8, [&](int64_t t, const char* slot) {
    for (int64_t hh = 0; hh < nh; ++hh) {
      __m256 kv[DV ? DV : 32];
      for (int64_t c = 0; c < dv; ++c) kv[c] = load8(slot + (hh * dim + 8 * c) * esz, bf16);
      for (int64_t g0 = 0; g0 < g4; g0 += 4) {
        const float* qg = &qf[(hh * g4 + g0) * dim];
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t c = 0; c < dv; ++c)
          for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + u * dim + 8 * c), kv[c], acc[u]);
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m128 sc = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // 4 scores
        _mm_storeu_ps(&p[(t * nh + hh) * g4 + g0], sc);
        float* m = &mx[hh * g4 + g0];
        _mm_storeu_ps(m, _mm_max_ps(_mm_loadu_ps(m), sc));
      }
    }
  });
  // Softmax weights, in place; 1 / sum per query.
  std::vector<float> inv(static_cast<size_t>(nh * g4));
  for (int64_t q0 = 0; q0 < nh * g4; q0 += 4) {
    const __m128 m = _mm_loadu_ps(&mx[q0]);
    __m128 sum = _mm_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      float* pt = &p[t * nh * g4 + q0];
      const __m128 e = _mm256_castps256_ps128(exp8(_mm256_zextps128_ps256(_mm_sub_ps(_mm_loadu_ps(pt), m))));
      _mm_storeu_ps(pt, e);
      sum = _mm_add_ps(sum, e);
    }
    _mm_storeu_ps(&inv[q0], _mm_div_ps(_mm_set1_ps(1.0f), sum));
  }
  // Pass 2 over V, 32 tokens at a time: for each 16-wide slice of the tile's rows (in L1 after the
  // first slice), 4 queries' sums stay in 8 registers, 8 independent FMA chains.
  std::vector<float> out(static_cast<size_t>(nh * g4 * dim), 0.0f);
  const char* tile[32];
  int64_t t0 = 0, nt = 0;
  auto slice = [&](int64_t hh, int64_t g0, int64_t c, auto width) {
    constexpr int W = decltype(width)::value;
    float* o = &out[(hh * g4 + g0) * dim + 8 * c];
    __m256 sum[4][W];
    for (int u = 0; u < 4; ++u)
      for (int w = 0; w < W; ++w) sum[u][w] = _mm256_loadu_ps(o + u * dim + 8 * w);
    for (int64_t i = 0; i < nt; ++i) {
      const char* vr = tile[i] + (hh * dim + 8 * c) * esz;
      __m256 vv[W];
      for (int w = 0; w < W; ++w) vv[w] = load8(vr + 8 * w * esz, bf16);
      const float* pw = &p[((t0 + i) * nh + hh) * g4 + g0];
      for (int u = 0; u < 4; ++u) {
        const __m256 b = _mm256_broadcast_ss(pw + u);
        for (int w = 0; w < W; ++w) sum[u][w] = _mm256_fmadd_ps(b, vv[w], sum[u][w]);
      }
    }
    for (int u = 0; u < 4; ++u)
      for (int w = 0; w < W; ++w) _mm256_storeu_ps(o + u * dim + 8 * w, sum[u][w]);
  };
  auto flush = [&] {
    for (int64_t hh = 0; hh < nh; ++hh)
      for (int64_t g0 = 0; g0 < g4; g0 += 4) {  // padded queries (zero q) are summed too, never stored
        int64_t c = 0;
        for (; c + 2 <= dv; c += 2) slice(hh, g0, c, std::integral_constant<int, 2>{});
        if (c < dv) slice(hh, g0, c, std::integral_constant<int, 1>{});
      }
    t0 += nt;
    nt = 0;
  };
  for_slots(a.Vc, 0, [&](int64_t, const char* slot) {
    tile[nt++] = slot;
    if (nt == 32) flush();
  });
  if (nt) flush();
  for (int64_t hh = 0; hh < nh; ++hh)
    for (int64_t g = 0; g < group; ++g)
      for (int64_t c = 0; c < dv; ++c)
        store8(a.O + ((s * heads + (h0 + hh) * group + g) * dim + 8 * c) * esz,
               _mm256_mul_ps(_mm256_loadu_ps(&out[(hh * g4 + g) * dim + 8 * c]), _mm256_set1_ps(inv[hh * g4 + g])),
               bf16);
}

}  // namespace

extern "C" {

// Attention of one-token queries over a paged KV cache, each sequence over its own context.
// q: [nseq, heads, dim] with row stride q_row (elements); k/v cache: [slots, kv_heads, dim] of one
// layer; tables: [nseq, max_blocks] block ids; ctx: [nseq] tokens to attend (the new one included);
// out: [nseq, heads, dim] contiguous. bf16: q, cache and out are bf16 (else fp32). Query head h
// reads kv head h / (heads / kv_heads), as Hugging Face's repeat_kv lays them out.
int lk_decode_attention(int64_t nseq, int64_t heads, int64_t kv_heads, int64_t dim, const void* q, int64_t q_row,
                        const void* kc, const void* vc, const int64_t* tables, int64_t max_blocks,
                        const int64_t* ctx, int64_t block_size, float scale, void* out, int bf16, int threads) {
  if (nseq < 1 || kv_heads < 1 || heads % kv_heads || heads / kv_heads > 64 || dim % 8 || dim > 256 || block_size < 1)
    return -1;
  for (int64_t s = 0; s < nseq; ++s)
    if (ctx[s] < 1 || ctx[s] > max_blocks * block_size) return -2;
  const AttnArgs a{heads, kv_heads, dim, q_row, max_blocks, block_size, static_cast<const char*>(q),
                   static_cast<const char*>(kc), static_cast<const char*>(vc), tables, ctx, scale, bf16 != 0,
                   static_cast<char*>(out)};
  // Work items: whole sequences when there are enough to share (each reads its slots in order), else
  // one kv head of one sequence each (batch 1 still uses every thread).
  const bool whole = nseq >= 2 * threads;
  const int64_t items = whole ? nseq : nseq * kv_heads;
  auto item = [&](int64_t it) {
    const int64_t s = whole ? it : it / kv_heads, h0 = whole ? 0 : it % kv_heads, h1 = whole ? kv_heads : h0 + 1;
    if (dim == 64) attend<8>(a, s, h0, h1);
    else if (dim == 128) attend<16>(a, s, h0, h1);
    else attend<0>(a, s, h0, h1);
  };
  // Few sequences run on the pool, as lk_gemm's few rows do (a step that small runs whole in it); more
  // run on OpenMP's team, as that step's matmuls do: on the pool, its pinned threads waited for
  // OpenMP's still-spinning ones, and a batch-64 step was 1.04-1.14x slower (paired, 2 cores).
  if (nseq <= kSmallM) {
    parallel(threads, items, item);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t it = 0; it < items; ++it) item(it);
  }
  return 0;
}

// out[r] = w * (x[r] / rms(x[r])), statistics in fp32; in bf16 the normalized row is rounded to bf16
// before the weight multiplies it, as Hugging Face's LlamaRMSNorm does. x rows have stride ldx.
int lk_rms_norm(int64_t rows, int64_t dim, const void* x, int64_t ldx, const void* w, float eps, void* out, int bf16) {
  if (rows < 1 || dim < 1 || dim % 8) return -1;
  const int64_t esz = bf16 ? 2 : 4;
  const char* X = static_cast<const char*>(x);
  const char* W = static_cast<const char*>(w);
  char* O = static_cast<char*>(out);
#pragma omp parallel for schedule(static) if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const char* xr = X + r * ldx * esz;
    __m256 ss = _mm256_setzero_ps();
    for (int64_t c = 0; c < dim; c += 8) {
      const __m256 v = load8(xr + c * esz, bf16);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / static_cast<float>(dim) + eps));
    for (int64_t c = 0; c < dim; c += 8) {
      __m256 n = _mm256_mul_ps(load8(xr + c * esz, bf16), inv);
      if (bf16) {  // round the normalized row to bf16 first
        alignas(32) uint16_t h[8];
        store8(h, n, true);
        n = load8(h, true);
      }
      store8(O + (r * dim + c) * esz, _mm256_mul_ps(n, load8(W + c * esz, bf16)), bf16);
    }
  }
  return 0;
}

// Rotary embedding of q and k in place, then k and v into the cache: one call per layer instead of
// a dozen small ops. qkv: [rows, heads + 2 * kv_heads, dim] (row stride ld), heads side by side;
// cos, sin: [positions, dim] tables (Hugging Face's half-split layout, both halves equal);
// k/v cache: [slots, kv_heads, dim] of one layer. Math in fp32, rounded once.
int lk_rope_write(int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, void* qkv, int64_t ld, const void* cos,
                  const void* sin, const int64_t* pos, void* kc, void* vc, const int64_t* slots, int bf16) {
  if (rows < 1 || dim % 16 || dim > 512) return -1;
  const int64_t esz = bf16 ? 2 : 4, half = dim / 2;
  char* QKV = static_cast<char*>(qkv);
  const char* C = static_cast<const char*>(cos);
  const char* S = static_cast<const char*>(sin);
#pragma omp parallel for schedule(static) if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    char* row = QKV + r * ld * esz;
    const char* cr = C + pos[r] * dim * esz;
    const char* sr = S + pos[r] * dim * esz;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      char* x = row + h * dim * esz;
      for (int64_t i = 0; i < half; i += 8) {
        const __m256 x1 = load8(x + i * esz, bf16), x2 = load8(x + (i + half) * esz, bf16);
        const __m256 c = load8(cr + i * esz, bf16), s = load8(sr + i * esz, bf16);
        store8(x + i * esz, _mm256_fnmadd_ps(x2, s, _mm256_mul_ps(x1, c)), bf16);
        store8(x + (i + half) * esz, _mm256_fmadd_ps(x1, s, _mm256_mul_ps(x2, c)), bf16);
      }
    }
    const int64_t kvb = kv_heads * dim * esz;
    memcpy(static_cast<char*>(kc) + slots[r] * kvb, row + heads * dim * esz, kvb);
    memcpy(static_cast<char*>(vc) + slots[r] * kvb, row + (heads + kv_heads) * dim * esz, kvb);
  }
  return 0;
}

// Sum of n floats, read by `threads` threads of the pool in 1 MiB chunks handed out one at a time,
// each chunk from kStreams places at once: how lk_gemm reads its blocks, so how fast the engine
// can read memory (the caller times it).
double lk_stream_read(const float* buf, int64_t n, int threads) {
  constexpr int64_t chunk = 1 << 18, sub = chunk / kStreams;  // floats
  const int64_t chunks = n / chunk;
  std::vector<double> part(static_cast<size_t>(chunks), 0.0);
  parallel(threads, chunks, [&](int64_t c) {
    const float* p = buf + c * chunk;
    __m256 a[8];
    for (auto& v : a) v = _mm256_setzero_ps();
    for (int64_t i = 0; i < sub; i += 64)
      for (int s = 0; s < kStreams; ++s)
        for (int u = 0; u < 8; ++u) a[u] = _mm256_add_ps(a[u], _mm256_loadu_ps(p + s * sub + i + 8 * u));
    for (int u = 1; u < 8; ++u) a[0] = _mm256_add_ps(a[0], a[u]);
    part[c] = static_cast<double>(hsum(a[0]));
  });
  double total = 0.0;
  for (double v : part) total += v;
  for (int64_t i = chunks * chunk; i < n; ++i) total += buf[i];
  return total;
}

}  // extern "C"

// --- a whole small decode step's layers in one call -------------------------------------------------
//
// At batch 1 a layer is nine kernel calls of 50-550 us each; from Python each call also costs
// 15-30 us of wrapping (tensor allocation, checks, ctypes), during which memory sits idle. Measured
// on the 2-core EPYC, stepping two engines in turn: the per-call step took 1.14x this one's time in
// fp32 (20.9 against 18.1 ms), 1.21x in bf16. Here the same kernels run in the same order, with the
// same rounding, so the result is the per-call path's, bit for bit.

// One layer's weights: packed as lk_gemm reads them (qkv_bias null where the model has none); norm
// weights and bias in the activation dtype.
struct LkLayer {
  const void *in_norm, *qkv, *qkv_bias, *o, *post_norm, *gate, *up, *down;
};

extern "C" {

// x [M, hidden] (activation dtype, contiguous) goes through `layers` layers in place: rms_norm, qkv
// (+bias), rope + cache write at slots, decode attention over each row's blocks, o (+x), rms_norm,
// silu(gate) * up, down (+x). k_cache/v_cache: [layers, cache_slots, kv_heads, dim] contiguous. The
// other arguments are lk_rope_write's and lk_decode_attention's. Returns 0, or the first failing
// call's code.
int lk_decode_layers(int64_t M, int64_t layers, const LkLayer* L, int64_t hidden, int64_t heads, int64_t kv_heads,
                     int64_t dim, int64_t inter, float eps, void* x, const void* cos, const void* sin,
                     const int64_t* pos, void* k_cache, void* v_cache, int64_t cache_slots, const int64_t* slots,
                     const int64_t* tables, int64_t max_blocks, const int64_t* ctx, int64_t block_size, float scale,
                     int bf16, int w_bf16, int threads) {
  if (M < 1 || M > kSmallM || layers < 1 || !L || !x || !k_cache || !v_cache) return -1;
  const int64_t esz = bf16 ? 2 : 4, qkv_n = (heads + 2 * kv_heads) * dim, q_n = heads * dim;
  const int64_t cache_layer = cache_slots * kv_heads * dim * esz;
  std::vector<char> ws(static_cast<size_t>(M * (2 * hidden + qkv_n + q_n + inter) * esz));
  char* X = static_cast<char*>(x);
  char* h = ws.data();
  char* x2 = h + M * hidden * esz;
  char* qkv = x2 + M * hidden * esz;
  char* att = qkv + M * qkv_n * esz;
  char* g = att + M * q_n * esz;
  int rc = 0;
  for (int64_t l = 0; l < layers && rc == 0; ++l) {
    const LkLayer& w = L[l];
    char* kc = static_cast<char*>(k_cache) + l * cache_layer;
    char* vc = static_cast<char*>(v_cache) + l * cache_layer;
    rc = lk_rms_norm(M, hidden, X, hidden, w.in_norm, eps, h, bf16);
    if (!rc) rc = lk_gemm(M, qkv_n, hidden, h, hidden, bf16, w.qkv, w_bf16, w.qkv_bias, nullptr, 0, 0, 0, qkv, qkv_n, threads);
    if (!rc) rc = lk_rope_write(M, heads, kv_heads, dim, qkv, qkv_n, cos, sin, pos, kc, vc, slots, bf16);
    if (!rc)
      rc = lk_decode_attention(M, heads, kv_heads, dim, qkv, qkv_n, kc, vc, tables, max_blocks, ctx, block_size, scale,
                               att, bf16, threads);
    if (!rc) rc = lk_gemm(M, hidden, q_n, att, q_n, bf16, w.o, w_bf16, nullptr, X, hidden, 2, 0, x2, hidden, threads);
    if (!rc) rc = lk_rms_norm(M, hidden, x2, hidden, w.post_norm, eps, h, bf16);
    if (!rc) rc = lk_gemm(M, inter, hidden, h, hidden, bf16, w.gate, w_bf16, nullptr, nullptr, 0, 0, 1, g, inter, threads);
    if (!rc) rc = lk_gemm(M, inter, hidden, h, hidden, bf16, w.up, w_bf16, nullptr, g, inter, 1, 0, g, inter, threads);
    if (!rc) rc = lk_gemm(M, hidden, inter, g, inter, bf16, w.down, w_bf16, nullptr, x2, hidden, 2, 0, X, hidden, threads);
  }
  return rc;
}

}  // extern "C"
