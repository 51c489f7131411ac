// Batched-decode 4/8-bit matmul on tensor cores with mma.sync (sm_75+), compiled at run time by NVRTC
// (ops/nvrtc.py; the Python side and the layout's reasoning: ops/matmul/qmma.py).
//
//   y[m, n] = sum_k x[m, k] * (q[k, n] - zf[g, n]) * sc[g, n],   g = k / group_size
//
// Operands as the GPTQ GEMV holds them: qw int32 [K / PACK, N] (code j of word (r, n) is input feature
// r * PACK + j), zf and sc fp16 [groups, N]. No header is included (NVRTC finds none on a bare wheel):
// halves travel as 16-bit integers and every half op is inline PTX.
//
// Compile-time: BITS (4 | 8), MT (x's rows in 8-row mma tiles: 1 | 2, or 4 | 8 with DQ), WARPS, STAGES (K chunks
// a thread has in flight), BF16 (x, y bfloat16: 4-bit codes, sm_80+), DQ (see below).
//
// A warp owns 64 output features: lane (g = lane / 4, t = lane % 4) owns features f_j = 4 g + j and
// 32 + 4 g + j - 4 (j < 4, j >= 4) of them. Per K chunk of SC = 4 * PACK features, it loads word row t of its 8
// features (two 16-byte loads, each a warp's 4 rows x 128 contiguous bytes), so every code it unpacks is an
// operand of its own mma fragment: tile i (i < 4) puts f_2i at fragment row g and f_2i+1 at row g + 8; the fragment's K
// order is a permutation of the chunk's (pairs of codes (j, j + PACK/2) share a half2); x's chunk is staged
// in shared memory in the same permutation, so the dot is unchanged. Codes enter the mma exact (0..255 as
// halves), the group's zero and scale are applied once per group in fp32: acc += sc * p - sc * zf * sum(x).
//
// DQ (17-64 rows, fp16): the fold's second set of accumulators would not fit beside 4-8 row tiles, so each
// code pair is made a weight pair before the mma instead, (q - zf) * sc = fma(q, sc, -zf * sc) in half2
// (one more instruction a pair, shared by every row tile), and the mma accumulates the sums directly. x's
// slice comes in as it is in memory (cp.async on sm_80+) and a lane puts its fragment in K order with prmt.

#ifndef BITS
#define BITS 4
#endif
#ifndef MT
#define MT 1
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef BF16
#define BF16 0
#endif
#ifndef DQ
#define DQ 0
#endif
#ifndef SPLITMAJ
#define SPLITMAJ DQ    // the split-K sum split-major (see its comment): DQ's; the fold's once it has been timed
#endif
#ifndef MINB
#define MINB 1         // blocks an SM must hold (caps registers)
#endif
#ifndef ASYNC
#define ASYNC 0        // sm_80+: chunks come through a per-warp shared-memory ring filled by cp.async
#endif
#ifndef RING
#define RING 6         // ASYNC: chunks in flight per warp
#endif
#if ASYNC && __CUDA_ARCH__ < 800
#undef ASYNC
#define ASYNC 0        // no cp.async before sm_80: the register pipeline
#endif
#ifndef PERSIST
#define PERSIST 0      // ASYNC: a block takes column blocks blockIdx.x, + gridDim.x, ... of its K split (see the main loop)
#endif
#if PERSIST && !ASYNC
#undef PERSIST
#define PERSIST 0      // the register pipeline keeps one column block a block
#endif
#ifndef ZROW
#define ZROW 0         // 1: zf is one row [1, N] for every group (a layer with one zero a column: formats/gptq.py)
#endif
#define ZOFF(grow, N) (ZROW ? 0 : (grow) * (N))
#ifndef PDL
#define PDL 0          // ops/pdl.py's release modes: 0 plain launch, 1 after the main loop, 2 after the wait, 3 before it
#endif

#define PACK (32 / BITS)
#define SC (4 * PACK)          // K features per chunk: 4 lanes x PACK codes
#define KSTEPS (PACK / 4)      // k16 mma steps per chunk
#define XR (8 * MT)            // x rows staged (rows >= M are zeros; with DQ, left unset: their outputs are dropped)

typedef unsigned int u32;
typedef unsigned short u16;

struct Stage {
  u32 w[8];   // word row t of features f_0..f_7
  u32 s[4];   // their scales (8 halves), loaded for the chunk that ends a group
  u32 z[4];   // their float zeros (8 halves), likewise
};

__device__ __forceinline__ void ld16(const void* p, u32* r) {
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

__device__ __forceinline__ void ld8(const void* p, u32* r) {
  asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "l"(p));
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {  // bytes of {b, a} picked by sel's nibbles
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ float fp16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float h2f(u16 h) {  // one of x's halves
#if BF16
  return __uint_as_float(((u32)h) << 16);
#else
  return fp16_to_f32(h);
#endif
}

__device__ __forceinline__ float f16f(u32 v, int hi) {  // scales and zeros are fp16 whatever x is
  return fp16_to_f32((u16)(hi ? v >> 16 : v & 0xffff));
}

__device__ __forceinline__ u16 f2h(float f) {
  u16 h;
#if BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}

// two codes (bits [sh, sh + BITS) of each 16-bit half of w) as exact halves: OR-ed into the mantissa of
// 1024 (fp16) or 128 (bf16, 4-bit codes only), that base then taken off with one fma
__device__ __forceinline__ u32 codes2(u32 w, int sh) {
  const u32 mask = (1u << BITS) - 1;
  u32 v = (w >> sh) & (mask | (mask << 16));
  u32 r;
#if BF16
  v |= 0x43004300u;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3f803f80u), "r"(0xc300c300u));
#else
  v |= 0x64006400u;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3c003c00u), "r"(0xe400e400u));
#endif
  return r;
}

// c += A (16 x 16, row) * B (16 x 8, col); sm_75 has m16n8k8 only: two of them, K halves in order
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
#if BF16
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
#else
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(b0));
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a2), "r"(a3), "r"(b1));
#endif
}

__device__ __forceinline__ void load_stage(Stage& st, const u32* qw, const u16* zf, const u16* sc, long row,
                                           long grow, int N, int na, int nb, bool oka, bool okb, bool ends) {
#pragma unroll
  for (int j = 0; j < 8; ++j) st.w[j] = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) st.s[j] = st.z[j] = 0;
  if (oka) {
    ld16(qw + row * N + na, st.w);
    if (ends) {
      ld8(sc + grow * N + na, st.s);
      ld8(zf + ZOFF(grow, N) + na, st.z);
    }
  }
  if (okb) {
    ld16(qw + row * N + nb, st.w + 4);
    if (ends) {
      ld8(sc + grow * N + nb, st.s + 2);
      ld8(zf + ZOFF(grow, N) + nb, st.z + 2);
    }
  }
}

#if ASYNC
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

__device__ __forceinline__ void cp16(u32 dst, const void* src, bool ok) {  // zero-filled when !ok
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void cp8(u32 dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(ok ? 8 : 0));
}

// a ring slot is 4 pieces of 16 bytes a lane, stored piece-major ([piece][lane]) so that each 16-byte read
// of 8 lanes covers 128 contiguous bytes: words of f_0..3, words of f_4..7, scales, zeros
__device__ __forceinline__ void ring_issue(u32 slot, const u32* qw, const u16* zf, const u16* sc, long row, long grow,
                                           int N, int na, int nb, bool oka, bool okb, bool ends) {
  cp16(slot, qw + (oka ? row * N + na : 0), oka);
  cp16(slot + 512, qw + (okb ? row * N + nb : 0), okb);
  if (ends) {
    cp8(slot + 1024, sc + (oka ? grow * N + na : 0), oka);
    cp8(slot + 1024 + 8, sc + (okb ? grow * N + nb : 0), okb);
    cp8(slot + 1536, zf + (oka ? ZOFF(grow, N) + na : 0), oka);
    cp8(slot + 1536 + 8, zf + (okb ? ZOFF(grow, N) + nb : 0), okb);
  }
  asm volatile("cp.async.commit_group;");
}

__device__ __forceinline__ void lds16(u32 addr, u32* r) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
#endif

struct F8 {
  float v[8];
};

// a lane's 8 sums of output row (mt, h), in feature order f_0..f_7 (f_j sits in acc[j / 2][mt][2 (j % 2) + h])
__device__ __forceinline__ F8 row8(const float (&acc)[4][MT][4], int mt, int h) {
  F8 r;
#pragma unroll
  for (int j = 0; j < 8; ++j) r.v[j] = acc[j >> 1][mt][2 * (j & 1) + h];
  return r;
}

// f_0..3 at row[na..], f_4..7 at row[nb..], in x's dtype
__device__ __forceinline__ void store8(u16* row, int na, int nb, bool okb, const float* v) {
  u32 o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = (u32)f2h(v[2 * i]) | ((u32)f2h(v[2 * i + 1]) << 16);
  *(uint2*)(row + na) = make_uint2(o[0], o[1]);
  if (okb) *(uint2*)(row + nb) = make_uint2(o[2], o[3]);
}

// adds one split's partial sums of a row (features f_0..3 at src[na..], f_4..7 at src[nb..]) into o
__device__ __forceinline__ void add_partials(float* o, const float* src, int na, int nb, bool okb) {
  float4 a = __ldcg((const float4*)(src + na));
  o[0] += a.x; o[1] += a.y; o[2] += a.z; o[3] += a.w;
  if (okb) {
    float4 b = __ldcg((const float4*)(src + nb));
    o[4] += b.x; o[5] += b.y; o[6] += b.z; o[7] += b.w;
  }
}

// one chunk: x's b fragments from shared memory, 4 x KSTEPS mmas a row tile, and the group's fold where it ends
// (DQ: the codes made weights first, the mmas straight into acc, no fold)
__device__ __forceinline__ void chunk(const Stage& cur, int c, int k, int k_hi, int group_size, int g, int t,
                                      const u16* xsh, int XS, const float* csum, float (&acc)[4][MT][4],
                                      float (&p)[4][MT][4], float (&xg)[MT][2]) {
  // x's b fragments: row mt * 8 + g, this lane's PACK halves of the chunk; DQ's slice lies as in memory
  // (features 0..PACK, two a word), so register j takes features j and j + PACK / 2 here
  u32 b[MT][PACK / 2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const u32* src = (const u32*)(xsh + (mt * 8 + g) * XS + c * SC + t * PACK);
#if BITS == 4
    uint4 v = *(const uint4*)src;
#if DQ
    b[mt][0] = prmt(v.x, v.z, 0x5410); b[mt][1] = prmt(v.x, v.z, 0x7632);
    b[mt][2] = prmt(v.y, v.w, 0x5410); b[mt][3] = prmt(v.y, v.w, 0x7632);
#else
    b[mt][0] = v.x; b[mt][1] = v.y; b[mt][2] = v.z; b[mt][3] = v.w;
#endif
#else
    uint2 v = *(const uint2*)src;
#if DQ
    b[mt][0] = prmt(v.x, v.y, 0x5410); b[mt][1] = prmt(v.x, v.y, 0x7632);
#else
    b[mt][0] = v.x; b[mt][1] = v.y;
#endif
#endif
#if !DQ
    float2 cs = *(const float2*)(csum + c * XR + mt * 8 + 2 * t);
    xg[mt][0] += cs.x;
    xg[mt][1] += cs.y;
#endif
  }
#if DQ
  u32 s2[8], nzs2[8];  // feature f_j's (sc, sc) and (-zf * sc, -zf * sc)
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    u32 sh = (j & 1) ? cur.s[j >> 1] >> 16 : cur.s[j >> 1] & 0xffff;
    u32 nz = f2h(-f16f(cur.z[j >> 1], j & 1) * f16f(cur.s[j >> 1], j & 1));
    s2[j] = sh | (sh << 16);
    nzs2[j] = nz | (nz << 16);
  }
#define WEIGHTS(f, v) hfma2(v, s2[f], nzs2[f])
  float (&sums)[4][MT][4] = acc;
#else
#define WEIGHTS(f, v) (v)
  float (&sums)[4][MT][4] = p;
#endif
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      // k16 step ks takes code pairs 2 ks and 2 ks + 1: shifts (2 ks) * BITS and (2 ks + 1) * BITS
      u32 a0 = WEIGHTS(2 * i, codes2(cur.w[2 * i], (2 * ks) * BITS));
      u32 a1 = WEIGHTS(2 * i + 1, codes2(cur.w[2 * i + 1], (2 * ks) * BITS));
      u32 a2 = WEIGHTS(2 * i, codes2(cur.w[2 * i], (2 * ks + 1) * BITS));
      u32 a3 = WEIGHTS(2 * i + 1, codes2(cur.w[2 * i + 1], (2 * ks + 1) * BITS));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma(sums[i][mt], a0, a1, a2, a3, b[mt][2 * ks], b[mt][2 * ks + 1]);
    }
  }
#undef WEIGHTS
#if DQ
  return;
#endif
  const int kend = k + SC;
  if (kend % group_size == 0 || kend >= k_hi) {  // the group ends here: fold its zero and scale in
    float s[8], sz[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j] = f16f(cur.s[j >> 1], j & 1);
      sz[j] = s[j] * f16f(cur.z[j >> 1], j & 1);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float x0 = xg[mt][0], x1 = xg[mt][1];
      xg[mt][0] = xg[mt][1] = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          int j = 2 * i + (r >> 1);
          acc[i][mt][r] += s[j] * p[i][mt][r] - sz[j] * ((r & 1) ? x1 : x0);
          p[i][mt][r] = 0.f;
        }
      }
    }
  }
}

// a column block's outputs: y straight from acc (one split), or acc as split `split`'s partials; the block that
// finishes the column block (tile) last adds every split's partials in split order (deterministic) into y and
// puts the tile's counter back to 0. last: a shared int
__device__ __forceinline__ void tile_out(const float (&acc)[4][MT][4], u16* __restrict__ y, float* __restrict__ part,
                                         int* __restrict__ cnt, int* last, int tile, int M, int N, int na, int nb,
                                         bool oka, bool okb, int split, int nsplit, int tid, int t) {
  // this lane's outputs: features f_j (j = 2 i + r / 2), rows mt * 8 + 2 t + r % 2
  if (nsplit == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int m = mt * 8 + 2 * t + h;
        if (m < M && oka) store8(y + (long)m * N, na, nb, okb, row8(acc, mt, h).v);
      }
    return;
  }
  // split K: partials [nsplit, M, N] fp32; the block that finishes a column block last adds them in split
  // order (deterministic) and puts the counter back to 0
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int m = mt * 8 + 2 * t + h;
      if (m < M && oka) {
        F8 v = row8(acc, mt, h);
        float* dst = part + ((long)split * M + m) * N;
        *(float4*)(dst + na) = make_float4(v.v[0], v.v[1], v.v[2], v.v[3]);
        if (okb) *(float4*)(dst + nb) = make_float4(v.v[4], v.v[5], v.v[6], v.v[7]);
      }
    }
  __threadfence();
  __syncthreads();
  if (tid == 0) *last = atomicAdd(cnt + tile, 1) == nsplit - 1;
  __syncthreads();
  if (!*last) return;
  __threadfence();
#if SPLITMAJ
  // split-major, every row's loads of a few splits in flight (a row-by-row sum waits out rows x splits / 4 L2
  // round trips: 13 us of a 24 us 16-row layer at 16 splits, docs/decisions/026-mma-sync-decode.md)
  float tot[MT][2][8];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 8; ++j) tot[mt][h][j] = 0.f;
#pragma unroll(MT > 2 ? 2 : 4)
  for (int s = 0; s < nsplit; ++s) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int m = mt * 8 + 2 * t + h;
        if (m < M && oka) add_partials(tot[mt][h], part + ((long)s * M + m) * N, na, nb, okb);
      }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int m = mt * 8 + 2 * t + h;
      if (m < M && oka) store8(y + (long)m * N, na, nb, okb, tot[mt][h]);
    }
#else
  // row by row (ptxas unrolls the split loop by 4)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int m = mt * 8 + 2 * t + h;
      if (m < M && oka) {
        float tot[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) tot[j] = 0.f;
        for (int s = 0; s < nsplit; ++s) add_partials(tot, part + ((long)s * M + m) * N, na, nb, okb);
        store8(y + (long)m * N, na, nb, okb, tot);
      }
    }
#endif
  if (tid == 0) atomicExch(cnt + tile, 0);
}

#if DQ && BF16
#error "DQ makes fp16 weights: fp16 x only"
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)
qmma_kernel(const u16* __restrict__ x, const u32* __restrict__ qw, const u16* __restrict__ zf,
            const u16* __restrict__ sc, u16* __restrict__ y, float* __restrict__ part, int* __restrict__ cnt,
            int M, int N, int K, int stride_xm, int k_per_split, int group_size) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int na = blockIdx.x * (WARPS * 64) + warp * 64 + 4 * g, nb = na + 32;  // features f_0..3, f_4..7
  const bool oka = na < N, okb = nb < N;  // N % 8 == 0: all four or none
  const int split = blockIdx.y, nsplit = gridDim.y;
  const int k_lo = split * k_per_split;
  const int k_hi = min(k_lo + k_per_split, K);
  const int nch = (k_hi - k_lo) / SC;
  // x's rows in shared memory, row stride XS halves with 2 * XS = 2 * SC (mod 128): the 8 lanes of a 16-byte
  // load phase (two rows, four 16-byte pieces each) hit distinct banks
  const int xs_pad = ((2 * SC - (2 * k_per_split) % 128) + 128) % 128 / 2;
  const int XS = k_per_split + xs_pad;
  u16* xsh = (u16*)smem;
  float* csum = (float*)(smem + ((XR * XS * 2 + 15) / 16) * 16);  // [nch][XR]: each chunk's sum of x per row

  // the first chunks of weights asked for before anything an earlier kernel wrote is read
#define ENDS(k) (DQ || ((k) + SC) % group_size == 0 || (k) + SC >= k_hi)  // DQ: every chunk's scales
#if ASYNC
  // a lane's chunk from its ring slot, the scales and zeros only where the chunk ends a group (a macro: as a
  // function it changed the default builds' code)
#define RING_READ(cur, slot, k)    \
  lds16(slot, cur.w);              \
  lds16(slot + 512, cur.w + 4);    \
  if (ENDS(k)) {                   \
    lds16(slot + 1024, cur.s);     \
    lds16(slot + 1536, cur.z);     \
  }
  const int xbytes = ((XR * XS * 2 + 15) / 16) * 16 + (DQ ? 0 : ((nch * XR * 4 + 15) / 16) * 16);  // DQ: no csum
  const u32 ring = smem_addr(smem + xbytes) + (warp * RING * 2048) + lane * 16;
#if PERSIST
  // item it = (this block's column block it / nch, chunk it % nch of the slice); the ring runs on across column
  // blocks, so the next one's first chunks are in flight while this one's last are added up and stored
  const int tiles = (N + WARPS * 64 - 1) / (WARPS * 64);
  const int items = (tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x * nch;
  auto issue = [&](int it) {
    if (it < items) {
      const int ti = it / nch, kn = k_lo + (it - ti * nch) * SC;
      const int a = ((int)blockIdx.x + ti * (int)gridDim.x) * (WARPS * 64) + warp * 64 + 4 * g;
      ring_issue(ring + (it % RING) * 2048, qw, zf, sc, kn / PACK + t, kn / group_size, N, a, a + 32, a < N,
                 a + 32 < N, ENDS(kn));
    } else {
      asm volatile("cp.async.commit_group;");
    }
  };
#pragma unroll
  for (int u = 0; u < RING - 1; ++u) issue(u);
#else
#pragma unroll
  for (int u = 0; u < RING - 1; ++u) {
    int k = k_lo + u * SC;
    if (u < nch) ring_issue(ring + u * 2048, qw, zf, sc, k / PACK + t, k / group_size, N, na, nb, oka, okb, ENDS(k));
    else asm volatile("cp.async.commit_group;");
  }
#endif
#else
  Stage st[STAGES];
#pragma unroll
  for (int u = 0; u < STAGES; ++u) {
    int k = k_lo + u * SC;
    if (u < nch) load_stage(st[u], qw, zf, sc, k / PACK + t, k / group_size, N, na, nb, oka, okb, ENDS(k));
  }
#endif
#if __CUDA_ARCH__ >= 900 && PDL == 3
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#if __CUDA_ARCH__ >= 900 && PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if __CUDA_ARCH__ >= 900 && PDL == 2
  asm volatile("griddepcontrol.launch_dependents;");
#endif

#if DQ
  // x[:, k_lo:k_hi] as in memory, rows < M (16 bytes a copy; all in flight at once through cp.async on sm_80+)
  {
    const int segs = (k_hi - k_lo) / 8, mr = min(M, XR);
#if ASYNC
    const u32 xa = smem_addr(xsh);
    for (int idx = tid; idx < mr * segs; idx += WARPS * 32) {
      int r = idx / segs, q = idx - r * segs;
      cp16(xa + (r * XS + q * 8) * 2, x + (long)r * stride_xm + k_lo + q * 8, true);
    }
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group 0;");
#else
    for (int idx = tid; idx < mr * segs; idx += WARPS * 32) {
      int r = idx / segs, q = idx - r * segs;
      *(uint4*)(xsh + r * XS + q * 8) = *(const uint4*)(x + (long)r * stride_xm + k_lo + q * 8);
    }
#endif
  }
  __syncthreads();
#else
  // stage x[:, k_lo:k_hi] in the fragment's K order: within each run of PACK features, position p holds
  // feature (p >> 1) + (p & 1) * PACK / 2, so a lane's PACK halves are its b-fragment registers in order;
  // an item is one row's chunk (4 runs), whose sum goes to csum
  for (int idx = tid; idx < XR * nch; idx += WARPS * 32) {
    int r = idx / nch, c = idx - r * nch;
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      u32 e[PACK / 2], v[PACK / 2];
#pragma unroll
      for (int j = 0; j < PACK / 2; ++j) e[j] = 0;
      if (r < M) {
        const u16* src = x + (long)r * stride_xm + k_lo + c * SC + q * PACK;
#if BITS == 4
        uint4 l = *(const uint4*)src;
        e[0] = l.x; e[1] = l.y; e[2] = l.z; e[3] = l.w;
#else
        uint2 l = *(const uint2*)src;
        e[0] = l.x; e[1] = l.y;
#endif
      }
      // e[j] holds features 2j, 2j + 1; v[j] takes features j and j + PACK / 2
#pragma unroll
      for (int j = 0; j < PACK / 2; ++j) {
        u32 lo = e[j / 2], hi = e[(j + PACK / 2) / 2];
        u32 a = (j & 1) ? lo >> 16 : lo & 0xffff, bb = (j & 1) ? hi >> 16 : hi & 0xffff;
        v[j] = a | (bb << 16);
        sum += h2f((u16)a) + h2f((u16)bb);
      }
      u32* dst = (u32*)(xsh + r * XS + c * SC + q * PACK);
#if BITS == 4
      *(uint4*)dst = make_uint4(v[0], v[1], v[2], v[3]);
#else
      *(uint2*)dst = make_uint2(v[0], v[1]);
#endif
    }
    csum[c * XR + r] = sum;
  }
  __syncthreads();
#endif

  float acc[4][MT][4], p[4][MT][4], xg[MT][2];  // xg: the group's sum of x so far, rows 2 t, 2 t + 1
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][mt][r] = p[i][mt][r] = 0.f;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xg[mt][0] = xg[mt][1] = 0.f;

  __shared__ int last;
#if PERSIST
  for (int it = 0; it < items; ++it) {
    issue(it + RING - 1);
    asm volatile("cp.async.wait_group %0;" ::"n"(RING - 1));
    const int ti = it / nch, c = it - ti * nch, k = k_lo + c * SC;
    Stage cur;
    const u32 slot = ring + (it % RING) * 2048;
    RING_READ(cur, slot, k);
    chunk(cur, c, k, k_hi, group_size, g, t, xsh, XS, csum, acc, p, xg);
    if (c == nch - 1) {  // the column block's slice is done (p and xg are zero: its last chunk ended a group)
      const int tile = (int)blockIdx.x + ti * (int)gridDim.x;
      const int a = tile * (WARPS * 64) + warp * 64 + 4 * g;
      tile_out(acc, y, part, cnt, &last, tile, M, N, a, a + 32, a < N, a + 32 < N, split, nsplit, tid, t);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][mt][r] = 0.f;
    }
  }
  asm volatile("cp.async.wait_group 0;");
#elif ASYNC
  for (int c = 0; c < nch; ++c) {
    const int k = k_lo + c * SC;
    {
      int cn = c + RING - 1, kn = k + (RING - 1) * SC;
      if (cn < nch) ring_issue(ring + (cn % RING) * 2048, qw, zf, sc, kn / PACK + t, kn / group_size, N, na, nb, oka,
                               okb, ENDS(kn));
      else asm volatile("cp.async.commit_group;");
    }
    asm volatile("cp.async.wait_group %0;" ::"n"(RING - 1));
    Stage cur;
    const u32 slot = ring + (c % RING) * 2048;
    RING_READ(cur, slot, k);
    chunk(cur, c, k, k_hi, group_size, g, t, xsh, XS, csum, acc, p, xg);
  }
  asm volatile("cp.async.wait_group 0;");
#else
  for (int c0 = 0; c0 < nch; c0 += STAGES) {
#pragma unroll
    for (int u = 0; u < STAGES; ++u) {
      const int c = c0 + u;
      if (c < nch) {
        Stage cur = st[u];
        const int k = k_lo + c * SC;
        if (c + STAGES < nch) {
          int kn = k + STAGES * SC;
          load_stage(st[u], qw, zf, sc, kn / PACK + t, kn / group_size, N, na, nb, oka, okb, ENDS(kn));
        }
        chunk(cur, c, k, k_hi, group_size, g, t, xsh, XS, csum, acc, p, xg);
      }
    }
  }
#endif
#if __CUDA_ARCH__ >= 900 && PDL == 1
  asm volatile("griddepcontrol.launch_dependents;");
#endif

#if !PERSIST
  tile_out(acc, y, part, cnt, &last, blockIdx.x, M, N, na, nb, oka, okb, split, nsplit, tid, t);
#endif
}
