"""Hand-written CUDA kernels for the sparse and linear attention ops
(`local_attention`, `block_sparse_attention`, `linear_attention`:
tensorc/ops/sparse_attention.py). Same conventions as kernels.py: CUDA C without any
#include, templates on the head dims behind plain `extern "C"` entries, float32
compute, operands read through (batch, head, position) element strides.
"""

from __future__ import annotations

import math

import numpy as np

from tensorc.ops.sparse_attention import pattern

from .kernels import (
    FA_ROWS_PER_WARP,
    MAX_GRID_Y,
    MAX_HEAD_DIM,
    PRELUDE,
    Launch,
    LibraryKernel,
    _elem_strides,
    flash_warps,
)

# Sparse attention: the flash kernel's online softmax (kernels.py), but a block owns
# one row *chunk*: at most WARPS * 4 query rows of one row group of the pattern, with
# the group's key intervals. The host spells the pattern out as two int64 tables:
# intervals (lo, hi, banded) and chunks (i0, i1, iv0, iv1), chunk c covering rows
# i0 <= i < i1 with intervals iv0 <= iv < iv1. The block walks only the key tiles of
# its intervals, each cut to the keys its rows can reach (the window of a banded one,
# j < i1 when causal). Per (row, key): the user mask as in the flash kernel (keep
# false -> mask_value, bias added), then a pair the pattern does not keep (outside
# the band, off the dilation, j > i when causal) is -inf: it gets no weight whatever
# mask_value is, as in the reference. A row without any visible key gives 0/0 = NaN,
# as the reference does.
SPARSE_ATTENTION = r"""
#ifndef TC_SPARSE_ATTENTION
#define TC_SPARSE_ATTENTION
#define SA_TILE_N 32
#define SA_ROWS_PER_WARP 4

struct tc_sparse_args {
    const float* q; const float* k; const float* v; float* o;
    const unsigned char* keep; const float* bias;
    const tc_i64* intervals; const tc_i64* chunks;
    tc_i64 q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss;
    tc_i64 m_sb, m_sh, m_sq, m_sk;
    tc_i64 before, after;            // the band; 1 << 62 when it does not cut
    int heads, group, sq, sk, causal, dilation;
    float scale, mask_value;
};

template <int D, int DV, int WARPS>
__device__ __forceinline__ void tc_sparse_attention(const tc_sparse_args& a) {
    constexpr int OC = (DV + 31) / 32;
    constexpr int BM = WARPS * SA_ROWS_PER_WARP;
    __shared__ float q_s[BM][D];
    __shared__ float k_s[SA_TILE_N][D + 1];
    __shared__ float v_s[SA_TILE_N][DV];
    __shared__ float p_s[WARPS][SA_ROWS_PER_WARP][SA_TILE_N];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
    const tc_i64* chunk = a.chunks + 4 * (tc_i64)blockIdx.x;
    const int i0 = (int)chunk[0], i1 = (int)chunk[1];
    const int iv0 = (int)chunk[2], iv1 = (int)chunk[3];
    const float* qp = a.q + b * a.q_sb + h * a.q_sh;
    const int hkv = h / a.group;
    const float* kp = a.k + b * a.k_sb + hkv * a.k_sh;
    const float* vp = a.v + b * a.v_sb + hkv * a.v_sh;
    const tc_i64 m_base = b * a.m_sb + h * a.m_sh;

    for (int t = threadIdx.x; t < BM * D; t += blockDim.x) {
        int r = t / D, d = t % D, i = i0 + r;
        q_s[r][d] = i < i1 ? qp[i * a.q_ss + d] * a.scale : 0.0f;
    }
    float m[SA_ROWS_PER_WARP], l[SA_ROWS_PER_WARP], acc[SA_ROWS_PER_WARP][OC];
    _Pragma("unroll") for (int r = 0; r < SA_ROWS_PER_WARP; ++r) {
        m[r] = -TC_INF;
        l[r] = 0.0f;
        _Pragma("unroll") for (int c = 0; c < OC; ++c) acc[r][c] = 0.0f;
    }
    const int row0 = warp * SA_ROWS_PER_WARP;
    for (int iv = iv0; iv < iv1; ++iv) {
        const tc_i64* it = a.intervals + 3 * (tc_i64)iv;
        tc_i64 lo = it[0], hi = it[1];
        const int banded = (int)it[2];
        if (banded) {                             // keys no row of the chunk reaches
            tc_i64 first = (tc_i64)i0 - a.before, end = (tc_i64)i1 + a.after;
            lo = first > lo ? first : lo;
            hi = end < hi ? end : hi;
        }
        if (a.causal && hi > i1) hi = i1;
        for (tc_i64 n0 = lo; n0 < hi; n0 += SA_TILE_N) {
            __syncthreads();                      // previous tile fully consumed
            for (int t = threadIdx.x; t < SA_TILE_N * D; t += blockDim.x) {
                int j = t / D, d = t % D;
                k_s[j][d] = n0 + j < hi ? kp[(n0 + j) * a.k_ss + d] : 0.0f;
            }
            for (int t = threadIdx.x; t < SA_TILE_N * DV; t += blockDim.x) {
                int j = t / DV, d = t % DV;
                v_s[j][d] = n0 + j < hi ? vp[(n0 + j) * a.v_ss + d] : 0.0f;
            }
            __syncthreads();
            const tc_i64 j = n0 + lane;           // this lane's key
            float s[SA_ROWS_PER_WARP];
            _Pragma("unroll") for (int r = 0; r < SA_ROWS_PER_WARP; ++r) s[r] = 0.0f;
            _Pragma("unroll 8") for (int d = 0; d < D; ++d) {
                float kv = k_s[lane][d];
                _Pragma("unroll")
                for (int r = 0; r < SA_ROWS_PER_WARP; ++r) s[r] += q_s[row0 + r][d] * kv;
            }
            _Pragma("unroll") for (int r = 0; r < SA_ROWS_PER_WARP; ++r) {
                const int i = i0 + row0 + r;
                float sv = -TC_INF;               // tile padding and rows past the chunk
                if (j < hi && i < i1) {
                    sv = s[r];
                    tc_i64 mi = m_base + (tc_i64)i * a.m_sq + j * a.m_sk;
                    if (a.keep && !a.keep[mi]) sv = a.mask_value;
                    if (a.bias) sv += a.bias[mi];
                    const tc_i64 di = (tc_i64)i - j;
                    bool seen = !a.causal || di >= 0;
                    if (banded)
                        seen = seen && di <= a.before && -di <= a.after && di % a.dilation == 0;
                    if (!seen) sv = -TC_INF;
                }
                float m_new = fmaxf(m[r], tc_warp_max(sv));
                float p = m_new == -TC_INF ? 0.0f : expf(sv - m_new);
                float alpha = m_new == -TC_INF ? 1.0f : expf(m[r] - m_new);
                l[r] = l[r] * alpha + tc_warp_sum(p);
                m[r] = m_new;
                _Pragma("unroll") for (int c = 0; c < OC; ++c) acc[r][c] *= alpha;
                p_s[warp][r][lane] = p;
            }
            __syncwarp();
            for (int jj = 0; jj < SA_TILE_N; ++jj) {
                float pj[SA_ROWS_PER_WARP];
                _Pragma("unroll")
                for (int r = 0; r < SA_ROWS_PER_WARP; ++r) pj[r] = p_s[warp][r][jj];
                _Pragma("unroll") for (int c = 0; c < OC; ++c) {
                    const int d = lane + 32 * c;
                    if (d < DV) {
                        const float vv = v_s[jj][d];
                        _Pragma("unroll")
                        for (int r = 0; r < SA_ROWS_PER_WARP; ++r) acc[r][c] += pj[r] * vv;
                    }
                }
            }
            __syncwarp();                         // p_s read before the next tile's writes
        }
    }
    _Pragma("unroll") for (int r = 0; r < SA_ROWS_PER_WARP; ++r) {
        const int i = i0 + row0 + r;
        if (i >= i1) continue;
        float* op = a.o + b * a.o_sb + h * a.o_sh + (tc_i64)i * a.o_ss;
        _Pragma("unroll") for (int c = 0; c < OC; ++c) {
            int d = lane + 32 * c;
            if (d < DV) op[d] = acc[r][c] / l[r];
        }
    }
}
#endif
"""

SPARSE_PARAMS = (
    [("const float*", n) for n in ("q", "k", "v")] + [("float*", "o"),
     ("const unsigned char*", "keep"), ("const float*", "bias"),
     ("const tc_i64*", "intervals"), ("const tc_i64*", "chunks")]
    + [("tc_i64", f"{t}_s{x}") for t in "qkvo" for x in "bhs"]
    + [("tc_i64", f"m_s{x}") for x in ("b", "h", "q", "k")]
    + [("tc_i64", "before"), ("tc_i64", "after")]
    + [("int", n) for n in ("heads", "group", "sq", "sk", "causal", "dilation")]
    + [("float", "scale"), ("float", "mask_value")])

_ENTRY = """
extern "C" __global__ void __launch_bounds__({threads})
{name}({params}) {{
    {struct} a = {{{fields}}};
    {call}(a);
}}
"""


def _entry(name, params, struct, call, threads) -> str:
    return _ENTRY.format(name=name, threads=threads, struct=struct, call=call,
                         params=", ".join(f"{t} {n}" for t, n in params),
                         fields=", ".join(n for _, n in params))


def sparse_attention_kernel(head_dim: int, value_dim: int) -> LibraryKernel:
    name = f"tc_sparse_attention_d{head_dim}_v{value_dim}"
    warps = flash_warps(head_dim, value_dim)
    entry = _entry(name, SPARSE_PARAMS, "tc_sparse_args",
                   f"tc_sparse_attention<{head_dim}, {value_dim}, {warps}>", 32 * warps)
    return LibraryKernel(name, PRELUDE + SPARSE_ATTENTION + entry, tuple(SPARSE_PARAMS))


def sparse_tables(pat, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The pattern as the kernel's int64 tables: intervals [n, 3] (lo, hi, banded) and
    row chunks [c, 4] (i0, i1, iv0, iv1) of at most `rows` rows within one group."""
    intervals, chunks = [], []
    for i0, i1, ivs in pat.groups:
        iv0 = len(intervals)
        intervals += [(lo, hi, int(banded)) for lo, hi, banded in ivs]
        chunks += [(r0, min(i1, r0 + rows), iv0, len(intervals))
                   for r0 in range(i0, i1, rows)]
    return (np.array(intervals, np.int64).reshape(-1, 3),
            np.array(chunks, np.int64).reshape(-1, 4))


def _check_heads(q, k, v, what: str):
    b, h, _, d = (int(n) for n in q.shape)
    dv, hk = int(v.shape[3]), int(k.shape[1])
    if hk == 0 or h % hk or int(v.shape[1]) != hk:
        raise ValueError(f"{what} kernel: k/v heads {k.shape[1]} do not divide q heads {h}")
    if max(d, dv) > MAX_HEAD_DIM or b * h > MAX_GRID_Y:
        raise ValueError(f"{what} kernel takes head dims <= {MAX_HEAD_DIM} and "
                         f"batch * heads <= {MAX_GRID_Y}, got q {q.shape}, v {v.shape}")


def sparse_attention_tables(op: str, q, k, v, causal: bool = False, **attrs):
    """(pattern, intervals, chunks) for `sparse_attention_launch`: the op's pattern and
    its tables, flat int64, chunked by the kernel's rows per block. Pure host work
    (Python over the pattern's groups), so the backend makes it once per Program."""
    d, dv = int(q.shape[3]), int(v.shape[3])
    pat = pattern(op, int(q.shape[2]), int(k.shape[2]), {**attrs, "causal": causal})
    intervals, chunks = sparse_tables(pat, flash_warps(d, dv) * FA_ROWS_PER_WARP)
    return pat, intervals.reshape(-1), chunks.reshape(-1)


def sparse_attention_launch(op: str, q, k, v, o, mask=None, *, tables=None,
                            scale: float = 1.0, causal: bool = False,
                            mask_value: float = float("-inf"), **attrs) -> Launch | None:
    """As `attention_launch` (kernels.py) for `local_attention` / `block_sparse_attention`
    with their attrs. `tables`: `sparse_attention_tables`, its arrays where the kernel
    reads them (device copies on a GPU); made here when None. None when there is
    nothing to compute (no rows)."""
    _check_heads(q, k, v, op)
    b, h, t, d = (int(n) for n in q.shape)
    s, dv, hk = int(k.shape[2]), int(v.shape[3]), int(k.shape[1])
    for x in (q, k, v, o):
        if x.strides[3] != x.itemsize:
            raise ValueError("the head dim of q, k, v and o must be contiguous")
    pat, intervals, chunks = tables or sparse_attention_tables(op, q, k, v, causal, **attrs)
    n_chunks = len(chunks) // 4
    if not n_chunks or not b * h:
        return None
    warps = flash_warps(d, dv)
    strides = [x for a in (q, k, v, o) for x in _elem_strides(a)[:3]]
    is_bool = mask is not None and np.dtype(mask.dtype) == np.bool_
    m_strides = _elem_strides(mask) if mask is not None else [0, 0, 0, 0]
    return Launch(sparse_attention_kernel(d, dv), (n_chunks, b * h, 1), (32 * warps, 1, 1),
                  (q, k, v, o, mask if is_bool else None, None if is_bool else mask,
                   intervals, chunks, *strides, *m_strides, pat.before, pat.after,
                   h, h // hk, t, s, int(pat.causal), pat.dilation, scale, mask_value))


# Linear attention (Performer FAVOR+), float32, in blocks of LA_THREADS threads. The
# random features are taken in tiles of LA_FT (m needs no compile-time bound) and the
# positions in chunks of CH rows (32, or 16 for head dims over 64, so that shared
# memory stays under 48 KiB). With x' = sqrt(scale) x, logit(x, f) = x'.w_f - |x'|^2/2:
#
#   kmax    grid (feature tiles, B * KV heads): each block the largest key logit of
#           its features; readers take the max over the tiles (the reference's max
#           over all keys and features of a (batch, kv head), before any mask)
#   state   grid (feature tiles, B * H): KV[f, :] = sum_j phi_k[j, f] v_j and
#           z[f] = sum_j phi_k[j, f], with phi_k = exp(logit - kmax) times the key
#           mask's factor (keep: 0/1, bias: exp(bias)); per query head since the mask
#           may differ per head
#   rows    grid (row chunks, B * H): phi_q = exp(logit - the row's max), then
#           out = phi_q KV / phi_q z
#   causal  grid (1, B * H): one block walks the chunks in order with KV and z in
#           global memory: a chunk's rows read the state of the keys before it plus
#           their own chunk's keys j <= i (the CH x CH matrix phi_q phi_k^T), then the
#           chunk's keys join the state.
# KV, z and the kmax partials live in a scratch buffer (`linear_scratch_floats`).
LINEAR_ATTENTION = r"""
#ifndef TC_LINEAR_ATTENTION
#define TC_LINEAR_ATTENTION
#define LA_FT 32
#define LA_THREADS 128

struct tc_linear_args {
    const float* q; const float* k; const float* v; const float* w; float* o;
    const unsigned char* keep; const float* bias;
    float* kmax; float* kv; float* z;
    tc_i64 q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss, w_sf, w_sd;
    tc_i64 m_sb, m_sh, m_sk;         // key mask strides over [B, H, 1, S]
    int heads, group, kv_heads, sq, sk, m, n_ft;
    float sqrt_scale;
};

// rows r0.. of x (n valid) times sqrt(scale) into dst, zero past n; sq[r] = |x'_r|^2
template <int D, int CH>
__device__ __forceinline__ void tc_la_rows(float (*dst)[D + 1], float* sq, const float* x,
                                           tc_i64 ss, int r0, int n, float mul) {
    for (int t = threadIdx.x; t < CH * D; t += blockDim.x) {
        int r = t / D, d = t % D;
        dst[r][d] = r0 + r < n ? x[(tc_i64)(r0 + r) * ss + d] * mul : 0.0f;
    }
    __syncthreads();
    for (int r = threadIdx.x; r < CH; r += blockDim.x) {
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += dst[r][d] * dst[r][d];
        sq[r] = acc;
    }
}

template <int DV, int CH>
__device__ __forceinline__ void tc_la_values(float (*dst)[DV], const float* x, tc_i64 ss,
                                             int r0, int n) {
    for (int t = threadIdx.x; t < CH * DV; t += blockDim.x) {
        int r = t / DV, d = t % DV;
        dst[r][d] = r0 + r < n ? x[(tc_i64)(r0 + r) * ss + d] : 0.0f;
    }
}

// features f0 .. f0 + LA_FT - 1 (zero past m)
template <int D>
__device__ __forceinline__ void tc_la_features(float (*dst)[D + 1], const tc_linear_args& a,
                                               int f0) {
    for (int t = threadIdx.x; t < LA_FT * D; t += blockDim.x) {
        int f = t / D, d = t % D;
        dst[f][d] = f0 + f < a.m ? a.w[(tc_i64)(f0 + f) * a.w_sf + d * a.w_sd] : 0.0f;
    }
}

// out[r][f] = x'_r . w_f - |x'_r|^2 / 2 for a chunk of CH rows and a feature tile
template <int D, int CH>
__device__ __forceinline__ void tc_la_logits(float (*out)[LA_FT + 1], const float (*x)[D + 1],
                                             const float* sq, const float (*w)[D + 1]) {
    for (int e = threadIdx.x; e < CH * LA_FT; e += blockDim.x) {
        int r = e / LA_FT, f = e % LA_FT;
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += x[r][d] * w[f][d];
        out[r][f] = acc - 0.5f * sq[r];
    }
}

__device__ __forceinline__ float tc_la_block_max(float v, float* red) {
    v = tc_warp_max(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float out = -TC_INF;
    for (int w = 0; w < LA_THREADS / 32; ++w) out = fmaxf(out, red[w]);
    return out;
}

// the key logits' max of a (batch, kv head): over the feature tiles' partial maxima
__device__ __forceinline__ float tc_la_kmax(const tc_linear_args& a, int b, int hkv) {
    const float* part = a.kmax + ((tc_i64)b * a.kv_heads + hkv) * a.n_ft;
    float out = -TC_INF;
    for (int i = 0; i < a.n_ft; ++i) out = fmaxf(out, part[i]);
    return out;
}

// the key mask's factor on phi_k for keys r0.. (0 past n)
template <int CH>
__device__ __forceinline__ void tc_la_key_factor(float* kf, const tc_linear_args& a, int b,
                                                 int h, int r0, int n) {
    for (int r = threadIdx.x; r < CH; r += blockDim.x) {
        const int j = r0 + r;
        float f = j < n ? 1.0f : 0.0f;
        if (j < n) {
            const tc_i64 mi = b * a.m_sb + h * a.m_sh + (tc_i64)j * a.m_sk;
            if (a.keep && !a.keep[mi]) f = 0.0f;
            if (a.bias) f *= expf(a.bias[mi]);
        }
        kf[r] = f;
    }
}

template <int D, int CH>
__device__ __forceinline__ void tc_linear_kmax(const tc_linear_args& a) {
    __shared__ float x_s[CH][D + 1];
    __shared__ float w_s[LA_FT][D + 1];
    __shared__ float sq_s[CH];
    __shared__ float red[LA_THREADS / 32];
    const int bhk = blockIdx.y, b = bhk / a.kv_heads, hk = bhk % a.kv_heads;
    const int f0 = blockIdx.x * LA_FT;
    const float* kp = a.k + b * a.k_sb + hk * a.k_sh;
    tc_la_features<D>(w_s, a, f0);
    float best = -TC_INF;
    for (int c0 = 0; c0 < a.sk; c0 += CH) {
        __syncthreads();
        tc_la_rows<D, CH>(x_s, sq_s, kp, a.k_ss, c0, a.sk, a.sqrt_scale);
        __syncthreads();
        for (int e = threadIdx.x; e < CH * LA_FT; e += blockDim.x) {
            int r = e / LA_FT, f = e % LA_FT;
            if (c0 + r >= a.sk || f0 + f >= a.m) continue;
            float acc = 0.0f;
            for (int d = 0; d < D; ++d) acc += x_s[r][d] * w_s[f][d];
            best = fmaxf(best, acc - 0.5f * sq_s[r]);
        }
    }
    best = tc_la_block_max(best, red);
    if (threadIdx.x == 0) a.kmax[(tc_i64)bhk * a.n_ft + blockIdx.x] = best;
}

template <int D, int DV, int CH>
__device__ __forceinline__ void tc_linear_state(const tc_linear_args& a) {
    constexpr int PAIRS = (LA_FT * DV + LA_THREADS - 1) / LA_THREADS;   // (f, c) per thread
    __shared__ float x_s[CH][D + 1];
    __shared__ float v_s[CH][DV];
    __shared__ float w_s[LA_FT][D + 1];
    __shared__ float p_s[CH][LA_FT + 1];
    __shared__ float sq_s[CH];
    __shared__ float kf_s[CH];
    const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads, hkv = h / a.group;
    const int f0 = blockIdx.x * LA_FT;
    const float* kp = a.k + b * a.k_sb + hkv * a.k_sh;
    const float* vp = a.v + b * a.v_sb + hkv * a.v_sh;
    const float kmax = tc_la_kmax(a, b, hkv);
    tc_la_features<D>(w_s, a, f0);
    float acc[PAIRS], zacc = 0.0f;
    _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) acc[p] = 0.0f;
    for (int c0 = 0; c0 < a.sk; c0 += CH) {
        __syncthreads();
        tc_la_values<DV, CH>(v_s, vp, a.v_ss, c0, a.sk);
        tc_la_key_factor<CH>(kf_s, a, b, h, c0, a.sk);
        tc_la_rows<D, CH>(x_s, sq_s, kp, a.k_ss, c0, a.sk, a.sqrt_scale);
        __syncthreads();
        tc_la_logits<D, CH>(p_s, x_s, sq_s, w_s);
        __syncthreads();
        for (int e = threadIdx.x; e < CH * LA_FT; e += blockDim.x) {
            int r = e / LA_FT, f = e % LA_FT;
            p_s[r][f] = f0 + f < a.m ? expf(p_s[r][f] - kmax) * kf_s[r] : 0.0f;
        }
        __syncthreads();
        _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) {
            const int e = threadIdx.x + LA_THREADS * p, f = e / DV, c = e % DV;
            if (f < LA_FT)
                for (int r = 0; r < CH; ++r) acc[p] += p_s[r][f] * v_s[r][c];
        }
        if (threadIdx.x < LA_FT)
            for (int r = 0; r < CH; ++r) zacc += p_s[r][threadIdx.x];
    }
    float* kv = a.kv + (tc_i64)bh * a.m * DV;
    _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) {
        const int e = threadIdx.x + LA_THREADS * p, f = e / DV, c = e % DV;
        if (f < LA_FT && f0 + f < a.m) kv[(tc_i64)(f0 + f) * DV + c] = acc[p];
    }
    if (threadIdx.x < LA_FT && f0 + threadIdx.x < a.m)
        a.z[(tc_i64)bh * a.m + f0 + threadIdx.x] = zacc;
}

// rowmax[r] = max over the features of the rows' logits (x_s, sq_s loaded)
template <int D, int CH>
__device__ __forceinline__ void tc_la_row_max(float* rowmax, float (*l_s)[LA_FT + 1],
                                              float (*w_s)[D + 1], const float (*x_s)[D + 1],
                                              const float* sq_s, const tc_linear_args& a) {
    for (int r = threadIdx.x; r < CH; r += blockDim.x) rowmax[r] = -TC_INF;
    for (int f0 = 0; f0 < a.m; f0 += LA_FT) {
        __syncthreads();
        tc_la_features<D>(w_s, a, f0);
        __syncthreads();
        tc_la_logits<D, CH>(l_s, x_s, sq_s, w_s);
        __syncthreads();
        for (int r = threadIdx.x; r < CH; r += blockDim.x)
            for (int f = 0; f < LA_FT && f0 + f < a.m; ++f) rowmax[r] = fmaxf(rowmax[r], l_s[r][f]);
    }
}

template <int D, int DV, int CH>
__device__ __forceinline__ void tc_linear_rows(const tc_linear_args& a) {
    constexpr int PAIRS = (CH * DV + LA_THREADS - 1) / LA_THREADS;      // (r, c) per thread
    __shared__ float x_s[CH][D + 1];
    __shared__ float w_s[LA_FT][D + 1];
    __shared__ float p_s[CH][LA_FT + 1];
    __shared__ float sq_s[CH];
    __shared__ float rowmax[CH];
    __shared__ float den_s[CH];
    const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
    const int r0 = blockIdx.x * CH;
    const float* kv = a.kv + (tc_i64)bh * a.m * DV;
    const float* z = a.z + (tc_i64)bh * a.m;
    tc_la_rows<D, CH>(x_s, sq_s, a.q + b * a.q_sb + h * a.q_sh, a.q_ss, r0, a.sq,
                      a.sqrt_scale);
    __syncthreads();
    tc_la_row_max<D, CH>(rowmax, p_s, w_s, x_s, sq_s, a);
    float acc[PAIRS], den = 0.0f;
    _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) acc[p] = 0.0f;
    for (int f0 = 0; f0 < a.m; f0 += LA_FT) {
        __syncthreads();
        tc_la_features<D>(w_s, a, f0);
        __syncthreads();
        tc_la_logits<D, CH>(p_s, x_s, sq_s, w_s);
        __syncthreads();
        for (int e = threadIdx.x; e < CH * LA_FT; e += blockDim.x) {
            int r = e / LA_FT, f = e % LA_FT;
            p_s[r][f] = f0 + f < a.m ? expf(p_s[r][f] - rowmax[r]) : 0.0f;
        }
        __syncthreads();
        const int nf = a.m - f0 < LA_FT ? a.m - f0 : LA_FT;
        _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) {
            const int e = threadIdx.x + LA_THREADS * p, r = e / DV, c = e % DV;
            if (r < CH)
                for (int f = 0; f < nf; ++f) acc[p] += p_s[r][f] * kv[(tc_i64)(f0 + f) * DV + c];
        }
        if (threadIdx.x < CH)
            for (int f = 0; f < nf; ++f) den += p_s[threadIdx.x][f] * z[f0 + f];
    }
    if (threadIdx.x < CH) den_s[threadIdx.x] = den;
    __syncthreads();
    float* op = a.o + b * a.o_sb + h * a.o_sh;
    _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) {
        const int e = threadIdx.x + LA_THREADS * p, r = e / DV, c = e % DV;
        if (r < CH && r0 + r < a.sq) op[(tc_i64)(r0 + r) * a.o_ss + c] = acc[p] / den_s[r];
    }
}

template <int D, int DV, int CH>
__device__ __forceinline__ void tc_linear_causal(const tc_linear_args& a) {
    constexpr int PAIRS = (CH * DV + LA_THREADS - 1) / LA_THREADS;      // (r, c) per thread
    __shared__ float x_s[CH][D + 1];     // the chunk's queries
    __shared__ float y_s[CH][D + 1];     // the chunk's keys
    __shared__ float v_s[CH][DV];
    __shared__ float w_s[LA_FT][D + 1];
    __shared__ float pq_s[CH][LA_FT + 1];
    __shared__ float pk_s[CH][LA_FT + 1];
    __shared__ float a_s[CH][CH + 1];    // phi_q phi_k^T within the chunk
    __shared__ float sq_s[CH], sk_s[CH], kf_s[CH], rowmax[CH], den_s[CH];
    const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads, hkv = h / a.group;
    const float* qp = a.q + b * a.q_sb + h * a.q_sh;
    const float* kp = a.k + b * a.k_sb + hkv * a.k_sh;
    const float* vp = a.v + b * a.v_sb + hkv * a.v_sh;
    float* kv = a.kv + (tc_i64)bh * a.m * DV;
    float* z = a.z + (tc_i64)bh * a.m;
    const float kmax = tc_la_kmax(a, b, hkv);
    for (int e = threadIdx.x; e < a.m * DV; e += blockDim.x) kv[e] = 0.0f;
    for (int e = threadIdx.x; e < a.m; e += blockDim.x) z[e] = 0.0f;
    for (int c0 = 0; c0 < a.sq; c0 += CH) {
        __syncthreads();                 // the state's writes, the last chunk's reads
        tc_la_rows<D, CH>(x_s, sq_s, qp, a.q_ss, c0, a.sq, a.sqrt_scale);
        tc_la_rows<D, CH>(y_s, sk_s, kp, a.k_ss, c0, a.sk, a.sqrt_scale);
        tc_la_values<DV, CH>(v_s, vp, a.v_ss, c0, a.sk);
        tc_la_key_factor<CH>(kf_s, a, b, h, c0, a.sk);
        for (int e = threadIdx.x; e < CH * CH; e += blockDim.x) a_s[e / CH][e % CH] = 0.0f;
        __syncthreads();
        tc_la_row_max<D, CH>(rowmax, pq_s, w_s, x_s, sq_s, a);
        float acc[PAIRS], den = 0.0f;
        _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) acc[p] = 0.0f;
        for (int f0 = 0; f0 < a.m; f0 += LA_FT) {
            __syncthreads();
            tc_la_features<D>(w_s, a, f0);
            __syncthreads();
            tc_la_logits<D, CH>(pq_s, x_s, sq_s, w_s);
            tc_la_logits<D, CH>(pk_s, y_s, sk_s, w_s);
            __syncthreads();
            for (int e = threadIdx.x; e < CH * LA_FT; e += blockDim.x) {
                int r = e / LA_FT, f = e % LA_FT;
                bool live = f0 + f < a.m;
                pq_s[r][f] = live ? expf(pq_s[r][f] - rowmax[r]) : 0.0f;
                pk_s[r][f] = live ? expf(pk_s[r][f] - kmax) * kf_s[r] : 0.0f;
            }
            __syncthreads();
            const int nf = a.m - f0 < LA_FT ? a.m - f0 : LA_FT;
            for (int e = threadIdx.x; e < CH * CH; e += blockDim.x) {
                int r = e / CH, j = e % CH;
                float s = 0.0f;
                for (int f = 0; f < nf; ++f) s += pq_s[r][f] * pk_s[j][f];
                a_s[r][j] += s;
            }
            _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) {   // the keys before the chunk
                const int e = threadIdx.x + LA_THREADS * p, r = e / DV, c = e % DV;
                if (r < CH)
                    for (int f = 0; f < nf; ++f)
                        acc[p] += pq_s[r][f] * kv[(tc_i64)(f0 + f) * DV + c];
            }
            if (threadIdx.x < CH)
                for (int f = 0; f < nf; ++f) den += pq_s[threadIdx.x][f] * z[f0 + f];
            __syncthreads();             // this tile of the state read: now add the chunk
            for (int e = threadIdx.x; e < nf * DV; e += blockDim.x) {
                int f = e / DV, c = e % DV;
                float s = 0.0f;
                for (int j = 0; j < CH; ++j) s += pk_s[j][f] * v_s[j][c];
                kv[(tc_i64)(f0 + f) * DV + c] += s;
            }
            for (int f = threadIdx.x; f < nf; f += blockDim.x) {
                float s = 0.0f;
                for (int j = 0; j < CH; ++j) s += pk_s[j][f];
                z[f0 + f] += s;
            }
        }
        __syncthreads();
        _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) {   // the chunk's keys j <= i
            const int e = threadIdx.x + LA_THREADS * p, r = e / DV, c = e % DV;
            if (r < CH)
                for (int j = 0; j <= r; ++j) acc[p] += a_s[r][j] * v_s[j][c];
        }
        if (threadIdx.x < CH) {
            for (int j = 0; j <= (int)threadIdx.x; ++j) den += a_s[threadIdx.x][j];
            den_s[threadIdx.x] = den;
        }
        __syncthreads();
        float* op = a.o + b * a.o_sb + h * a.o_sh;
        _Pragma("unroll") for (int p = 0; p < PAIRS; ++p) {
            const int e = threadIdx.x + LA_THREADS * p, r = e / DV, c = e % DV;
            if (r < CH && c0 + r < a.sq) op[(tc_i64)(c0 + r) * a.o_ss + c] = acc[p] / den_s[r];
        }
    }
}
#endif
"""

LINEAR_PARAMS = (
    [("const float*", n) for n in ("q", "k", "v", "w")] + [("float*", "o"),
     ("const unsigned char*", "keep"), ("const float*", "bias")]
    + [("float*", n) for n in ("kmax", "kv", "z")]
    + [("tc_i64", f"{t}_s{x}") for t in "qkvo" for x in "bhs"]
    + [("tc_i64", "w_sf"), ("tc_i64", "w_sd")]
    + [("tc_i64", f"m_s{x}") for x in ("b", "h", "k")]
    + [("int", n) for n in ("heads", "group", "kv_heads", "sq", "sk", "m", "n_ft")]
    + [("float", "sqrt_scale")])

LA_FT, LA_THREADS = 32, 128
LINEAR_STAGES = ("kmax", "state", "rows", "causal")


def linear_chunk(head_dim: int, value_dim: int) -> int:
    """Rows per chunk: shared memory under 48 KiB with head dims up to 128."""
    return 32 if max(head_dim, value_dim) <= 64 else 16


def linear_attention_kernel(stage: str, head_dim: int, value_dim: int) -> LibraryKernel:
    name = f"tc_linear_attention_{stage}_d{head_dim}_v{value_dim}"
    ch = linear_chunk(head_dim, value_dim)
    dims = f"{head_dim}, {ch}" if stage == "kmax" else f"{head_dim}, {value_dim}, {ch}"
    entry = _entry(name, LINEAR_PARAMS, "tc_linear_args", f"tc_linear_{stage}<{dims}>",
                   LA_THREADS)
    return LibraryKernel(name, PRELUDE + LINEAR_ATTENTION + entry, tuple(LINEAR_PARAMS))


def linear_scratch_floats(q, k, v, features) -> int:
    """Floats of scratch the linear-attention kernels need: kmax partials, KV, z."""
    b, h = int(q.shape[0]), int(q.shape[1])
    m, hk, dv = int(features.shape[0]), int(k.shape[1]), int(v.shape[3])
    return b * hk * -(-m // LA_FT) + b * h * m * (dv + 1)


def linear_attention_launches(q, k, v, features, o, mask=None, *, scratch, scale: float = 1.0,
                              causal: bool = False) -> list[Launch]:
    """The launches of `linear_attention` (q [b,h,t,d], k [bk,hk,s,d], v [bk,hk,s,dv],
    features [m,d], o [b,h,t,dv], float32, head dims contiguous; a key mask, bool or
    float, broadcasting to [b,h,1,s]), in order; `scratch` a float32 array of at least
    `linear_scratch_floats` elements (device memory on a GPU)."""
    _check_heads(q, k, v, "linear attention")
    b, h, t, d = (int(n) for n in q.shape)
    s, dv, hk, m = int(k.shape[2]), int(v.shape[3]), int(k.shape[1]), int(features.shape[0])
    for x in (q, k, v, o):
        if x.strides[-1] != x.itemsize:
            raise ValueError("the head dim of q, k, v and o must be contiguous")
    if not (b * h and t and m):
        return []
    n_ft = -(-m // LA_FT)
    sizes = [b * hk * n_ft, b * h * m * dv, b * h * m]
    cuts = np.cumsum([0] + sizes)
    kmax, kv, z = (scratch[cuts[i]:cuts[i + 1]] for i in range(3))
    strides = [x for a in (q, k, v, o) for x in _elem_strides(a)[:3]]
    w_sf, w_sd = _elem_strides(features, 2)   # read once per tile: any layout
    is_bool = mask is not None and np.dtype(mask.dtype) == np.bool_
    ms = _elem_strides(mask) if mask is not None else [0, 0, 0, 0]
    args = (q, k, v, features, o, mask if is_bool else None, None if is_bool else mask,
            kmax, kv, z, *strides, w_sf, w_sd, ms[0], ms[1], ms[3],
            h, h // hk, hk, t, s, m, n_ft, float(np.float32(math.sqrt(scale))))
    ch = linear_chunk(d, dv)
    block = (LA_THREADS, 1, 1)
    stages = [("kmax", (n_ft, b * hk, 1))]
    stages += [("causal", (1, b * h, 1))] if causal else \
        [("state", (n_ft, b * h, 1)), ("rows", (-(-t // ch), b * h, 1))]
    return [Launch(linear_attention_kernel(stage, d, dv), grid, block, args)
            for stage, grid in stages]


def all_attention_kernels() -> list[LibraryKernel]:
    """Every kernel of this module at the head dims the tests compile (with kernels.py's
    `all_library_kernels`, in one translation unit: tests/test_cupy.py)."""
    dims = [(8, 8), (16, 16), (64, 64), (80, 80), (128, 128), (64, 32), (6, 80)]
    out = [sparse_attention_kernel(d, dv) for d, dv in dims]
    out += [linear_attention_kernel(st, d, dv) for d, dv in dims for st in LINEAR_STAGES]
    return out
