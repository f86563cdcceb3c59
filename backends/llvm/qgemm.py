"""INT8 GEMM for the LLVM CPU backend (ONNX MatMulInteger, with a fused epilogue).

    acc[i, j] = sum_k (a[i, k] - a_zero[i]) * b[k, j]            (int32)
    y[i, j]   = act((float(acc) * row_scale[i]) * col_scale[j] + bias[j]) + residual[i, j]

`a` is uint8 [M, K] (rows, any row stride with unit inner stride; leading batch dims
flatten into rows), `b` int8 [K, N], symmetric (zero point 0). Without scales the
result is the int32 `acc`; with `row_scale` and/or `col_scale` it is float32, computed
in exactly the order above (so numpy float32 gives the same bits), the activation
from gemm's own epilogue maths (`FnBuilder.activation`).

Zero-point trick: the kernels compute sum_k a * b (u8 x s8, the product VNNI and AMX
have) and the epilogue subtracts a_zero[i] * colsum[j], colsum[j] = sum_k b[k, j]
made when B is packed. Sums are exact int32 while |acc| < 2^31 (always for K < 65794
and a_zero in 0..255); past that they wrap as numpy's int64 result cast to int32 does.

Layout (`PackedQB`, made once for a weight: the only copy the kernels need, still
int8): B's columns in panels of 16, panels padded to an even count (the kernels take
a pair: 32 columns); in a panel, each group of 4 consecutive k is one 64-byte row,
column c's 4 bytes at 4c ("VNNI layout": one row is a `vpdpbusd` operand, 16 rows an
AMX B tile). K is padded with zeros to a multiple of 64 where AMX may run, else of 4;
columns past N are zero.

Paths (`host_paths()`, best first; `path=` or `TENSORC_QGEMM_PATH` forces one):

- "amx": AMX-INT8 `tdpbusd` on 32 x 32 blocks (2 x 2 int32 tiles). A's tiles are read
  in place when K is a multiple of 64 and M of 32, else from a copy with padded rows
  (`tc_qpack_a`, split by rows across threads).
  The process asks Linux for the tile state once (arch_prctl ARCH_REQ_XCOMP_PERM);
  refused, the path is not offered (`amx_unavailable_reason()`). With at most 8 rows
  the best register kernels (vnni, avxvnni, portable) run instead: a 16-row tile would be
  mostly padding.
- "vnni": AVX-512 VNNI `vpdpbusd`: MR x 32 register tiles of int32 accumulators, A's 4
  bytes broadcast from its rows (no packing), kernels specialised on 1..8 rows.
- "avxvnni": the same with 256-bit AVX-VNNI, for hosts that have it without AVX-512
  (compiled without AVX-512: VEX encoding, 16 ymm registers), 3-row tiles.
- "portable": the same tiles with exact i16 products summed in pairs into i32 (never
  the saturating u8 x s8 `vpmaddubsw`), compiled with the host's features minus VNNI
  and AMX, so LLVM cannot emit them.

Every block's int32 sums go through one epilogue (`qgemm_ir.tc_qepi`) while they are in
L1. Threads: the column-panel pairs are cut into items that the pool's threads claim
(each streams its part of B once), or the rows when there are fewer pairs than items;
few rows (a decode step) stream B once, split by columns when B is big enough.

`qgemm()` is the numpy-level API, `bind()` the runtime's (checks and argument block
once, `run.patch(role, address)` to move operands).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from tensorc.errors import ShapeError, TensorcError

from . import pool
from .gemm import _activation_name, _split, _workspaces, prepare_steps, run_steps
from .gemm_ir import ITEMS_PER_THREAD
from .jit import compile_library, target
from .pool import num_threads
from .qgemm_ir import (
    ACT_IDS,
    AMX_KB,
    AMX_ROWS,
    MR,
    NR,
    PANEL,
    PARAMS,
    TILE_WORDS,
    P,
    build_module,
    symbols,
)

PATHS = ("amx", "vnni", "avxvnni", "portable")
_NO_VNNI = ("avx512vnni", "avxvnni", "avxvnniint8", "avxvnniint16", "amx-tile", "amx-int8",
            "amx-bf16", "amx-fp16", "amx-complex")

_amx_reason: str | None = None
_amx_asked = False
_amx_lock = threading.Lock()


def _features() -> dict:
    """{feature: on} of the host CPU (as LLVM sees it)."""
    return {f[1:]: f[0] == "+" for f in target().features.split(",") if f}


def amx_unavailable_reason() -> str | None:
    """None when AMX-INT8 can run here (the CPU has it and Linux granted this process
    the tile state, asked once), else why not."""
    global _amx_reason, _amx_asked
    with _amx_lock:
        if not _amx_asked:
            _amx_asked = True
            feats = _features()
            if not (feats.get("amx-int8") and feats.get("amx-tile")):
                _amx_reason = "the CPU has no AMX-INT8"
            elif not target().triple.startswith("x86_64") or not hasattr(os, "uname") \
                    or os.uname().sysname != "Linux":
                _amx_reason = "AMX needs Linux on x86-64 (arch_prctl)"
            else:
                libc = ctypes.CDLL(None, use_errno=True)
                # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
                if libc.syscall(158, 0x1023, 18) != 0:
                    err = ctypes.get_errno()
                    _amx_reason = (f"Linux refused the AMX tile state "
                                   f"(arch_prctl ARCH_REQ_XCOMP_PERM: {os.strerror(err)})")
        return _amx_reason


def path_unavailable_reason(path: str) -> str | None:
    """None when `path` can run on this host, else why not."""
    if path not in PATHS:
        return f"unknown path {path!r}; known: {', '.join(PATHS)}"
    if path == "amx":
        return amx_unavailable_reason()
    feats = _features()
    if path == "vnni" and not (feats.get("avx512vnni") and feats.get("avx512bw")):
        return "the CPU has no AVX-512 VNNI"
    if path == "avxvnni" and not feats.get("avxvnni"):
        return "the CPU has no AVX-VNNI"
    return None


def host_paths() -> list[str]:
    """The paths this host can run, best first."""
    return [p for p in PATHS if path_unavailable_reason(p) is None]


def default_path() -> str:
    """`TENSORC_QGEMM_PATH` when set (and runnable), else the best of `host_paths()`."""
    env = os.environ.get("TENSORC_QGEMM_PATH")
    if env:
        return _check_path(env)
    return host_paths()[0]


def _check_path(path: str) -> str:
    why = path_unavailable_reason(path)
    if why:
        raise TensorcError(f"qgemm: path {path!r} cannot run here: {why}")
    return path


_lib: dict[str, dict[str, int]] = {}
_lib_lock = threading.Lock()


def kernels(path: str) -> dict[str, int]:
    """The pool jobs of one path's module (compiled once, cached on disk)."""
    with _lib_lock:
        if path not in _lib:
            name, build, vectorize, unroll, features = ahead(path)
            _lib[path] = compile_library(name, build, symbols(path), vectorize, unroll,
                                         features)
        return _lib[path]


def features(path: str) -> str | None:
    """The target features a path's module is compiled for (None: the host's):
    portable without VNNI and AMX, avxvnni without AVX-512 (VEX encoding, 16 ymm
    registers: as on the hosts it is for)."""
    if path == "portable":
        return target().features_without(*_NO_VNNI)
    if path == "avxvnni":
        wide = [f[1:] for f in target().features.split(",")
                if f[1:].startswith(("avx512", "avx10", "amx", "evex512"))]
        return target().features_without(*wide)
    return None


def ahead(path: str) -> tuple:
    """(name, build, vectorize, unroll, features) of a path's library module: built
    without LLVM's loop passes (hand-vectorised, as the float GEMM)."""
    return (f"qgemm/{path}", lambda: build_module(path), False, False, features(path))


# -- packing ----------------------------------------------------------------------------

def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes]


class PackedQB:
    """An int8 weight B [K, N] packed once (see the module docstring), with its int32
    column sums. Pass it to `qgemm`/`bind` on every call."""

    ndim = 2

    def __init__(self, b, threads: int | None = None, path: str | None = None):
        b = np.asarray(b)
        if b.dtype != np.int8:
            raise TensorcError(f"qgemm: b must be int8, got {b.dtype}")
        if b.ndim != 2:
            raise ShapeError(f"qgemm: can only pack a 2-D B, got shape {b.shape}")
        self.k, self.n = b.shape
        amx = path == "amx" or (path is None and "amx" in host_paths())
        self.kp = -(-self.k // AMX_KB) * AMX_KB if amx else -(-self.k // 4) * 4
        self.panels = -(-self.n // NR) * 2   # an even count: the kernels take pairs
        self.data = _aligned(max(1, self.kp * self.panels * PANEL))
        self.colsum = np.zeros(self.panels * PANEL, np.int32)
        self.ptr = self.data.ctypes.data
        self.fill(b)

    def fill(self, b: np.ndarray) -> None:
        """Pack `b` (int8 [K, N]) into this buffer (numpy: done once for a weight; a B
        that changes every call is packed again by its bound call)."""
        pad = np.zeros((self.kp, self.panels * PANEL), np.int8)
        pad[:self.k, :self.n] = b
        # [kp/4, 4, panels, 16] -> [panels, kp/4, 16, 4]: a panel's group of 4 k is a row
        self.data[:pad.size] = pad.reshape(self.kp // 4, 4, self.panels, PANEL) \
            .transpose(2, 0, 3, 1).reshape(-1).view(np.uint8)
        self.colsum[:self.n] = b.sum(axis=0, dtype=np.int64).astype(np.int32)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


# -- binding ----------------------------------------------------------------------------

def _as2d(x: np.ndarray, cols: int) -> np.ndarray | None:
    """[..., rows, cols] as a 2-D view of the same memory, or None."""
    if x.ndim == 2:
        return x
    try:
        view = x.view()
        view.shape = (-1, cols)
        return view
    except (AttributeError, ValueError):
        return None


def _row_vector(x, rows: int, what: str, dtypes) -> np.ndarray:
    """A per-row operand: a scalar or an array of `rows`, or of M (repeated per batch)."""
    x = np.asarray(x)
    if x.dtype not in dtypes:
        x = x.astype(dtypes[0])
    if x.size != 1 and x.ndim != 1:
        raise ShapeError(f"qgemm: {what} must be a scalar or 1-D, got shape {x.shape}")
    if x.size == 0 or rows % x.size:
        raise ShapeError(f"qgemm: {what} has {x.size} values for {rows} rows")
    return np.ascontiguousarray(x.reshape(-1))


def bind(a, b, out, *, a_zero=None, row_scale=None, col_scale=None, bias=None,
         activation: str | None = None, residual=None, threads: int | None = None,
         path: str | None = None):
    """A zero-argument function computing qgemm(a, b, out=out, ...) into `out`.

    Checks, the schedule and the argument block are made here once. `b` is a
    `PackedQB` (a weight, packed once), else an int8 [K, N] array packed again on every
    call (numpy). The function has `patch(role, address)` for roles "a", "out",
    "a_zero", "row_scale", "col_scale", "bias", "residual" (same layout, other memory;
    "b", packed, is ignored), unless B is such an array or an operand had to be
    converted or copied here (a dtype other than the kernel reads, a residual that is
    not rows): then the runtime binds again when an operand moves. One caller at a
    time."""
    threads = num_threads() if threads is None else max(1, int(threads))
    act = _activation_name(activation)
    forced = path is not None or bool(os.environ.get("TENSORC_QGEMM_PATH"))
    path = _check_path(path) if path is not None else default_path()
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise TensorcError(f"qgemm: a must be uint8, got {a.dtype}")
    if a.ndim < 2:
        raise ShapeError(f"qgemm: a must have at least 2 dims, got shape {a.shape}")
    per_call = None if isinstance(b, PackedQB) else np.asarray(b)
    packed = b if per_call is None else PackedQB(b, threads, path)
    if path == "amx" and packed.kp % AMX_KB and not forced:   # packed for another path
        path = next(p for p in PATHS[1:] if path_unavailable_reason(p) is None)
    if path == "amx" and packed.kp % AMX_KB:
        raise TensorcError("qgemm: this PackedQB was packed for another path "
                           "(K padded to 4): pack it with path='amx'")
    K, N = packed.shape
    if a.shape[-1] != K:
        raise ShapeError(f"qgemm: inner dims differ: a {a.shape} @ b {packed.shape}")
    shape = a.shape[:-1] + (N,)
    is_float = row_scale is not None or col_scale is not None
    odt = np.float32 if is_float else np.int32
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != odt \
            or not out.flags.writeable:
        raise TensorcError(f"qgemm: out must be a writeable {np.dtype(odt)} {shape} array")
    if not is_float and (bias is not None or residual is not None or act != "none"):
        raise TensorcError("qgemm: bias, activation and residual need a float result "
                           "(row_scale and/or col_scale)")
    a2, out2 = _as2d(a, K), _as2d(out, N)
    rows = int(np.prod(a.shape[:-1]))
    copied = set()   # roles whose operand was converted or copied here: then no `patch`
    a_in = out_back = None   # operands that are not rows: copied in and out on each call
    if a2 is None or a2.size and (a2.strides[1] != 1 or a2.strides[0] < 0):
        a_in, a2 = a, np.empty((rows, K), np.uint8)
        copied.add("a")
    if out2 is None or out2.size and (out2.strides[1] != out2.itemsize or out2.strides[0] < 0
                                      or out2.strides[0] % out2.itemsize):
        out_back, out2 = out, np.empty((rows, N), odt)
        copied.add("out")
    M = a2.shape[0]
    keep = [packed, a2, out2]   # the kernels hold their addresses

    def mark(role, given, used):
        if not (isinstance(given, np.ndarray) and np.shares_memory(given, used)):
            copied.add(role)
    words = dict.fromkeys(PARAMS, 0)
    words.update(a=a2.ctypes.data, lda=a2.strides[0], k=K, b=packed.ptr, kp=packed.kp, n=N,
                 colsum=packed.colsum.ctypes.data, out=out2.ctypes.data,
                 ldo=out2.strides[0] // out2.itemsize, out_float=int(is_float),
                 act=ACT_IDS[act], m=M)
    if a_zero is not None:
        if isinstance(a_zero, (int, np.integer)):
            az = np.array([a_zero], np.int32)
        else:
            az = _row_vector(a_zero, M, "a_zero", (np.int32, np.uint8))
            mark("a_zero", a_zero, az)
        keep.append(az)
        words.update(az=az.ctypes.data, az_kind=1 if az.dtype == np.uint8 else 2,
                     az_rows=az.size)
    if row_scale is not None:
        rs = _row_vector(row_scale, M, "row_scale", (np.float32,))
        mark("row_scale", row_scale, rs)
        keep.append(rs)
        words.update(rs=rs.ctypes.data, has_rs=1, rs_rows=rs.size)
    if col_scale is not None:
        cs = np.asarray(col_scale)
        if cs.dtype != np.float32:
            cs = cs.astype(np.float32)
        if cs.size != 1 and cs.shape != (N,):
            raise ShapeError(f"qgemm: col_scale must be a scalar or ({N},), got {cs.shape}")
        cs = np.ascontiguousarray(cs.reshape(-1))
        mark("col_scale", col_scale, cs)
        keep.append(cs)
        words.update(cs=cs.ctypes.data, has_cs=1, cs_stride=int(cs.size != 1))
    if bias is not None:
        given, bias = bias, np.ascontiguousarray(np.asarray(bias, np.float32))
        mark("bias", given, bias)
        if bias.shape != (N,):
            raise ShapeError(f"qgemm: bias shape {bias.shape} should be ({N},)")
        keep.append(bias)
        words.update(bias=bias.ctypes.data, has_bias=1)
    if residual is not None:
        given, residual = residual, np.asarray(residual, np.float32)
        try:
            residual = np.broadcast_to(residual, shape)
        except ValueError:
            raise ShapeError(f"qgemm: residual {residual.shape} does not broadcast to "
                             f"{shape}") from None
        r2 = _as2d(residual, N)
        if r2 is None or r2.strides[1] != 4 or r2.strides[0] % 4 \
                or np.may_share_memory(r2, out2):
            r2 = np.ascontiguousarray(residual).reshape(-1, N) if \
                not np.may_share_memory(residual, out2) else residual.copy().reshape(-1, N)
        mark("residual", given, r2)
        keep.append(r2)
        words.update(res=r2.ctypes.data, ldr=r2.strides[0] // 4, has_res=1)
    if np.may_share_memory(a2, out2):
        a2 = a2.copy()
        copied.add("a")
        keep.append(a2)
        words.update(a=a2.ctypes.data, lda=a2.strides[0])
    params = np.array([words[w] for w in PARAMS], np.int64)
    if M == 0 or N == 0:
        def nothing():
            pass
        nothing.patch = lambda role, address: None
        return nothing
    steps = _schedule(path, M, K, packed, threads, params, keep)
    workers = pool.get(threads) if threads > 1 and any(len(s[2]) > 1 for s in steps) \
        else None
    state = {"key": None}

    def run():
        if per_call is not None:   # B is not a packed weight: it may have changed
            packed.fill(per_call)
        if a_in is not None:
            a2[...] = a_in.reshape(a2.shape)
        compute()
        if out_back is not None:
            out_back[...] = out2.reshape(out_back.shape)

    def compute():
        key = _workspaces(("qtile", TILE_WORDS))[0]   # a call may come from another thread
        if key != state["key"]:
            prepare_steps(state, key, steps, workers)
        run_steps(state, workers)

    roles = {"a": "a", "out": "out", "a_zero": "az", "row_scale": "rs", "col_scale": "cs",
             "bias": "bias", "residual": "res"}

    def patch(role: str, address: int) -> None:
        if role == "b":
            return   # packed once
        if role not in roles:
            raise KeyError(role)
        word = roles[role]
        if params[P[word]] == 0 and role not in ("a", "out"):
            return   # not an operand of this call
        if role == "a" and params[P["ap"]] == params[P["a"]]:
            params[P["ap"]] = address   # the AMX tiles read A in place
        params[P[word]] = address
    if not copied and per_call is None:   # else the runner binds again when one moves
        run.patch = patch
    run.keep = keep
    run.params = params
    run.path = path
    return run


SMALL_WORK = 1 << 20    # multiply-adds below which one thread does it all
STREAM_THREADED = 1 << 18   # bytes of B from which a few-row product is split


def _schedule(path, M, K, packed, threads, params, keep) -> list:
    """The pool jobs (job, fixed args, items, workspace) of one product."""
    pairs = packed.panels // 2
    ws = ("qtile", TILE_WORDS)
    fixed = [params.ctypes.data]
    keep.append(params)
    if path == "amx" and M <= MR:   # a decode step: the register kernels (see docstring)
        path = next(p for p in PATHS[1:] if path_unavailable_reason(p) is None)
    few = M <= MR
    if threads == 1 or (M * packed.n * K < SMALL_WORK and not few) \
            or (few and K * packed.n < STREAM_THREADED):
        parts = 1
    else:
        parts = ITEMS_PER_THREAD * threads
    rows = AMX_ROWS if path == "amx" else MR
    if parts == 1 or pairs >= 2 * threads or few:
        items = [(0, M, *r) for r in _split(pairs, parts, 1)]
    else:
        items = [(m0, m1, 0, pairs) for m0, m1 in _split(M, parts, rows)]
    jobs = kernels(path)
    steps = [(jobs[f"tc_qgemm_{path}_job"], fixed, items, ws)]
    if path == "amx" and K % AMX_KB == 0 and M % AMX_ROWS == 0:
        # A's rows are whole tiles: read in place (`patch("a")` moves `ap` with it)
        params[P["ap"]], params[P["ldap"]] = params[P["a"]], params[P["lda"]]
    elif path == "amx":
        mp = -(-M // AMX_ROWS) * AMX_ROWS
        ap = _aligned(max(1, mp * packed.kp))
        keep.append(ap)
        params[P["ap"]], params[P["ldap"]] = ap.ctypes.data, packed.kp
        steps.insert(0, (jobs["tc_qpack_a_job"], fixed,
                         _split(mp, 1 if parts == 1 else threads, AMX_ROWS), None))
    return steps


def qgemm(a, b, out=None, *, a_zero=None, row_scale=None, col_scale=None, bias=None,
          activation: str | None = None, residual=None, threads: int | None = None,
          path: str | None = None) -> np.ndarray:
    """The int8 product (see the module docstring): int32 [..., M, N] without scales,
    else float32. `a` uint8 [..., M, K], `b` int8 [K, N] or a `PackedQB`; a_zero None, an
    int, or a uint8/int32 array of one value per row; row_scale float32 scalar or per
    row, col_scale scalar or [N]; bias [N]; activation None, "relu", "gelu" (=
    "gelu_erf"), "gelu_tanh"; residual broadcasts to the result."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise TensorcError(f"qgemm: a must be uint8, got {a.dtype}")
    if a.ndim < 2:
        raise ShapeError(f"qgemm: a must have at least 2 dims, got shape {a.shape}")
    if not isinstance(b, PackedQB):
        b = PackedQB(b, threads, path)
    if a.shape[-1] != b.k:
        raise ShapeError(f"qgemm: inner dims differ: a {a.shape} @ b {b.shape}")
    shape = a.shape[:-1] + (b.n,)
    odt = np.float32 if row_scale is not None or col_scale is not None else np.int32
    if out is None:
        out = np.empty(shape, odt)
    if a.strides[-1] != 1 or _as2d(a, b.k) is None or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    target_out = out
    if _as2d(out, b.n) is None:
        out = np.empty(shape, odt)
    bind(a, b, out, a_zero=a_zero, row_scale=row_scale, col_scale=col_scale, bias=bias,
         activation=activation, residual=residual, threads=threads, path=path)()
    if out is not target_out:
        target_out[...] = out
    return target_out


def flops(m: int, k: int, n: int) -> int:
    """Operations (a multiply and an add each) of an [m, k] x [k, n] product."""
    return 2 * m * k * n


__all__ = ["PackedQB", "qgemm", "bind", "host_paths", "default_path", "PATHS",
           "amx_unavailable_reason", "path_unavailable_reason", "flops"]
