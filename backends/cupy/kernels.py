"""The hand-written CUDA library kernels: flash attention, and the 8-bit integer GEMM
(`matmul_integer`, with `__dp4a`); sparse and linear attention's are in
attention_kernels.py. Everything else the GPU runs is cuBLAS or generated from the
kernel IR (`cuda_codegen.py`).

The kernel is CUDA C without any #include, so the same text compiles under NVRTC
(what `cupy.RawModule` uses) and standalone under nvcc. It needs compile-time head
dims, so it is a C++ template behind small `extern "C"` entry points, one per
instance, each with a plain, unmangled name to look up. It computes and accumulates
in float32, like the numpy reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Shared device helpers. Guarded so any number of kernels can be pasted into one
# translation unit (emit_source writes one .cu per model).
PRELUDE = r"""
#ifndef TC_PRELUDE
#define TC_PRELUDE
#define TC_FULL_MASK 0xffffffffu
#define TC_INF __int_as_float(0x7f800000)  // no math.h under NVRTC
typedef long long tc_i64;

__device__ __forceinline__ float tc_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TC_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float tc_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(TC_FULL_MASK, v, o));
    return v;
}
#endif
"""

# Flash attention, float32. One block of WARPS warps owns FA_ROWS_PER_WARP query
# rows per warp (FA_BLOCK_M rows in all) of one (batch, head). It streams the keys in
# tiles of 32 (one key per lane): the tile of K and V goes to shared memory, each lane
# scores its key against the warp's rows, the warp keeps a running max and sum per row
# (online softmax), rescales its output accumulators and adds P @ V_tile, with lane l
# owning output columns l, l+32, ... Scores never touch global memory.
#
# Semantics are those of the `attention` op (tensorc/ops/attention.py), in its order:
# scores = (scale * q) @ k^T; `causal` sets key j > i + causal_offset to mask_value;
# `keep` (bool, may be null) sets scores where it is false to mask_value; `bias`
# (float, may be null) is added. Masks are read through strides over [B, H, Sq, Sk],
# 0 on broadcast dims. With mask_value = -inf a row whose keys are all masked gives
# 0/0 = NaN, as the reference does; a finite mask_value gives uniform weights there.
#
# Q, K, V, O are read through (batch, head, position) strides with the head dim
# contiguous, so [B, H, S, D] and [B, S, H, D] layouts both work without a copy, and
# a K/V batch or head of size 1 is broadcast by giving it stride 0. Grouped-query
# attention reads K/V head h / group for query head h (group = heads / K/V heads), in
# place: no repeated copy of K and V.
FLASH_ATTENTION = r"""
#ifndef TC_FLASH_ATTENTION
#define TC_FLASH_ATTENTION
#define FA_TILE_N 32
#define FA_ROWS_PER_WARP 4

struct tc_attn_args {
    const float* q; const float* k; const float* v; float* o;
    const unsigned char* keep; const float* bias;
    tc_i64 q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss;
    tc_i64 m_sb, m_sh, m_sq, m_sk;   // strides of keep/bias over [B, H, Sq, Sk]
    int heads, group, sq, sk, causal, causal_offset;
    float scale, mask_value;
};

template <int D, int DV, int WARPS>
__device__ __forceinline__ void tc_flash_attention(const tc_attn_args& a) {
    constexpr int OC = (DV + 31) / 32;            // output columns per lane
    constexpr int FA_BLOCK_M = WARPS * FA_ROWS_PER_WARP;
    __shared__ float q_s[FA_BLOCK_M][D];
    __shared__ float k_s[FA_TILE_N][D + 1];       // +1: lane j reads row j, no bank clash
    __shared__ float v_s[FA_TILE_N][DV];
    __shared__ float p_s[WARPS][FA_ROWS_PER_WARP][FA_TILE_N];   // this tile's weights
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
    const int m0 = blockIdx.x * FA_BLOCK_M;
    const float* qp = a.q + b * a.q_sb + h * a.q_sh;
    const int hkv = h / a.group;                  // the K/V head this query head reads
    const float* kp = a.k + b * a.k_sb + hkv * a.k_sh;
    const float* vp = a.v + b * a.v_sb + hkv * a.v_sh;
    const tc_i64 m_base = b * a.m_sb + h * a.m_sh;

    for (int t = threadIdx.x; t < FA_BLOCK_M * D; t += blockDim.x) {
        int r = t / D, d = t % D, i = m0 + r;
        q_s[r][d] = i < a.sq ? qp[i * a.q_ss + d] * a.scale : 0.0f;
    }
    float m[FA_ROWS_PER_WARP], l[FA_ROWS_PER_WARP], acc[FA_ROWS_PER_WARP][OC];
    _Pragma("unroll") for (int r = 0; r < FA_ROWS_PER_WARP; ++r) {
        m[r] = -TC_INF;
        l[r] = 0.0f;
        _Pragma("unroll") for (int c = 0; c < OC; ++c) acc[r][c] = 0.0f;
    }
    const int row0 = warp * FA_ROWS_PER_WARP;     // this warp's first row in the block
    int n_end = a.sk;
    if (a.causal && a.mask_value == -TC_INF) {    // keys past the block's last row are dead
        int last = m0 + FA_BLOCK_M - 1 + a.causal_offset + 1;
        n_end = last < n_end ? (last > 0 ? last : 0) : n_end;
    }
    for (int n0 = 0; n0 < n_end; n0 += FA_TILE_N) {
        __syncthreads();                          // previous tile fully consumed
        for (int t = threadIdx.x; t < FA_TILE_N * D; t += blockDim.x) {
            int j = t / D, d = t % D;
            k_s[j][d] = n0 + j < a.sk ? kp[(n0 + j) * a.k_ss + d] : 0.0f;
        }
        for (int t = threadIdx.x; t < FA_TILE_N * DV; t += blockDim.x) {
            int j = t / DV, d = t % DV;
            v_s[j][d] = n0 + j < a.sk ? vp[(n0 + j) * a.v_ss + d] : 0.0f;
        }
        __syncthreads();
        const int j = n0 + lane;                  // this lane's key
        float s[FA_ROWS_PER_WARP];
        _Pragma("unroll") for (int r = 0; r < FA_ROWS_PER_WARP; ++r) s[r] = 0.0f;
        _Pragma("unroll 8") for (int d = 0; d < D; ++d) {
            float kv = k_s[lane][d];
            _Pragma("unroll")
            for (int r = 0; r < FA_ROWS_PER_WARP; ++r) s[r] += q_s[row0 + r][d] * kv;
        }
        _Pragma("unroll") for (int r = 0; r < FA_ROWS_PER_WARP; ++r) {
            const int i = m0 + row0 + r;
            float sv = s[r];
            if (a.causal && j > i + a.causal_offset) sv = a.mask_value;
            if (j < a.sk && i < a.sq) {
                tc_i64 mi = m_base + (tc_i64)i * a.m_sq + (tc_i64)j * a.m_sk;
                if (a.keep && !a.keep[mi]) sv = a.mask_value;
                if (a.bias) sv += a.bias[mi];
            }
            if (j >= a.sk) sv = -TC_INF;              // padding of the last tile
            float m_new = fmaxf(m[r], tc_warp_max(sv));
            // Nothing live yet in this row: keep everything at zero (avoids inf - inf).
            float p = m_new == -TC_INF ? 0.0f : expf(sv - m_new);
            float alpha = m_new == -TC_INF ? 1.0f : expf(m[r] - m_new);
            l[r] = l[r] * alpha + tc_warp_sum(p);
            m[r] = m_new;
            _Pragma("unroll") for (int c = 0; c < OC; ++c) acc[r][c] *= alpha;
            p_s[warp][r][lane] = p;
        }
        __syncwarp();
        // acc += P @ V_tile: each V element read once from shared memory serves all rows.
        for (int jj = 0; jj < FA_TILE_N; ++jj) {
            float pj[FA_ROWS_PER_WARP];
            _Pragma("unroll") for (int r = 0; r < FA_ROWS_PER_WARP; ++r) pj[r] = p_s[warp][r][jj];
            _Pragma("unroll") for (int c = 0; c < OC; ++c) {
                const int d = lane + 32 * c;
                if (d < DV) {
                    const float vv = v_s[jj][d];
                    _Pragma("unroll")
                    for (int r = 0; r < FA_ROWS_PER_WARP; ++r) acc[r][c] += pj[r] * vv;
                }
            }
        }
    }
    _Pragma("unroll") for (int r = 0; r < FA_ROWS_PER_WARP; ++r) {
        const int i = m0 + row0 + r;
        if (i >= a.sq) continue;
        float* op = a.o + b * a.o_sb + h * a.o_sh + (tc_i64)i * a.o_ss;
        _Pragma("unroll") for (int c = 0; c < OC; ++c) {
            int d = lane + 32 * c;
            if (d < DV) op[d] = acc[r][c] / l[r];
        }
    }
}
#endif
"""

# Plain scalar and pointer parameters (no struct by value) so that every launcher,
# cupy or the CPU emulator, passes them the same way.
FLASH_PARAMS = (
    [("const float*", n) for n in ("q", "k", "v")] + [("float*", "o"),
     ("const unsigned char*", "keep"), ("const float*", "bias")]
    + [("tc_i64", f"{t}_s{x}") for t in "qkvo" for x in "bhs"]
    + [("tc_i64", f"m_s{x}") for x in ("b", "h", "q", "k")]
    + [("int", n) for n in ("heads", "group", "sq", "sk", "causal", "causal_offset")]
    + [("float", "scale"), ("float", "mask_value")])

FLASH_ENTRY = """
extern "C" __global__ void __launch_bounds__({warps} * 32)
{name}({params}) {{
    tc_attn_args a = {{{fields}}};
    tc_flash_attention<{d}, {dv}, {warps}>(a);
}}
"""

FA_ROWS_PER_WARP = 4
# Static shared memory of one block must stay under 48 KiB: (4 * warps) * D
# + 32 * (D + 1) + 32 * DV + 128 * warps floats; 8 warps fit up to 64, 4 up to 128.
MAX_HEAD_DIM = 128
MAX_GRID_Y = 65535    # one block row per (batch, head)


def flash_warps(head_dim: int, value_dim: int) -> int:
    return 8 if max(head_dim, value_dim) <= 64 else 4


@dataclass(frozen=True)
class LibraryKernel:
    name: str
    source: str                          # complete, compilable CUDA C (prelude included)
    params: tuple[tuple[str, str], ...]  # (C type, name) of each kernel parameter
    cooperative: bool = True             # threads of a block synchronise


def flash_attention_kernel(head_dim: int, value_dim: int) -> LibraryKernel:
    name = f"tc_flash_attention_d{head_dim}_v{value_dim}"
    entry = FLASH_ENTRY.format(
        name=name, d=head_dim, dv=value_dim, warps=flash_warps(head_dim, value_dim),
        params=", ".join(f"{t} {n}" for t, n in FLASH_PARAMS),
        fields=", ".join(n for _, n in FLASH_PARAMS))
    return LibraryKernel(name, PRELUDE + FLASH_ATTENTION + entry, tuple(FLASH_PARAMS))


def all_library_kernels() -> list[LibraryKernel]:
    """Every hand-written kernel of this module (`attention_kernels.py` lists its own),
    with the head dims the built-in models use and the edge cases (head dims that are
    not a multiple of 32, the largest supported)."""
    dims = [(8, 8), (16, 16), (32, 32), (48, 48), (64, 64), (80, 80), (128, 128), (64, 32),
            (6, 80)]
    return [flash_attention_kernel(d, dv) for d, dv in dims] + [matmul_integer_kernel()]


# --- launch helpers ----------------------------------------------------------------
# Each returns (kernel, grid, block, args) for arrays that have numpy's .shape,
# .strides and .itemsize (numpy arrays in the CPU emulator, cupy arrays on a GPU);
# args are the arrays themselves (None for a null pointer) and plain numbers, in the
# order of kernel.params. Launchers convert the numbers to the parameter C types.

@dataclass(frozen=True)
class Launch:
    kernel: LibraryKernel
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple


def _elem_strides(a, rank: int = 4) -> list[int]:
    """Element strides of `a` left-padded to `rank` dims; 0 on size-1 (broadcast) dims."""
    shape = (1,) * (rank - len(a.shape)) + tuple(a.shape)
    strides = (0,) * (rank - len(a.shape)) + tuple(s // a.itemsize for s in a.strides)
    return [0 if n == 1 else s for n, s in zip(shape, strides, strict=True)]


def attention_launch(q, k, v, o, mask=None, *, scale: float = 1.0, causal: bool = False,
                     mask_value: float = float("-inf")) -> Launch:
    """q [b,h,t,d], k [bk,hk,s,d], v [bk,hk,s,dv], o [b,h,t,dv]: float32 with the last dim
    contiguous, hk dividing h; mask (bool keep or float bias) broadcasts to [b,h,t,s]."""
    b, h, t, d = (int(n) for n in q.shape)
    s, dv, hk = int(k.shape[2]), int(v.shape[3]), int(k.shape[1])
    if hk == 0 or h % hk or int(v.shape[1]) != hk:
        raise ValueError(f"attention kernel: k/v heads {k.shape[1]} do not divide "
                         f"q heads {h}")
    if max(d, dv) > MAX_HEAD_DIM or b * h > MAX_GRID_Y:
        raise ValueError(f"attention kernel takes head dims <= {MAX_HEAD_DIM} and "
                         f"batch * heads <= {MAX_GRID_Y}, got q {q.shape}, v {v.shape}")
    for a in (q, k, v, o):
        if a.strides[3] != a.itemsize:
            raise ValueError("the head dim of q, k, v and o must be contiguous")
    strides = [x for a in (q, k, v, o) for x in _elem_strides(a)[:3]]
    is_bool = mask is not None and np.dtype(mask.dtype) == np.bool_
    m_strides = _elem_strides(mask) if mask is not None else [0, 0, 0, 0]
    warps = flash_warps(d, dv)
    block_m = warps * FA_ROWS_PER_WARP
    return Launch(flash_attention_kernel(d, dv), (-(-t // block_m), b * h, 1),
                  (32 * warps, 1, 1),
                  (q, k, v, o, mask if is_bool else None,
                   None if is_bool else mask, *strides, *m_strides,
                   h, h // hk, t, s, int(causal), 0, scale, mask_value))



# --- matmul_integer: u8/s8 operands, i32 accumulation with __dp4a (sm_61+) ------------
# C[z, m, n] = sum_k (A[z, m, k] - za[z, m]) * (B[z, k, n] - zb[z, n]), wrapping modulo
# 2**32 like the reference's int32 result. Every operand byte is read as a signed byte:
# an unsigned one has 128 taken off (byte ^ 0x80), and so has its zero point, which
# leaves each difference unchanged. With a' = a - 128*ua and za' likewise,
#     sum_k (a' - za')(b' - zb') = sum a'b' - zb' sum a' - za' sum b' + K za' zb',
# where sum a'b' is __dp4a on four packed bytes at a time and the row / column sums are
# __dp4a against 0x01010101. Bytes past K are packed as 0, adding nothing to any sum.
# A block of 16x16 threads owns a 64x64 tile of C, each thread a 4x4 of it (rows
# ty + 16i, columns tx + 16j); per step of 16 bytes of K the block packs one 32-bit
# word of A and of B per thread into shared memory. Operands are read through element
# strides (any layout; a zero point has stride 0 where it broadcasts).
MATMUL_INTEGER = r"""
#ifndef TC_MATMUL_INTEGER
#define TC_MATMUL_INTEGER
#define MI_TILE 64
#define MI_WORDS 4                       // 32-bit words of K per step: 16 bytes

extern "C" __global__ void __launch_bounds__(256)
tc_matmul_integer(const unsigned char* a, const unsigned char* b,
                  const unsigned char* za, const unsigned char* zb, int* c,
                  tc_i64 a_sz, tc_i64 a_sm, tc_i64 a_sk, tc_i64 b_sz, tc_i64 b_sk,
                  tc_i64 b_sn, tc_i64 za_sz, tc_i64 za_sm, tc_i64 zb_sz, tc_i64 zb_sn,
                  tc_i64 c_sz, tc_i64 c_sm, tc_i64 c_sn, int m, int n, int k,
                  int a_unsigned, int b_unsigned) {
    __shared__ int a_s[MI_WORDS][MI_TILE];   // word w of row r: bytes k0+4w .. k0+4w+3
    __shared__ int b_s[MI_WORDS][MI_TILE];   // word w of column c
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int m0 = blockIdx.y * MI_TILE, n0 = blockIdx.x * MI_TILE, z = blockIdx.z;
    const unsigned fa = a_unsigned ? 0x80u : 0u, fb = b_unsigned ? 0x80u : 0u;
    const unsigned char* ap = a + z * a_sz;
    const unsigned char* bp = b + z * b_sz;
    int dot[4][4], row_sum[4], col_sum[4];
    _Pragma("unroll") for (int i = 0; i < 4; ++i) {
        row_sum[i] = 0;
        col_sum[i] = 0;
        _Pragma("unroll") for (int j = 0; j < 4; ++j) dot[i][j] = 0;
    }
    const int lr = threadIdx.x / MI_WORDS, lw = threadIdx.x % MI_WORDS;   // what to pack
    for (int k0 = 0; k0 < k; k0 += 4 * MI_WORDS) {
        unsigned wa = 0u, wb = 0u;
        _Pragma("unroll") for (int byte = 0; byte < 4; ++byte) {
            const int kk = k0 + 4 * lw + byte, i = m0 + lr, j = n0 + lr;
            if (kk < k && i < m) wa |= ((unsigned)ap[i * a_sm + kk * a_sk] ^ fa) << (8 * byte);
            if (kk < k && j < n) wb |= ((unsigned)bp[kk * b_sk + j * b_sn] ^ fb) << (8 * byte);
        }
        a_s[lw][lr] = (int)wa;
        b_s[lw][lr] = (int)wb;
        __syncthreads();
        _Pragma("unroll") for (int w = 0; w < MI_WORDS; ++w) {
            int av[4], bv[4];
            _Pragma("unroll") for (int i = 0; i < 4; ++i) {
                av[i] = a_s[w][ty + 16 * i];
                bv[i] = b_s[w][tx + 16 * i];
                row_sum[i] = __dp4a(av[i], 0x01010101, row_sum[i]);
                col_sum[i] = __dp4a(bv[i], 0x01010101, col_sum[i]);
            }
            _Pragma("unroll") for (int i = 0; i < 4; ++i)
                _Pragma("unroll") for (int j = 0; j < 4; ++j)
                    dot[i][j] = __dp4a(av[i], bv[j], dot[i][j]);
        }
        __syncthreads();
    }
    _Pragma("unroll") for (int i = 0; i < 4; ++i) {
        const int row = m0 + ty + 16 * i;
        if (row >= m) continue;
        const unsigned zai = (unsigned)(int)(signed char)(
            (za ? (unsigned)za[z * za_sz + row * za_sm] : 0u) ^ fa);
        _Pragma("unroll") for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            if (col >= n) continue;
            const unsigned zbj = (unsigned)(int)(signed char)(
                (zb ? (unsigned)zb[z * zb_sz + col * zb_sn] : 0u) ^ fb);
            const unsigned acc = (unsigned)dot[i][j] - zbj * (unsigned)row_sum[i]
                - zai * (unsigned)col_sum[j] + (unsigned)k * zai * zbj;   // modulo 2**32
            c[z * c_sz + row * c_sm + col * c_sn] = (int)acc;
        }
    }
}
#endif
"""

MATMUL_INTEGER_PARAMS = (
    [("const unsigned char*", n) for n in ("a", "b", "za", "zb")] + [("int*", "c")]
    + [("tc_i64", n) for n in ("a_sz", "a_sm", "a_sk", "b_sz", "b_sk", "b_sn", "za_sz",
                               "za_sm", "zb_sz", "zb_sn", "c_sz", "c_sm", "c_sn")]
    + [("int", n) for n in ("m", "n", "k", "a_unsigned", "b_unsigned")])
MI_TILE = 64


def matmul_integer_kernel() -> LibraryKernel:
    return LibraryKernel("tc_matmul_integer", PRELUDE + MATMUL_INTEGER,
                         tuple(MATMUL_INTEGER_PARAMS))


def matmul_integer_launch(a, b, za, zb, c) -> Launch:
    """a [z, m, k], b [z, k, n] (u8 or i8), za [z, m, 1] and zb [z, 1, n] of their
    operand's dtype (stride 0 where they broadcast; None for 0), c [z, m, n] int32."""
    z, m, k = (int(d) for d in a.shape)
    n = int(b.shape[2])
    if tuple(b.shape) != (z, k, n) or tuple(c.shape) != (z, m, n):
        raise ValueError(f"matmul_integer kernel: shapes a {a.shape}, b {b.shape}, "
                         f"c {c.shape} do not fit")
    if max(z, -(-m // MI_TILE)) > MAX_GRID_Y:
        raise ValueError(f"matmul_integer kernel: batch {z} or rows {m} too many")
    kinds = {np.dtype(np.uint8): 1, np.dtype(np.int8): 0}
    sa, sb, sc = (_strides(x) for x in (a, b, c))
    sza = _strides(za) if za is not None else [0, 0, 0]
    szb = _strides(zb) if zb is not None else [0, 0, 0]
    return Launch(matmul_integer_kernel(), (-(-n // MI_TILE), -(-m // MI_TILE), z),
                  (256, 1, 1),
                  (a, b, za, zb, c, sa[0], sa[1], sa[2], sb[0], sb[1], sb[2],
                   sza[0], sza[1], szb[0], szb[2], sc[0], sc[1], sc[2], m, n, k,
                   kinds[np.dtype(a.dtype)], kinds[np.dtype(b.dtype)]))


def _strides(x) -> list[int]:
    """Element strides, 0 on a size-1 dim."""
    return [0 if d == 1 else s // x.itemsize for d, s in zip(x.shape, x.strides, strict=True)]
