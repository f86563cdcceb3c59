"""Run CUDA kernels on the CPU, slowly, to check their numbers without a GPU.

The kernel source is compiled as C++20 by the host compiler behind a small header
that plays the CUDA execution model: blocks run one after another, the threads of a
block are real threads, `__syncthreads` is a barrier over the block and warp shuffles
exchange values through a per-warp slot array between two warp barriers. `__shared__`
becomes `static`, which is right because only one block is alive at a time.

It is a test harness (tests/test_cupy_emulated.py), not a backend: use small shapes.

    lib = EmulatedModule(source, {"my_kernel": params})
    lib.launch("my_kernel", grid=(4, 1, 1), block=(128, 1, 1), args=[x, y, np.int64(n)])
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tensorc.errors import TensorcError

from . import gemm

HEADER = r"""
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::barrier<>* tc_emu_block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> tc_emu_warp_barriers;
static unsigned long long tc_emu_slots[1024];

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)

inline void __syncthreads() {
    if (!tc_emu_block_barrier) {   // launched as independent threads, but it is not
        std::fprintf(stderr, "tc-emu: barrier in a kernel launched as non-cooperative\n");
        std::abort();
    }
    tc_emu_block_barrier->arrive_and_wait();
}

template <class T> inline T tc_emu_shfl(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    unsigned me = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned warp = me / 32;
    std::memcpy(&tc_emu_slots[me], &v, sizeof(T));
    tc_emu_warp_barriers[warp]->arrive_and_wait();
    T out;
    std::memcpy(&out, &tc_emu_slots[warp * 32 + (src_lane & 31)], sizeof(T));
    tc_emu_warp_barriers[warp]->arrive_and_wait();
    return out;
}
inline void __syncwarp(unsigned = 0xffffffffu) {
    unsigned me = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    tc_emu_warp_barriers[me / 32]->arrive_and_wait();
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return tc_emu_shfl(v, src); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int m) {
    return tc_emu_shfl(v, (int)((threadIdx.x & 31) ^ m));
}
inline float __int_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { return __int_as_float(x); }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(unsigned long long x) {
    double f; std::memcpy(&f, &x, 8); return f;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
// __dp4a (sm_61+): four byte products added to c, modulo 2**32 like the hardware
inline int __dp4a(int a, int b, int c) {
    unsigned acc = (unsigned)c;
    for (int i = 0; i < 4; ++i)
        acc += (unsigned)((int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i)));
    return (int)acc;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
    return c;
}

// Threads that never synchronise run one after another on the calling thread.
template <class... A>
void tc_emu_launch_sequential(void (*kernel)(A...), dim3 grid, dim3 block, A... args) {
    gridDim = grid;
    blockDim = block;
    tc_emu_block_barrier = nullptr;
    unsigned n = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx)
    for (unsigned t = 0; t < n; ++t) {
        blockIdx = {bx, by, bz};
        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        kernel(args...);
    }
}

template <class... A>
void tc_emu_launch(void (*kernel)(A...), dim3 grid, dim3 block, A... args) {
    unsigned n = block.x * block.y * block.z;
    gridDim = grid;
    blockDim = block;
    std::barrier<> bar(n);
    tc_emu_block_barrier = &bar;
    tc_emu_warp_barriers.clear();
    for (unsigned w = 0; w < (n + 31) / 32; ++w)
        tc_emu_warp_barriers.emplace_back(new std::barrier<>(n - 32 * w < 32 ? n - 32 * w : 32));
    // One host thread per CUDA thread for the whole launch; they walk the blocks in
    // step, with a barrier after each block so its shared memory is free again.
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; ++t)
        threads.emplace_back([=, &bar] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                kernel(args...);
                bar.arrive_and_wait();
            }
        });
    for (auto& th : threads) th.join();
}
"""

_CTYPES = {"tc_i64": ctypes.c_int64, "long long": ctypes.c_int64, "int": ctypes.c_int32,
           "float": ctypes.c_float, "double": ctypes.c_double}


def _ctype(c_type: str):
    return ctypes.c_void_p if c_type.endswith("*") else _CTYPES[c_type]


def _wrapper(name: str, params, cooperative: bool) -> str:
    """extern "C" emu_<name>(grid, block, void** args): unpacks and launches."""
    unpack = ", ".join(f"*({t}*)args[{i}]" for i, (t, _) in enumerate(params))
    launcher = "tc_emu_launch" if cooperative else "tc_emu_launch_sequential"
    return (f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            f'unsigned by, unsigned bz, void** args) {{\n'
            f'    {launcher}({name}, dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}'
            f'{", " + unpack if unpack else ""});\n}}\n')


def host_compiler() -> str | None:
    return shutil.which("g++")


class EmulatedModule:
    """A CUDA source compiled for the CPU emulator; `launch` runs one kernel."""

    def __init__(self, source: str, kernels: dict[str, tuple[tuple[str, str], ...]],
                 independent: frozenset[str] = frozenset()):
        """`independent` names kernels whose threads never synchronise: they run on one
        host thread, much faster."""
        cxx = host_compiler()
        if cxx is None:
            raise TensorcError("the CUDA emulator needs g++ (C++20), which is not installed")
        self.kernels = dict(kernels)
        text = HEADER + source + "".join(_wrapper(n, p, n not in independent)
                                         for n, p in kernels.items())
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._dir = tempfile.mkdtemp(prefix="tc-cuda-emu-")
        src, lib = Path(self._dir) / f"{key}.cpp", Path(self._dir) / f"{key}.so"
        src.write_text(text)
        proc = subprocess.run([cxx, "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-pthread",
                               str(src), "-o", str(lib)], capture_output=True, text=True)
        if proc.returncode:
            raise TensorcError(f"emulated CUDA source does not compile:\n{proc.stderr[-4000:]}")
        self._lib = ctypes.CDLL(str(lib))

    def launch(self, name: str, grid, block, args) -> None:
        params = self.kernels[name]
        if len(args) != len(params):
            raise TensorcError(f"{name} takes {len(params)} arguments, got {len(args)}")
        keep = []   # the ctypes objects must live until the call returns
        for (c_type, _), a in zip(params, args, strict=True):
            if c_type.endswith("*"):
                keep.append(ctypes.c_void_p(0 if a is None else np.asarray(a).ctypes.data))
            else:
                keep.append(_ctype(c_type)(a.item() if isinstance(a, np.generic) else a))
        argv = (ctypes.c_void_p * max(1, len(keep)))(
            *[ctypes.cast(ctypes.pointer(k), ctypes.c_void_p) for k in keep])
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        getattr(self._lib, f"emu_{name}")(*[ctypes.c_uint(int(v)) for v in grid + block], argv)


class EmulatedRuntime:
    """The cupy backend's runtime interface on the CPU: numpy arrays stand for device
    memory, kernels run in the emulator, matmuls in numpy. Lets the tests run the
    backend's executable (buffer plan, launches, library calls) end to end."""

    name = "emulated"
    xp = np

    def __init__(self, can_capture: bool = False, device_inputs: bool = False):
        """`can_capture`: emulate CUDA-graph capture (record the launches, replay them;
        a host round trip while recording fails, as it does on a GPU).
        `device_inputs`: treat numpy inputs as device arrays (read in place)."""
        self.can_capture, self.device_inputs = can_capture, device_inputs
        self.launches = 0
        self._recording: list | None = None

    def load(self, source: str, kernels: dict, independent=frozenset()) -> dict:
        mod = EmulatedModule(source, kernels, frozenset(independent))
        return {name: (mod, name) for name in kernels}

    def launch(self, fn, params, grid, block, args) -> None:
        if self._recording is not None:
            self._recording.append(lambda: self.launch(fn, params, grid, block, args))
            return
        mod, name = fn
        self.launches += 1
        mod.launch(name, grid, block, args)

    def upload(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).copy()

    def empty(self, nbytes: int) -> np.ndarray:
        return np.full(max(nbytes, 1), 0xFF, np.uint8)  # garbage-like: all-ones bytes

    def view(self, base, offset: int, shape, dtype, strides) -> np.ndarray:
        return np.ndarray(tuple(shape), dtype, buffer=base, offset=offset,
                          strides=tuple(strides))

    def is_device_array(self, a) -> bool:
        return self.device_inputs and isinstance(a, np.ndarray)

    def copy_in(self, dst, a) -> None:
        dst[...] = np.asarray(a).reshape(-1)

    def to_host(self, a) -> np.ndarray:
        if self._recording is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return np.array(a)

    def bind_matmul(self, a, b, out, precision: str):
        """float32: the GPU's cuBLAS plan, run by numpy; anything else: np.matmul."""
        if not a.dtype == b.dtype == out.dtype == np.float32:
            return self._recordable(lambda: np.matmul(a, b, out=out))
        a2 = np.ascontiguousarray(a) if gemm.needs_copy(a.shape, _elem(a)) else a
        b2 = np.ascontiguousarray(b) if gemm.needs_copy(b.shape, _elem(b)) else b
        calls = gemm.plan_gemm(a2.shape, _elem(a2), b2.shape, _elem(b2), out.shape, _elem(out))

        def run():
            a3 = np.ascontiguousarray(a) if a2 is not a else a   # copies made per call
            b3 = np.ascontiguousarray(b) if b2 is not b else b
            gemm.run_plan_numpy(calls, _flat(a3), _flat(b3), _flat(out))
        return self._recordable(run)

    def _recordable(self, fn):
        def call():
            if self._recording is not None:
                self._recording.append(fn)
            else:
                fn()
        return call

    def capture(self, run):
        run()                                   # warm-up, as on the GPU
        self._recording = []
        try:
            run()
            recorded = self._recording
        finally:
            self._recording = None

        def replay():
            for call in recorded:
                call()
        return replay

    def synchronize(self) -> None:
        pass


def _elem(a: np.ndarray) -> list[int]:
    return [s // a.itemsize for s in a.strides]


def _flat(a: np.ndarray) -> np.ndarray:
    """A flat array over the memory `a` spans, from its first element on."""
    span = 1 + sum((n - 1) * s for n, s in zip(a.shape, _elem(a), strict=True) if s > 0)
    return np.lib.stride_tricks.as_strided(a, (span,), (a.itemsize,))
