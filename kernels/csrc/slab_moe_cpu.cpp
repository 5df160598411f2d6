// Compiled CPU slab MoE: the math of camera_kernels.reference.slab_moe_reference computed
// directly on the packed codes (layout: kernels/slab_weights.py, bits: kernels/packing.py).
//
// Why this shape (decode reads few tokens per expert, so the cost is per weight, not per MAC):
//  * columns are the vector lanes (N is contiguous in every packed matrix), one register a
//    vector (GCC vector extensions: 16 floats on AVX-512, 8 on AVX2);
//  * a code is taken out of its word with ONE AND (no shift): `w & (mask << m*p)` is the
//    code times 2^(m*p), exact in fp32, and the matching activation is pre-scaled by
//    2^(-m*p) (exact: a power of two), so per vector of weights the work is AND, convert, and one
//    FMA per token; 3-bit codes are first rebuilt from their two planes (shift + AND-OR),
//    1-bit codes are used as masks on AVX-512 (test + masked add per token);
//  * per quantization group only `sum_k x*q` is accumulated; `scale * (acc - zero * sum_k x)`
//    is applied once per group and column (the dequantized weight is never formed);
//  * several tokens of one expert reuse each unpacked vector (up to 8 in registers); with 4+
//    tokens and bf16-valued activations the gate/up products use VDPBF16PS (two codes per
//    lane, exact products, fp32 sums: half the multiply instructions);
//  * rows of a column tile are a page or more apart, so the packed words and the scale/zero
//    rows are software-prefetched (ahead in the tile and for the next tile);
//  * one call does the whole layer: tokens are grouped by expert here, and the column tiles of
//    every (expert, slab) run in one at::parallel_for per phase (gate/up, then down), in
//    passes of bounded scratch.
//  * on AVX2 (16 ymm registers) a 64-column tile runs in sub-tiles sized so the accumulators,
//    the unpacked words and the temporaries fit in registers (tile_vectors), codes are converted
//    as signed int32 (code_to_float), and 1-bit codes go through the same AND + convert + FMA.
// Products of codes and activations are exact and all sums are fp32; the reference rounds
// (q - zero) * scale first and sums in another order, so the two agree to fp32 rounding (the
// tests bound it at 2e-5 of the output's scale).  Measured in bench/cpu_kernel_bench.py
// (bench/results/cpu-kernel.json; the AVX2 build: cpu-kernel-avx2.json).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

namespace {

// One vector is one machine register: 16 floats on AVX-512, 8 elsewhere.  (16-lane generic
// vectors on AVX2 are split into register pairs, and GCC then broadcasts a scalar through the
// stack and spills the accumulators: 3-4x slower.)
#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
constexpr int BLOCK = 32;  // K values per packed block

inline vu load_u(const int32_t* p) {
  vu v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf load_f(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_f(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// *p in every lane, broadcast straight from memory (a load-port instruction).  Written as the
// intrinsic: from generic code GCC loads several consecutive activations as one vector and
// broadcasts each lane with two shuffles, and `vf{} + x` adds an instruction (0 + -0 is +0).
inline vf splat(const float* p) {
  vf v;
#if defined(__AVX512F__)
  const __m512 b = _mm512_set1_ps(*p);
#else
  const __m256 b = _mm256_broadcast_ss(p);
#endif
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// A code at its bit position (code * 2^pos, pos < 32) as fp32.  AVX-512 converts unsigned
// lanes in one instruction; AVX2 has only a signed convert (GCC emulates the unsigned one with
// about five instructions), so there the code is converted as int32, and a code that reaches
// bit 31 (`high`) is first halved: its lowest bit is 0 there (pos >= 24), so that is exact.
// `high` is a constant once the slot loops are unrolled.
inline vf code_to_float(vu c, bool high) {
#if defined(__AVX512F__)
  (void)high;
  return __builtin_convertvector(c, vf);
#else
  if (high) return __builtin_convertvector((vi)(c >> 1), vf) * 2.0f;
  return __builtin_convertvector((vi)c, vf);
#endif
}

// fp16 -> fp32 for `n` values (n <= VL); lanes past n are 0.
inline vf load_half(const at::Half* p, int n) {
  alignas(64) float tmp[VL] = {0};
#if defined(__F16C__)
  if (n == VL) {
    for (int h = 0; h < VL; h += 8)
      _mm256_store_ps(tmp + h, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + h))));
    return load_f(tmp);
  }
#endif
  for (int i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return load_f(tmp);
}

// Bit position of a rebuilt 3-bit code whose 2-bit part is slot m of its word: 2m, except
// the last slot (bits 30-31), moved down one bit so that the third bit fits in the word.
constexpr int pos3(int m) { return m == 15 ? 29 : 2 * m; }

// 1-bit codes are masks (test + masked add) where AVX-512 has mask registers; elsewhere they
// are converted like the others (AND + convert + FMA), so their activations are pre-scaled too.
constexpr bool ONE_BIT_MASKS =
#if defined(__AVX512F__)
    true;
#else
    false;
#endif

// Scale of the activation paired with value i (0..31) of a block: the AND below leaves the
// code at its bit position, code * 2^pos, so x is multiplied by 2^-pos (exact: a power of
// two; |x| < 2^-95 would lose bits to fp32 subnormals, far below any activation).  1-bit
// codes used as masks need no scaling; 3-bit codes are rebuilt at the 2-bit part's position.
inline float slot_scale(int bits, int i) {
  switch (bits) {
    case 1: return ONE_BIT_MASKS ? 1.0f : std::ldexp(1.0f, -i);
    case 3: return std::ldexp(1.0f, -pos3(i % 16));
    default: return std::ldexp(1.0f, -bits * (i % (BLOCK / bits)));
  }
}

// Pre-scaled activations of one token for one bit-width: dst[k] = x[k] * slot_scale(k % 32),
// zero-padded to whole blocks.
void prescale(const float* x, int k, int bits, float* dst) {
  float sc[BLOCK];
  for (int i = 0; i < BLOCK; ++i) sc[i] = slot_scale(bits, i);
  const int nblk = (k + BLOCK - 1) / BLOCK;
  for (int b = 0; b < nblk; ++b)
    for (int i = 0; i < BLOCK; ++i) {
      const int kk = b * BLOCK + i;
      dst[kk] = kk < k ? x[kk] * sc[i] : 0.0f;
    }
}

// Group sums of one token's activations: dst[g] = sum of x[k] over group g.
void group_sums(const float* x, int k, int group, float* dst) {
  const int ng = (k + group - 1) / group;
  for (int g = 0; g < ng; ++g) {
    float s = 0.0f;
    const int hi = std::min(k, (g + 1) * group);
    for (int kk = g * group; kk < hi; ++kk) s += x[kk];
    dst[g] = s;
  }
}

// acc[a][t][v] += qf[v] * x_t: one broadcast per token, reused across the column vectors
// (token-outer keeps one broadcast live, so the accumulators stay in registers).
template <int TT, int NV, int A>
inline void fma_tokens(const vf (&qf)[NV], const float* const* xs, int64_t idx, int a,
                       vf (&acc)[A][TT][NV]) {
  for (int t = 0; t < TT; ++t) {
    const vf xb = splat(&xs[t][idx]);
    for (int v = 0; v < NV; ++v) acc[a][t][v] += qf[v] * xb;
  }
}

// acc[t] += code * xs[t][xoff + i] for the 32 values of one block (words at q, row stride ldq).
// 2/4/8 bits: one AND (code at its position) + convert + one FMA per token.
template <int P, int TT, int NV, int A>
inline void block_pow2(const int32_t* q, int64_t ldq, const float* const* xs, int64_t xoff,
                       vf (&acc)[A][TT][NV]) {
  constexpr int PER_WORD = BLOCK / P;
  constexpr uint32_t MASK = (1u << P) - 1u;
#pragma GCC unroll 8
  for (int j = 0; j < P; ++j) {
    vu w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load_u(q + j * ldq + v * VL);
#pragma GCC unroll 32
    for (int m = 0; m < PER_WORD; ++m) {
      const uint32_t mk = MASK << (m * P);
      const int i = j * PER_WORD + m;
      vf qf[NV];
      const bool high = (m + 1) * P > 31;
      for (int v = 0; v < NV; ++v) qf[v] = code_to_float(w[v] & mk, high);
      fma_tokens<TT, NV, A>(qf, xs, xoff + i, m % A, acc);
    }
  }
}

// 3 bits = a 2-bit word pair (bits 0-1) and a 1-bit word (bit 2): the 1-bit plane is shifted
// next to the 2-bit code and merged (AND, shift, AND-OR), so a 3-bit code costs one convert
// and one FMA per token like the others.
struct Masks3 {
  uint32_t lo[16], hi[16];
  constexpr Masks3() : lo(), hi() {
    for (int m = 0; m < 16; ++m) {
      lo[m] = 3u << pos3(m);
      hi[m] = 4u << pos3(m);
    }
  }
};
alignas(64) constexpr Masks3 MASKS3{};

template <int TT, int NV, int A>
inline void block_3bit(const int32_t* q, int64_t ldq, const float* const* xs, int64_t xoff,
                       vf (&acc)[A][TT][NV]) {
  // Masks are read through an opaque pointer so they stay memory operands (embedded
  // broadcasts) instead of 32 hoisted registers that would push the accumulators to the stack.
  const Masks3* mk = &MASKS3;
  asm("" : "+r"(mk));
  vu hi[NV];
  for (int v = 0; v < NV; ++v) hi[v] = load_u(q + 2 * ldq + v * VL);
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j) {
    vu w[NV];
    for (int v = 0; v < NV; ++v) w[v] = load_u(q + j * ldq + v * VL);
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m) {
      const int i = 16 * j + m;         // value index: its 1-bit plane bit is i
      const int pos = pos3(m);           // where the 3-bit code is rebuilt
      const int sh = pos + 2 - i;        // moves the 1-bit plane's bit i to pos + 2
      const uint32_t lo_mask = mk->lo[m], hi_mask = mk->hi[m];
      vf qf[NV];
      for (int v = 0; v < NV; ++v) {
        const vu h = sh >= 0 ? (hi[v] << sh) : (hi[v] >> -sh);
        const vu l = pos == 2 * m ? w[v] : (w[v] >> 1);
        qf[v] = code_to_float((l & lo_mask) | (h & hi_mask), pos + 2 >= 31);
      }
      fma_tokens<TT, NV, A>(qf, xs, xoff + i, m % A, acc);
    }
  }
}

// 1 bit: on AVX-512 the code is a mask, acc += x where the bit is set (test + masked add per
// token); elsewhere the bit at its position is converted (see ONE_BIT_MASKS).
template <int TT, int NV, int A>
inline void block_1bit(const int32_t* q, const float* const* xs, int64_t xoff, vf (&acc)[A][TT][NV]) {
  vu w[NV];
  for (int v = 0; v < NV; ++v) w[v] = load_u(q + v * VL);
#pragma GCC unroll 32
  for (int m = 0; m < BLOCK; ++m) {
#if defined(__AVX512F__)
    __mmask16 k[NV];
    for (int v = 0; v < NV; ++v) {
      __m512i wv;
      std::memcpy(&wv, &w[v], sizeof(wv));
      k[v] = _mm512_test_epi32_mask(wv, _mm512_set1_epi32(static_cast<int>(1u << m)));
    }
    for (int t = 0; t < TT; ++t) {
      const __m512 xb = _mm512_set1_ps(xs[t][xoff + m]);
      for (int v = 0; v < NV; ++v) {
        __m512 a;
        std::memcpy(&a, &acc[m % A][t][v], sizeof(a));
        a = _mm512_mask_add_ps(a, k[v], a, xb);
        std::memcpy(&acc[m % A][t][v], &a, sizeof(a));
      }
    }
#else
    vf qf[NV];
    for (int v = 0; v < NV; ++v) qf[v] = code_to_float(w[v] & (1u << m), m == 31);
    fma_tokens<TT, NV, A>(qf, xs, xoff + m, m % A, acc);
#endif
  }
}

#if defined(__AVX512BF16__)
#define CAMERA_BF16_DOT 1
// bf16 dot path (gate/up with bf16-valued activations, several tokens per expert): codes of
// slots 2p and 2p+1 share one 32-bit lane as two bf16 (a code times 2^pos has at most 8
// significant bits, so its fp32 form truncates to bf16 exactly), the activations likewise
// (bf16 values times powers of two), and VDPBF16PS multiplies them exactly and accumulates
// in fp32: half the multiply instructions of the FMA path per token.
inline vu pair_bf16(vf a, vf b) {
  vu ua, ub;
  std::memcpy(&ua, &a, sizeof(ua));
  std::memcpy(&ub, &b, sizeof(ub));
  return (ua >> 16) | (ub & 0xFFFF0000u);
}

template <int TT, int NV>
inline void dot_tokens(const vu (&qp)[NV], const uint32_t* const* xp, int64_t idx, vf (&acc)[1][TT][NV]) {
  for (int t = 0; t < TT; ++t) {
    const __m512i xb = _mm512_set1_epi32(static_cast<int>(xp[t][idx]));
    __m512bh xbh;
    std::memcpy(&xbh, &xb, sizeof(xbh));
    for (int v = 0; v < NV; ++v) {
      __m512 a;
      __m512bh q;
      std::memcpy(&a, &acc[0][t][v], sizeof(a));
      std::memcpy(&q, &qp[v], sizeof(q));
      a = _mm512_dpbf16_ps(a, q, xbh);
      std::memcpy(&acc[0][t][v], &a, sizeof(a));
    }
  }
}

template <int BITS, int TT, int NV>
inline void block_dot(const int32_t* q, int64_t ldq, const uint32_t* const* xp, int64_t poff,
                      vf (&acc)[1][TT][NV]) {
  if constexpr (BITS == 3) {
    const Masks3* mk = &MASKS3;
    asm("" : "+r"(mk));
    vu hi[NV];
    for (int v = 0; v < NV; ++v) hi[v] = load_u(q + 2 * ldq + v * VL);
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      vu w[NV];
      for (int v = 0; v < NV; ++v) w[v] = load_u(q + j * ldq + v * VL);
#pragma GCC unroll 8
      for (int mp = 0; mp < 8; ++mp) {
        vu qp[NV];
        for (int v = 0; v < NV; ++v) {
          vf c[2];
          for (int h = 0; h < 2; ++h) {
            const int m = 2 * mp + h, i = 16 * j + m, pos = pos3(m), sh = pos + 2 - i;
            const vu hs = sh >= 0 ? (hi[v] << sh) : (hi[v] >> -sh);
            const vu l = pos == 2 * m ? w[v] : (w[v] >> 1);
            c[h] = __builtin_convertvector((l & mk->lo[m]) | (hs & mk->hi[m]), vf);
          }
          qp[v] = pair_bf16(c[0], c[1]);
        }
        dot_tokens<TT, NV>(qp, xp, poff + 8 * j + mp, acc);
      }
    }
  } else {
    constexpr int P = BITS, PER_WORD = BLOCK / P;
    constexpr uint32_t MASK = (1u << P) - 1u;
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {
      vu w[NV];
      for (int v = 0; v < NV; ++v) w[v] = load_u(q + j * ldq + v * VL);
#pragma GCC unroll 16
      for (int mp = 0; mp < PER_WORD / 2; ++mp) {
        vu qp[NV];
        for (int v = 0; v < NV; ++v)
          qp[v] = pair_bf16(__builtin_convertvector(w[v] & (MASK << (2 * mp * P)), vf),
                            __builtin_convertvector(w[v] & (MASK << ((2 * mp + 1) * P)), vf));
        dot_tokens<TT, NV>(qp, xp, poff + (j * PER_WORD) / 2 + mp, acc);
      }
    }
  }
}
#endif

// Scale of value i of a block on the bf16 dot path: 1-bit codes are converted, not masks.
inline float slot_scale_dot(int bits, int i) { return bits == 1 ? std::ldexp(1.0f, -i) : slot_scale(bits, i); }

// bf16 pairs of one token's pre-scaled activations: dst[k/2] = (x[k] s(k)) | (x[k+1] s(k+1)) << 16
// as bf16 bit patterns; x must be bf16-valued (low 16 bits zero), so truncation is exact.
void prescale_pairs(const float* x, int k, int bits, uint32_t* dst) {
  float sc[BLOCK];
  for (int i = 0; i < BLOCK; ++i) sc[i] = slot_scale_dot(bits, i);
  const int nblk = (k + BLOCK - 1) / BLOCK;
  for (int kk = 0; kk < nblk * BLOCK; kk += 2) {
    const float a = kk < k ? x[kk] * sc[kk % BLOCK] : 0.0f;
    const float b = kk + 1 < k ? x[kk + 1] * sc[(kk + 1) % BLOCK] : 0.0f;
    uint32_t ua, ub;
    std::memcpy(&ua, &a, 4);
    std::memcpy(&ub, &b, 4);
    dst[kk / 2] = (ua >> 16) | (ub & 0xFFFF0000u);
  }
}

template <int BITS, int TT, int NV, int A>
inline void block_accum(const int32_t* q, int64_t ldq, const float* const* xs, int64_t xoff,
                        vf (&acc)[A][TT][NV]) {
  if constexpr (BITS == 1) {
    block_1bit<TT, NV, A>(q, xs, xoff, acc);
  } else if constexpr (BITS == 3) {
    block_3bit<TT, NV, A>(q, ldq, xs, xoff, acc);
  } else {
    block_pow2<BITS, TT, NV, A>(q, ldq, xs, xoff, acc);
  }
}

// One column tile (NV*VL columns) for TT tokens: res[t][col] = sum_k x[t,k] * W[k, col].
// q: packed words at the tile's first column (row stride ldq); s/z: scales/zeros at the tile's
// first column (row stride lds); xs[t]: prescaled activations; xsum[t]: group sums.
// DOT: the bf16 dot path (xs[t] then holds uint32 bf16 pairs, see prescale_pairs).
template <int BITS, int TT, int NV, bool DOT>
void tile_kernel(const int32_t* q, int64_t ldq, const at::Half* s, const at::Half* z, int64_t lds,
                 int k, int group, int ncols, const float* const* xs, const float* const* xsum,
                 float* res /* [TT][NV*VL] */, bool prefetch) {
  constexpr int PF = 4;  // blocks of look-ahead
  // Independent FMA chains to hide latency: two while the accumulators are few (the AVX2
  // register file holds 8 of them beside the words and temporaries, AVX-512's more).
  constexpr int A = (DOT || TT * NV >= (VL == 16 ? 8 : 4)) ? 1 : 2;
  const int nblk = (k + BLOCK - 1) / BLOCK;
  const int ng = (k + group - 1) / group;
  const int bpg = group / BLOCK;
  // The per-group results are summed in res (memory, touched once per group): held in
  // registers they would take TT*NV of the 16 AVX2 registers from the accumulators.
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < NV; ++v) store_f(res + (t * NV + v) * VL, vf{});
  for (int g = 0; g < ng; ++g) {
    vf acc[A][TT][NV];
    for (int a = 0; a < A; ++a)
      for (int t = 0; t < TT; ++t)
        for (int v = 0; v < NV; ++v) acc[a][t][v] = vf{};
    const int b_hi = std::min(nblk, (g + 1) * bpg);
    if (prefetch) {
      // Scale/zero rows are lds apart too: the next group's rows of this tile, and this
      // group's rows of the next tile (NV*VL halves: one or two cache lines each).
      for (const at::Half* base : {s, z}) {
        const at::Half* next_group = base + (g + 1) * lds;
        const at::Half* next_tile = base + g * lds + NV * VL;
        if (g + 1 < ng) {
          __builtin_prefetch(next_group);
          __builtin_prefetch(next_group + NV * VL - 1);
        }
        __builtin_prefetch(next_tile);
        __builtin_prefetch(next_tile + NV * VL - 1);
      }
    }
    for (int b = g * bpg; b < b_hi; ++b) {
      const int32_t* qb = q + static_cast<int64_t>(b) * BITS * ldq;
      if (prefetch) {
        // Rows of a tile are ldq apart (a page or more): the hardware prefetchers do not
        // follow them, so each row would be a DRAM round trip.  Fetch PF blocks ahead in this
        // tile, and the same rows of the next tile (usually this thread's next work item).
        const int32_t* ahead = qb + static_cast<int64_t>(PF) * BITS * ldq;
        const bool in_tile = b + PF < nblk;
        for (int r = 0; r < BITS; ++r)
          for (int v = 0; v < NV; ++v) {
            if (in_tile) __builtin_prefetch(ahead + r * ldq + v * VL);
            __builtin_prefetch(qb + r * ldq + (NV + v) * VL);
          }
      }
      if constexpr (DOT) {
#if defined(CAMERA_BF16_DOT)
        block_dot<BITS, TT, NV>(qb, ldq, reinterpret_cast<const uint32_t* const*>(xs),
                                static_cast<int64_t>(b) * (BLOCK / 2), acc);
#endif
      } else {
        block_accum<BITS, TT, NV, A>(qb, ldq, xs, static_cast<int64_t>(b) * BLOCK, acc);
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int nv = std::max(0, std::min(VL, ncols - v * VL));
      const vf sc = load_half(s + g * lds + v * VL, nv);
      const vf zr = load_half(z + g * lds + v * VL, nv);
      for (int t = 0; t < TT; ++t) {
        vf a = acc[0][t][v];
        if constexpr (A == 2) a += acc[1][t][v];
        float* r = res + (t * NV + v) * VL;
        store_f(r, load_f(r) + sc * (a - zr * xsum[t][g]));
      }
    }
  }
}

constexpr int MAX_TT = 8;
constexpr int TILE_COLS = 64;  // columns of one work item, see tile_64

using TileFn = void (*)(const int32_t*, int64_t, const at::Half*, const at::Half*, int64_t, int, int, int,
                        const float* const*, const float* const*, float*, bool);

// Column vectors per kernel call for TT tokens: the TT x NV accumulators (x2 chains below 8)
// and the NV unpacked words must fit the register file (32 zmm on AVX-512, 16 ymm on AVX2),
// and more vectors per token give each broadcast activation more work.
template <int TT>
constexpr int tile_vectors() {
  if constexpr (VL == 16) return TT <= 4 ? 4 : 2;
  return TT == 1 ? 4 : TT <= 4 ? 2 : 1;
}

// One 64-column tile in sub-tiles of tile_vectors<TT>() vectors.  res: [TT][64].
template <int BITS, int TT, bool DOT>
void tile_64(const int32_t* q, int64_t ldq, const at::Half* s, const at::Half* z, int64_t lds, int k,
             int group, int ncols, const float* const* xs, const float* const* xsum, float* res, bool prefetch) {
  constexpr int NV = tile_vectors<TT>();
  constexpr int SUB = NV * VL;
  if constexpr (SUB == 64) {
    tile_kernel<BITS, TT, NV, DOT>(q, ldq, s, z, lds, k, group, ncols, xs, xsum, res, prefetch);
  } else {
    alignas(64) float part[TT * SUB];
    for (int h = 0; h < 64 / SUB; ++h) {
      tile_kernel<BITS, TT, NV, DOT>(q + SUB * h, ldq, s + SUB * h, z + SUB * h, lds, k, group, ncols - SUB * h,
                                     xs, xsum, part, prefetch);
      for (int t = 0; t < TT; ++t) std::memcpy(res + t * 64 + SUB * h, part + t * SUB, SUB * sizeof(float));
    }
  }
}

// Token chunks of 1, 2, 3, 4 or 8 only: fewer instantiations keep the first build short; a
// narrower tail tile runs on a zero-padded copy.
template <int BITS>
TileFn pick_tt(int tt) {
  switch (tt) {
    case 1: return &tile_64<BITS, 1, false>;
    case 2: return &tile_64<BITS, 2, false>;
    case 3: return &tile_64<BITS, 3, false>;
    case 4: return &tile_64<BITS, 4, false>;
    default: return &tile_64<BITS, 8, false>;
  }
}

#if defined(CAMERA_BF16_DOT)
template <int BITS>
TileFn pick_dot(int tt) {
  return tt >= 8 ? &tile_64<BITS, 8, true> : &tile_64<BITS, 4, true>;
}

// The dot path in chunks of 8 or 4 tokens.
TileFn pick_dot(int bits, int tt) {
  switch (bits) {
    case 1: return pick_dot<1>(tt);
    case 2: return pick_dot<2>(tt);
    case 3: return pick_dot<3>(tt);
    case 4: return pick_dot<4>(tt);
    default: return pick_dot<8>(tt);
  }
}
#endif
constexpr bool HAVE_DOT =
#if defined(CAMERA_BF16_DOT)
    true;
#else
    false;
#endif
// Fewest tokens per chunk for which the dot path beats the FMA path (its pair building costs
// about two FMA-path tokens per weight).
constexpr int DOT_MIN_TOKENS = 4;

TileFn pick(int bits, int tt) {
  switch (bits) {
    case 1: return pick_tt<1>(tt);
    case 2: return pick_tt<2>(tt);
    case 3: return pick_tt<3>(tt);
    case 4: return pick_tt<4>(tt);
    default: return pick_tt<8>(tt);
  }
}

// Columns [c0, c0 + ncols) (ncols <= TILE_COLS) of one packed matrix for `count` tokens;
// out[t][col_in_out + col] += result.  xdot (optional): the tokens' bf16 pairs, for the dot path.
// A tail tile (ncols below TILE_COLS)
// reads a zero-padded copy so the kernel never reads past the matrix.
void run_tile(int bits, const int32_t* q, int64_t ldq, const at::Half* s, const at::Half* z, int64_t lds,
              int k, int group, int ncols, int count, const float* const* xs, const float* const* xsum,
              float* const* out, int64_t col_in_out, const float* const* xdot = nullptr) {
  const int width = TILE_COLS;
  std::vector<int32_t> qpad;
  std::vector<at::Half> spad, zpad;
  const int nrows = (k + BLOCK - 1) / BLOCK * bits;
  const int ng = (k + group - 1) / group;
  if (ncols != width) {
    qpad.assign(static_cast<size_t>(nrows) * width, 0);
    spad.assign(static_cast<size_t>(ng) * width, at::Half(0.0f));
    zpad.assign(static_cast<size_t>(ng) * width, at::Half(0.0f));
    for (int r = 0; r < nrows; ++r) std::memcpy(&qpad[r * width], q + r * ldq, ncols * sizeof(int32_t));
    for (int g = 0; g < ng; ++g) {
      std::memcpy(&spad[g * width], s + g * lds, ncols * sizeof(at::Half));
      std::memcpy(&zpad[g * width], z + g * lds, ncols * sizeof(at::Half));
    }
    q = qpad.data();
    s = spad.data();
    z = zpad.data();
    ldq = lds = width;
  }
  alignas(64) float res[MAX_TT * TILE_COLS];
  for (int t0 = 0; t0 < count;) {
    const int rem = count - t0;
    // Chunks of 8, 4, then 1-3 tokens (5-7 would add instantiations, i.e. build time, for
    // little: the weights of a tile are in L1 for the second chunk).
    int tt = rem >= 8 ? 8 : rem >= 4 ? 4 : rem;
    TileFn fn = nullptr;
    const float* const* xin = xs + t0;
#if defined(CAMERA_BF16_DOT)
    if (xdot != nullptr && rem >= DOT_MIN_TOKENS) {
      tt = rem >= 8 ? 8 : 4;
      fn = pick_dot(bits, tt);
      xin = xdot + t0;
    }
#endif
    if (fn == nullptr) fn = pick(bits, tt);
    fn(q, ldq, s, z, lds, k, group, ncols, xin, xsum + t0, res, t0 == 0);
    for (int t = 0; t < tt; ++t) {
      float* o = out[t0 + t] + col_in_out;
      const float* r = res + t * TILE_COLS;
      for (int c = 0; c < ncols; ++c) o[c] += r[c];
    }
    t0 += tt;
  }
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

// The whole layer; see camera_kernels.cpu_slab.slab_moe_cpu for the contract.  x [T, H] fp32,
// topk_weights [T, K] fp32, topk_ids [T, K] int64, metadata int32 [E, nb]; returns fp32 [T, H].
torch::Tensor slab_moe_forward(torch::Tensor x, torch::Tensor topk_weights, torch::Tensor topk_ids,
                               std::vector<torch::Tensor> w13q, std::vector<torch::Tensor> w13s,
                               std::vector<torch::Tensor> w13z, std::vector<torch::Tensor> w2q,
                               std::vector<torch::Tensor> w2s, std::vector<torch::Tensor> w2z,
                               std::vector<int64_t> bits, torch::Tensor slab_sizes, torch::Tensor col_offsets,
                               torch::Tensor down_row_offsets, torch::Tensor down_group_offsets,
                               int64_t group_size, int64_t max_pairs) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [T, H]");
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous(), "topk_weights: fp32");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_ids.is_contiguous(), "topk_ids: int64");
  const int T = static_cast<int>(x.size(0));
  const int H = static_cast<int>(x.size(1));
  const int K = static_cast<int>(topk_ids.size(1));
  const int E = static_cast<int>(slab_sizes.size(0));
  const int NB = static_cast<int>(bits.size());
  const int G = static_cast<int>(group_size);
  TORCH_CHECK(G > 0 && G % BLOCK == 0, "group_size must be a positive multiple of 32");
  for (int i = 0; i < NB; ++i) {
    TORCH_CHECK(w13q[i].is_contiguous() && w2q[i].is_contiguous() && w13s[i].is_contiguous() &&
                    w13z[i].is_contiguous() && w2s[i].is_contiguous() && w2z[i].is_contiguous(),
                "slab tensors must be contiguous");
  }
  auto out = torch::zeros({T, H}, x.options());
  if (T == 0 || K == 0) return out;

  const float* xp = x.data_ptr<float>();
  const float* wp = topk_weights.data_ptr<float>();
  const int64_t* idp = topk_ids.data_ptr<int64_t>();
  const int32_t* sizes = slab_sizes.data_ptr<int32_t>();
  const int32_t* coff = col_offsets.data_ptr<int32_t>();
  const int32_t* roff = down_row_offsets.data_ptr<int32_t>();
  const int32_t* goff = down_group_offsets.data_ptr<int32_t>();

  // Group (token, slot) pairs by expert (stable: token order within an expert).
  std::vector<int> counts(E + 1, 0);
  for (int p = 0; p < T * K; ++p) {
    const int64_t e = idp[p];
    if (e >= 0 && e < E) counts[e + 1]++;
  }
  std::vector<int> start(E + 1, 0);
  for (int e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e + 1];
  const int npairs = start[E];
  std::vector<int> pair_token(npairs), fill(start.begin(), start.end() - 1);
  std::vector<float> pair_weight(npairs);
  for (int p = 0; p < T * K; ++p) {
    const int64_t e = idp[p];
    if (e >= 0 && e < E) {
      const int at = fill[e]++;
      pair_token[at] = p / K;
      pair_weight[at] = wp[p];
    }
  }
  std::vector<int> pair_expert(npairs);
  for (int e = 0; e < E; ++e)
    for (int p = start[e]; p < start[e + 1]; ++p) pair_expert[p] = e;
  // Hit experts with a non-empty intermediate.
  std::vector<int> hit;
  for (int e = 0; e < E; ++e) {
    int width = 0;
    for (int i = 0; i < NB; ++i) width += sizes[e * NB + i];
    if (start[e + 1] > start[e] && width > 0) hit.push_back(e);
  }
  if (hit.empty()) return out;

  const int nblk_h = (H + BLOCK - 1) / BLOCK;
  const int ng_h = (H + G - 1) / G;
  // Per pair: prescaled x per bit index, x group sums, gate/up results, act, and the output.
  std::vector<int64_t> xs_off(NB + 1, 0);
  for (int i = 0; i < NB; ++i) xs_off[i + 1] = xs_off[i] + static_cast<int64_t>(nblk_h) * BLOCK;
  const int64_t xs_stride = xs_off[NB];
  // Widest slab per bit index bounds the per-pair scratch.
  int64_t gu_stride = 0, act_stride = 0, as_stride = 0, asum_stride = 0;
  std::vector<int64_t> gu_off(NB + 1, 0), act_off(NB + 1, 0), as_off(NB + 1, 0), asum_off(NB + 1, 0);
  for (int i = 0; i < NB; ++i) {
    int nmax = 0;
    for (int e : hit) nmax = std::max(nmax, static_cast<int>(sizes[e * NB + i]));
    const int nb32 = (nmax + BLOCK - 1) / BLOCK;
    gu_off[i + 1] = gu_off[i] + 2 * nmax;
    act_off[i + 1] = act_off[i] + nb32 * BLOCK;
    as_off[i + 1] = as_off[i] + static_cast<int64_t>(nb32) * BLOCK;
    asum_off[i + 1] = asum_off[i] + (nmax + G - 1) / G;
  }
  gu_stride = gu_off[NB];
  act_stride = act_off[NB];
  as_stride = as_off[NB];
  asum_stride = asum_off[NB];

  // Work is split into segments (one expert, at most MAX_PAIRS of its pairs) and the segments
  // into batches of at most MAX_PAIRS pairs, so the scratch stays bounded (max_pairs pairs and
  // at most SCRATCH_BYTES; about 40 KB a pair at H = 1024) however many tokens a prefill
  // brings; decode is one batch.
  const int64_t xd_stride = static_cast<int64_t>(NB) * nblk_h * (BLOCK / 2);
  constexpr int64_t SCRATCH_BYTES = int64_t{32} << 20;
  const int64_t pair_bytes =
      4 * (xs_stride + xd_stride + ng_h + gu_stride + act_stride + as_stride + asum_stride + H);
  const int MAX_PAIRS = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(max_pairs, std::max<int64_t>(8, SCRATCH_BYTES / pair_bytes))));
  struct Seg { int e, p0, p1; bool dot; };
  std::vector<Seg> segs;
  // bf16 dot path for gate/up: segments with several tokens whose activations are all
  // bf16-valued (the served dtype), so that the bf16 products are exact.
  std::vector<char> token_bf16(T, 0);
  if (HAVE_DOT) {
    for (int t = 0; t < T; ++t) {
      const uint32_t* xu = reinterpret_cast<const uint32_t*>(xp + static_cast<int64_t>(t) * H);
      uint32_t low = 0;
      for (int c = 0; c < H; ++c) low |= xu[c] & 0xFFFFu;
      token_bf16[t] = low == 0;
    }
  }
  for (int e : hit) {
    for (int p0 = start[e]; p0 < start[e + 1]; p0 += MAX_PAIRS) {
      const int p1 = std::min(p0 + MAX_PAIRS, start[e + 1]);
      bool dot = HAVE_DOT && p1 - p0 >= DOT_MIN_TOKENS;
      for (int p = p0; p < p1 && dot; ++p) dot = token_bf16[pair_token[p]];
      segs.push_back({e, p0, p1, dot});
    }
  }
  // Scratch lives on between calls (per calling thread, grown to the largest pass, at most
  // MAX_PAIRS pairs): a fresh multi-MB allocation per layer would page-fault and be zeroed
  // serially.  Nothing is zeroed here: every element a pass reads is written first in it
  // (gu and ye, the accumulated ones, are cleared per pair inside the parallel phase 0).
  // (Bound to local references: inside at::parallel_for a thread_local named directly would be
  // the worker thread's own, empty, instance.)
  thread_local std::vector<uint32_t> tl_xd;
  thread_local std::vector<float> tl_xs, tl_xsum, tl_gu, tl_act, tl_as, tl_asum, tl_ye;
  std::vector<uint32_t>& xd = tl_xd;
  std::vector<float>&xs = tl_xs, &xsum = tl_xsum, &gu = tl_gu, &act = tl_act, &as = tl_as, &asum = tl_asum,
  &ye = tl_ye;
  auto grow = [](auto& v, size_t n) {
    if (v.size() < n) v.resize(n);
  };
  float* op = out.data_ptr<float>();

  for (size_t s0 = 0; s0 < segs.size();) {
    size_t s1 = s0 + 1;
    while (s1 < segs.size() && segs[s1].p1 - segs[s0].p0 <= MAX_PAIRS) ++s1;
    const int base = segs[s0].p0;            // pairs of a batch are consecutive
    const int np = segs[s1 - 1].p1 - base;  // local pair index: p - base
    bool any_dot = false;
    for (size_t si = s0; si < s1; ++si) any_dot = any_dot || segs[si].dot;
    if (any_dot) grow(xd, static_cast<size_t>(np) * xd_stride);
    grow(xs, static_cast<size_t>(np) * xs_stride);
    grow(xsum, static_cast<size_t>(np) * ng_h);
    grow(gu, static_cast<size_t>(np) * gu_stride);
    grow(act, static_cast<size_t>(np) * act_stride);
    grow(as, static_cast<size_t>(np) * as_stride);
    grow(asum, static_cast<size_t>(np) * asum_stride);
    grow(ye, static_cast<size_t>(np) * H);
    // Pairs between the batch's segments that belong to a width-0 expert are not live.
    std::vector<char> pair_dot(np, 0), pair_live(np, 0);
    for (size_t si = s0; si < s1; ++si)
      for (int p = segs[si].p0; p < segs[si].p1; ++p) {
        pair_dot[p - base] = segs[si].dot;
        pair_live[p - base] = 1;
      }

    // Phase 0: activations of every pair (prescaled per bit-width, bf16 pairs, group sums).
    at::parallel_for(0, np, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        if (!pair_live[j]) continue;
        std::fill_n(&gu[j * gu_stride], gu_stride, 0.0f);
        std::fill_n(&ye[j * H], H, 0.0f);
        const float* xt = xp + static_cast<int64_t>(pair_token[base + j]) * H;
        for (int i = 0; i < NB; ++i) prescale(xt, H, static_cast<int>(bits[i]), &xs[j * xs_stride + xs_off[i]]);
        if (pair_dot[j])
          for (int i = 0; i < NB; ++i)
            prescale_pairs(xt, H, static_cast<int>(bits[i]), &xd[j * xd_stride + i * nblk_h * (BLOCK / 2)]);
        group_sums(xt, H, G, &xsum[j * ng_h]);
      }
    });

    // Work items: (segment, bit index, first column) tiles of TILE_COLS columns.
    struct Item { int seg, i, c0; };
    std::vector<Item> up_items, down_items;
    for (size_t si = s0; si < s1; ++si) {
      const int e = segs[si].e;
      for (int i = 0; i < NB; ++i) {
        const int n = sizes[e * NB + i];
        for (int c0 = 0; c0 < 2 * n; c0 += TILE_COLS) up_items.push_back({static_cast<int>(si), i, c0});
      }
      for (int c0 = 0; c0 < H; c0 += TILE_COLS) down_items.push_back({static_cast<int>(si), -1, c0});
    }

    // Phase 1: gate/up columns of every (segment, slab), all in one parallel region.
    at::parallel_for(0, static_cast<int64_t>(up_items.size()), 1, [&](int64_t lo, int64_t hi) {
      std::vector<const float*> xsp, xsump, xdp;
      std::vector<float*> outp;
      for (int64_t j = lo; j < hi; ++j) {
        const Item it = up_items[j];
        const Seg& sg = segs[it.seg];
        const int e = sg.e, i = it.i, b = static_cast<int>(bits[i]);
        const int n = sizes[e * NB + i];
        const int count = sg.p1 - sg.p0;
        xsp.resize(count);
        xsump.resize(count);
        outp.resize(count);
        xdp.resize(count);
        for (int c = 0; c < count; ++c) {
          const int64_t l = sg.p0 - base + c;
          xsp[c] = &xs[l * xs_stride + xs_off[i]];
          xsump[c] = &xsum[l * ng_h];
          outp[c] = &gu[l * gu_stride + gu_off[i]];
          if (sg.dot) xdp[c] = reinterpret_cast<const float*>(&xd[l * xd_stride + i * nblk_h * (BLOCK / 2)]);
        }
        const int64_t ld = w13q[i].size(1);
        const int64_t col = 2 * static_cast<int64_t>(coff[e * NB + i]) + it.c0;
        const int ncols = std::min(TILE_COLS, 2 * n - it.c0);
        run_tile(b, w13q[i].data_ptr<int32_t>() + col, ld, w13s[i].data_ptr<at::Half>() + col,
                 w13z[i].data_ptr<at::Half>() + col, ld, H, G, ncols, count, xsp.data(), xsump.data(),
                 outp.data(), it.c0, sg.dot ? xdp.data() : nullptr);
      }
    });

    // Phase 2: SiLU(gate) * up per slab, then its prescaled form and group sums (the down GEMV's x).
    at::parallel_for(0, np, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        if (!pair_live[j]) continue;
        const int e = pair_expert[base + j];
        for (int i = 0; i < NB; ++i) {
          const int n = sizes[e * NB + i];
          if (n == 0) continue;
          const float* g = &gu[j * gu_stride + gu_off[i]];
          float* a = &act[j * act_stride + act_off[i]];
          for (int c = 0; c < n; ++c) a[c] = silu(g[c]) * g[n + c];
          prescale(a, n, static_cast<int>(bits[i]), &as[j * as_stride + as_off[i]]);
          group_sums(a, n, G, &asum[j * asum_stride + asum_off[i]]);
        }
      }
    });

    // Phase 3: down projection; one item = one segment's column tile over all its slabs.
    at::parallel_for(0, static_cast<int64_t>(down_items.size()), 1, [&](int64_t lo, int64_t hi) {
      std::vector<const float*> xsp, xsump;
      std::vector<float*> outp;
      for (int64_t j = lo; j < hi; ++j) {
        const Item it = down_items[j];
        const Seg& sg = segs[it.seg];
        const int e = sg.e;
        const int count = sg.p1 - sg.p0;
        const int ncols = std::min(TILE_COLS, H - it.c0);
        xsp.resize(count);
        xsump.resize(count);
        outp.resize(count);
        for (int i = 0; i < NB; ++i) {
          const int n = sizes[e * NB + i];
          if (n == 0) continue;
          const int b = static_cast<int>(bits[i]);
          for (int c = 0; c < count; ++c) {
            const int64_t l = sg.p0 - base + c;
            xsp[c] = &as[l * as_stride + as_off[i]];
            xsump[c] = &asum[l * asum_stride + asum_off[i]];
            outp[c] = &ye[l * H];
          }
          const int64_t row = roff[e * NB + i], grp = goff[e * NB + i];
          run_tile(b, w2q[i].data_ptr<int32_t>() + row * H + it.c0, H,
                   w2s[i].data_ptr<at::Half>() + grp * H + it.c0, w2z[i].data_ptr<at::Half>() + grp * H + it.c0,
                   H, n, G, ncols, count, xsp.data(), xsump.data(), outp.data(), it.c0);
        }
      }
    });

    // Phase 4: out[t] += w * ye, in pair order (deterministic).
    for (int j = 0; j < np; ++j) {
      if (!pair_live[j]) continue;
      float* o = op + static_cast<int64_t>(pair_token[base + j]) * H;
      const float* y = &ye[static_cast<int64_t>(j) * H];
      const float w = pair_weight[base + j];
      for (int c = 0; c < H; ++c) o[c] += w * y[c];
    }
    s0 = s1;
  }
  return out;
}

// The instruction-set macros this build was compiled with (the tests check the avx2 variant).
static std::vector<std::string> compiled_isa() {
  std::vector<std::string> out;
#if defined(__AVX2__)
  out.push_back("avx2");
#endif
#if defined(__FMA__)
  out.push_back("fma");
#endif
#if defined(__F16C__)
  out.push_back("f16c");
#endif
#if defined(__AVX512F__)
  out.push_back("avx512f");
#endif
#if defined(__AVX512BF16__)
  out.push_back("avx512bf16");
#endif
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_isa", &compiled_isa, "instruction-set macros defined when this build was compiled");
  m.def("slab_moe_forward", &slab_moe_forward, "CAMERA slab MoE layer on packed codes (CPU, fp32 math)");
}
