"""The CUDA GPU backend, through cupy.

    exe = get_backend("cupy").compile(graph)          # needs cupy and a CUDA device
    exe = CupyBackend(precision="tf32").compile(graph)
    CupyBackend().emit_source(graph, "out/")          # needs neither: writes .cu files

Per set of input shapes the graph is lowered once (`backends/lowering/`) to the same
Program the LLVM backend runs: its loop-nest kernels are rendered to CUDA C by
`cuda_codegen.py` and loaded with `cupy.RawModule` (one module per Program, cached
by source hash); float32 matmuls are cuBLAS strided-batched GEMMs planned once per
Program on the views as they lie (`gemm.py`; called through ctypes, since cupy's
cuBLAS wrappers refuse to run during a CUDA-graph capture), and the bias /
activation / residual after one a generated kernel; `attention` calls run the
flash-attention kernel of `kernels.py`, `local_attention` / `block_sparse_attention` /
`linear_attention` those of `attention_kernels.py`, `matmul_integer` its __dp4a integer GEMM;
the few steps without a GPU lowering run their numpy reference on the host. Device
memory is one arena per Program from cupy's pool, laid out by the Program's liveness
plan. Each Program's launch
sequence is captured once in a CUDA graph and replayed (unless it has host steps).

Precision: float32 matmuls use full fp32 (TF32 off) so results match numpy at
1e-4. `precision="tf32"` lets cuBLAS use TF32 tensor cores (inputs rounded to 10
mantissa bits); `precision="fp16"` lets it round inputs to fp16 for the tensor
cores (CUBLAS_COMPUTE_32F_FAST_16F: fp32 data, fp32 accumulation). Everything else
stays float32. The GPU tests hold them to max relative errors of 1e-2 (tf32) and
2e-2 (fp16) on the built-in models; benchmarks/README.md has the measured ones.
cupy has no bfloat16 array type, so there is no bf16 mode.

This module imports without cupy; `get_backend("cupy")` raises a TensorcError
naming why the backend is unavailable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tensorc.errors import FallbackError, InputError, TensorcError
from tensorc.ir import DTYPES, Graph, TensorType, bind_shapes, dim_symbols
from tensorc.ops import get_op
from tensorc.ops.collective import COLLECTIVES

from .. import Backend, Executable, check_shapes
from .. import lowering as L
from ..lowering.walk import strict
from . import attention_kernels as ak
from . import gemm
from . import kernels as lib
from .cuda_codegen import render_kernel

PRECISIONS = ("fp32", "tf32", "fp16")
# cuBLAS cannot apply a bias, activation or residual: those stay generated kernels
# (rendered from the same kernel IR, with the shared gelu maths) after the GEMM.
# `matmul_integer` is the hand-written __dp4a kernel (kernels.py); sparse and linear
# attention have kernels of their own (attention_kernels.py).
LOWERING = {"gemm_epilogues": False, "grad_kernels": False, "int8_gemm": "batched",
            "bf16_weights": False, "sparse_attention": True, "linear_attention": True}


def unavailable_reason() -> str | None:
    """Why the GPU backend cannot run here, or None if it can."""
    try:
        import cupy
    except ImportError:
        return ("cupy is not installed (pip install tensorc[gpu] for CUDA 12, "
                "tensorc[gpu-cuda13] for CUDA 13)")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError, or a driver that fails to load
        return f"no CUDA device found ({str(e).strip().splitlines()[0] if str(e) else e})"
    return None if count else "no CUDA device found"


def require_cupy():
    reason = unavailable_reason()
    if reason:
        raise TensorcError(f"the cupy backend is unavailable: {reason}")
    import cupy
    return cupy


# --- runtimes: where arrays live and kernels run ----------------------------------------

_C_SCALARS = {"tc_i64": np.int64, "long long": np.int64, "int": np.int32,
              "float": np.float32, "double": np.float64}


class CupyRuntime:
    """Device memory, kernel modules and cuBLAS through cupy. `EmulatedRuntime`
    (emulate.py) offers the same methods on the CPU, so the executable's logic is
    tested without a GPU."""

    name = "cuda"
    can_capture = True

    def __init__(self):
        self.cp = require_cupy()
        self.xp = self.cp
        self._modules: dict[str, object] = {}

    def load(self, source: str, kernels: dict, independent=frozenset()) -> dict:
        key = hashlib.sha256(source.encode()).hexdigest()
        if key not in self._modules:
            self._modules[key] = self.cp.RawModule(code=source)
        try:   # NVRTC compiles on the first lookup; its errors carry the compiler log
            return {name: self._modules[key].get_function(name) for name in kernels}
        except self.cp.cuda.compiler.CompileException as e:
            raise TensorcError(f"generated CUDA source does not compile: {e}") from None

    def launch(self, fn, params, grid, block, args) -> None:
        fn(tuple(grid), tuple(block), self.pack(params, args))

    @staticmethod
    def pack(params, args) -> tuple:
        """Arguments converted to exactly the kernel's parameter types."""
        out = []
        for (c_type, _), a in zip(params, args, strict=True):
            if c_type.endswith("*"):
                out.append(np.uint64(0) if a is None else a)
            else:
                out.append(_C_SCALARS[c_type](a))
        return tuple(out)

    def upload(self, a: np.ndarray):
        return self.cp.asarray(np.ascontiguousarray(a))

    def empty(self, nbytes: int):
        return self.cp.empty(max(nbytes, 1), np.uint8)

    def view(self, base, offset: int, shape, dtype, strides):
        return self.cp.ndarray(tuple(shape), dtype, memptr=base.data + offset,
                               strides=tuple(strides))

    def is_device_array(self, a) -> bool:
        return isinstance(a, self.cp.ndarray)

    def copy_in(self, dst, a) -> None:
        """Fill the flat arena slot `dst` from a host or device array."""
        if self.is_device_array(a):
            dst[...] = a.reshape(-1)      # device to device, no host round trip
        else:
            dst.set(np.ascontiguousarray(a).reshape(-1))

    def to_host(self, a) -> np.ndarray:
        return self.cp.asnumpy(a)

    def bind_matmul(self, a, b, out, precision: str):
        """A function computing out = a @ b with cuBLAS, planned once for these views.
        float32 goes through our own cuBLAS (cupy refuses cuBLAS calls while a CUDA
        graph is being captured); other dtypes through cupy.matmul (never captured)."""
        cp = self.cp
        if not a.dtype == b.dtype == out.dtype == np.float32:
            return lambda: cp.matmul(a, b, out=out)
        copies = []   # operands cuBLAS cannot read in place, copied before each call

        def operand(x):
            if not gemm.needs_copy(x.shape, [st // x.itemsize for st in x.strides]):
                return x
            y = cp.empty(x.shape, x.dtype)
            copies.append(lambda: y.__setitem__(Ellipsis, x))
            return y

        a2, b2 = operand(a), operand(b)
        c2 = out if out.flags.c_contiguous else cp.empty(out.shape, out.dtype)
        calls = gemm.plan_gemm(*(
            v for x in (a2, b2, c2) for v in (x.shape, [st // x.itemsize for st in x.strides])))
        blas = _cublas(cp)
        args = [blas.gemm_args(g, a2.data.ptr, b2.data.ptr, c2.data.ptr, precision)
                for g in calls]
        copy_out = (lambda: None) if c2 is out else (lambda: out.__setitem__(Ellipsis, c2))

        def run():
            for f in copies:
                f()
            blas.set_stream(cp.cuda.get_current_stream().ptr)
            for g in args:
                blas.gemm(*g)
            copy_out()
        return run

    def synchronize(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()

    def capture(self, run):
        """A CUDA graph of `run()`'s launches on a private stream, replayed by calling
        the returned function; raises if the stream cannot be captured."""
        stream = self.cp.cuda.Stream(non_blocking=True)
        # Temporaries that cupy allocates while recording get addresses baked into
        # the graph, so they come from a pool of the graph's own:
        # freed into the shared pool they could be handed to an array the caller keeps,
        # and the next replay would overwrite it. The warm-up fills this pool with the
        # blocks the recording asks for, so nothing is cudaMalloc'ed while capturing.
        pool = self.cp.cuda.MemoryPool()
        with stream, self.cp.cuda.using_allocator(pool.malloc):
            run()
            stream.synchronize()
            stream.begin_capture()
            try:
                run()
            finally:
                graph = stream.end_capture()

        def replay():
            # The inputs were copied in on the caller's stream: finish that first.
            self.cp.cuda.get_current_stream().synchronize()
            graph.launch(stream)
            stream.synchronize()
        replay.pool = pool             # lives as long as the graph
        return replay


class _Cublas:
    """cuBLAS called directly (ctypes releases the GIL): cupy's wrappers refuse to run
    while a stream is capturing, cuBLAS itself captures fine. One handle per process,
    with a workspace of its own so that a capture never allocates; executables run
    one call at a time (each replay and eager run ends synchronised), so they share
    it safely."""

    R_32F = 0                                   # cudaDataType
    COMPUTE = {"fp32": 68, "tf32": 77, "fp16": 74}   # cublasComputeType_t: 32F, 32F_FAST_TF32,
    GEMM_DEFAULT = -1                                # 32F_FAST_16F
    WORKSPACE_BYTES = 32 << 20

    def __init__(self, cp):
        import ctypes as C
        lib = _load_cublas(C)
        self.handle = C.c_void_p()
        _check(lib.cublasCreate_v2(C.byref(self.handle)), "cublasCreate")
        self.workspace = cp.empty(self.WORKSPACE_BYTES, np.uint8)
        lib.cublasSetWorkspace_v2.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t]
        _check(lib.cublasSetWorkspace_v2(self.handle, self.workspace.data.ptr,
                                         self.WORKSPACE_BYTES), "cublasSetWorkspace")
        lib.cublasSetStream_v2.argtypes = [C.c_void_p, C.c_void_p]
        i, ll, p = C.c_int, C.c_longlong, C.c_void_p
        self._gemm = lib.cublasGemmStridedBatchedEx
        self._gemm.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll,
                               i, i, i]
        self._set_stream = lib.cublasSetStream_v2
        # alpha and beta: host memory, read by each call (and baked into a captured graph)
        self.one, self.zero = np.ones(1, np.float32), np.zeros(1, np.float32)

    def gemm_args(self, g: gemm.GemmCall, pa: int, pb: int, pc: int, precision: str):
        f32 = self.R_32F
        return (self.handle, g.op_b, g.op_a, g.m, g.n, g.k, self.one.ctypes.data,
                pb + 4 * g.offset_b, f32, g.ld_b, g.stride_b,
                pa + 4 * g.offset_a, f32, g.ld_a, g.stride_a,
                self.zero.ctypes.data, pc + 4 * g.offset_c, f32, g.ld_c, g.stride_c,
                g.batch, self.COMPUTE[precision], self.GEMM_DEFAULT)

    def gemm(self, *args) -> None:
        _check(self._gemm(*args), "cublasGemmStridedBatchedEx")

    def set_stream(self, stream_ptr: int) -> None:
        _check(self._set_stream(self.handle, stream_ptr), "cublasSetStream")


def _load_cublas(ctypes):
    """The libcublas cupy uses (found the way cupy finds it), else the system's."""
    paths = []
    try:   # cupy >= 14 finds its CUDA libraries with cuda.pathfinder
        from cuda import pathfinder
        paths.append(pathfinder.load_nvidia_dynamic_lib("cublas").abs_path)
    except Exception:  # older cupy: the nvidia-cublas wheel, else the loader's search path
        try:
            import nvidia.cublas
            lib_dir = Path(next(iter(nvidia.cublas.__path__))) / "lib"
            paths += sorted(str(p) for p in lib_dir.glob("libcublas.so.*"))
        except Exception:
            pass
    for path in [*filter(None, paths), "libcublas.so.13", "libcublas.so.12", "libcublas.so"]:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    raise TensorcError("the cupy backend cannot load libcublas")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise TensorcError(f"{what} failed: cuBLAS status {status}")


_CUBLAS: dict[int, _Cublas] = {}


def _cublas(cp) -> _Cublas:
    """This process's cuBLAS for the current device (made once, kept)."""
    device = cp.cuda.runtime.getDevice()
    if device not in _CUBLAS:
        _CUBLAS[device] = _Cublas(cp)
    return _CUBLAS[device]


# --- the executable ---------------------------------------------------------------------

class _Prepared:
    """One Program made runnable: kernels loaded, arena allocated, steps bound."""

    def __init__(self, exe: CupyExecutable, program: L.Program):
        self.program, self.rt = program, exe.runtime
        self.precision = exe.precision
        self.rendered = rendered = {k.name: render_kernel(k) for k in program.kernels}
        library = library_kernels(program)
        self.source = program_source(rendered, library)
        params = {n: r.params for n, r in rendered.items()}
        params.update({n: k.params for n, k in library.items()})
        self.params = params
        independent = {n for n, r in rendered.items() if not r.cooperative}
        independent |= {n for n, k in library.items() if not k.cooperative}
        self.fns = self.rt.load(self.source, params, independent) if params else {}
        self.arena = self.rt.empty(program.arena_bytes)
        self.const = exe.device_constants
        self.host_only = [s.where for s in program.steps if _runs_on_host(s)]
        self.index_checks = [s for s in program.steps if isinstance(s, L.IndexCheck)]
        self.in_place: dict = {}   # input Buf -> the caller's device array, for one call
        # id(step) -> what a library call keeps on the device across (re)binds: the
        # sparse pattern's tables, linear attention's scratch
        self.extras: dict = {}
        self.steps = [self.bind(s, rendered) for s in program.steps]
        self.input_readers = [i for i, s in enumerate(program.steps)
                              if any(b.kind == "input" for b in s.reads())]
        self.outputs = [self.array(v) for v in program.outputs]
        self.inputs = [self.array(L.View(b, 0, (b.nbytes // DTYPES[b.dtype].itemsize,), (1,)))
                       for b in program.inputs]
        self.replay = None
        self.capture_note = ""

    # -- memory --
    def base(self, buf: L.Buf):
        if buf in self.in_place:
            return self.in_place[buf], 0
        if buf.kind == "const":
            key = id(buf.data)
            if key not in self.const:
                self.const[key] = (buf.data, self.rt.upload(buf.data))
            return self.const[key][1].reshape(-1).view(np.uint8), 0
        return self.arena, buf.offset

    def array(self, v: L.View):
        base, off = self.base(v.buf)
        dtype = DTYPES[v.buf.dtype]
        return self.rt.view(base, off + v.offset * dtype.itemsize, v.shape, dtype,
                            [s * dtype.itemsize for s in v.strides])

    def pointer(self, buf: L.Buf):
        base, off = self.base(buf)
        return base[off:off + buf.nbytes]

    # -- steps --
    def bind(self, step, rendered):
        """A no-argument function running `step` (views and pointers resolved once)."""
        rt = self.rt
        if isinstance(step, L.KernelStep):
            r = rendered[step.kernel.name]
            fn, params = self.fns[r.name], r.params
            args = [self.pointer(b) for b in step.args] + [0, r.extent]
            grid, block = r.launch
            return lambda: rt.launch(fn, params, grid, block, args)
        if isinstance(step, L.IndexCheck):
            view = self.array(step.view)
            return lambda: _check_indices(view, step)
        ins = [self.array(v) for v in step.inputs]
        outs = [self.array(v) for v in step.outputs]
        if not _runs_on_host(step) and step.op == "matmul":
            if step.epilogue:   # lowered with gemm_epilogues=False: never, unless a bug
                raise TensorcError(f"{step.where}: a GEMM epilogue reached the cupy backend")
            return rt.bind_matmul(*ins, outs[0], self.precision)
        if not _runs_on_host(step) and step.op == "matmul_integer":
            launch = lib.matmul_integer_launch(*ins, outs[0])
            fn = self.fns[launch.kernel.name]
            return lambda: rt.launch(fn, launch.kernel.params, launch.grid, launch.block,
                                     launch.args)
        if not _runs_on_host(step) and step.op in SPARSE_OPS:
            if id(step) not in self.extras:   # the pattern's tables, on the device
                pat, *tables = ak.sparse_attention_tables(step.op, *ins[:3], **step.attrs)
                self.extras[id(step)] = (pat, *(rt.upload(x) for x in tables))
            launch = ak.sparse_attention_launch(
                step.op, *ins[:3], outs[0], ins[3] if len(ins) > 3 else None,
                tables=self.extras[id(step)], **step.attrs)
            return self.launcher([launch] if launch else [])
        if not _runs_on_host(step) and step.op == "linear_attention":
            if id(step) not in self.extras:   # KV state and key maxima
                n = ak.linear_scratch_floats(*ins[:4])
                self.extras[id(step)] = rt.empty(4 * n).view(np.float32)[:n]
            return self.launcher(ak.linear_attention_launches(
                *ins[:4], outs[0], ins[4] if len(ins) > 4 else None,
                scratch=self.extras[id(step)], **step.attrs))
        if not _runs_on_host(step):   # attention
            launch = lib.attention_launch(*ins[:3], outs[0], ins[3] if len(ins) > 3 else None,
                                          **step.attrs)
            fn = self.fns[launch.kernel.name]
            return lambda: rt.launch(fn, launch.kernel.params, launch.grid, launch.block,
                                     launch.args)
        opdef = get_op(step.op)   # fallback: the numpy reference, on the host

        def host():
            res = opdef.evaluate([rt.to_host(a) for a in ins], step.attrs)
            for o, r in zip(outs, res, strict=True):
                o[...] = rt.xp.asarray(r)
        return host

    def launcher(self, launches):
        """One step running `launches` (kernels.Launch) in order."""
        rt, fns = self.rt, [self.fns[x.kernel.name] for x in launches]

        def run():
            for fn, x in zip(fns, launches, strict=True):
                rt.launch(fn, x.kernel.params, x.grid, x.block, x.args)
        return run

    def run_steps(self, in_place: dict | None = None):
        """Run every step; `in_place` maps input Bufs to the caller's device arrays (flat
        bytes), read directly by the steps that read inputs (rebound for this call)."""
        steps = self.steps
        if in_place:
            self.in_place = in_place
            try:
                steps = list(steps)
                for i in self.input_readers:
                    steps[i] = self.bind(self.program.steps[i], self.rendered)
            finally:
                self.in_place = {}
        for s in steps:
            s()


def host_steps(program: L.Program) -> list[dict]:
    """What runs the numpy reference on the host: the Program's fallbacks, and library
    calls without a GPU kernel (an attention the flash kernel does not take). Collectives
    run on the host too, by design, and are no fallback: their arrays go through host
    memory to the rank's communicator (an NCCL one runs on device arrays, outside a
    compiled graph)."""
    out = program.stats()["fallbacks"]
    for s in program.steps:
        if _runs_on_host(s) and not s.fallback and s.op not in COLLECTIVES:
            kernel = KERNEL_NAMES.get(s.op, "flash-attention")
            out.append({"node": s.where, "reason": f"the {kernel} kernel takes float32 "
                        f"with head dims <= {lib.MAX_HEAD_DIM} and a contiguous head dim"})
    if out and strict():
        raise FallbackError(f"strict mode: {len(out)} op(s) would run the numpy reference "
                            "on the host: " + "; ".join(f"{f['node']} ({f['reason']})"
                                                         for f in out))
    return out


def _runs_on_host(step) -> bool:
    """Steps done by the numpy reference on the host (they cannot be in a CUDA graph)."""
    if not isinstance(step, L.Call):
        return False
    return step.fallback or not (step.op in ("matmul", "matmul_integer") or
                                 step.op in ATTENTION_OPS and _flash_fits(step))


SPARSE_OPS = ("local_attention", "block_sparse_attention")
ATTENTION_OPS = ("attention", "linear_attention", *SPARSE_OPS)
KERNEL_NAMES = {"linear_attention": "linear-attention", "local_attention": "sparse-attention",
                "block_sparse_attention": "sparse-attention"}


def _flash_fits(call: L.Call) -> bool:
    """The attention kernels' limits (flash, sparse and linear share them)."""
    q, k, v = call.inputs[:3]
    return (q.buf.dtype == "f32" and q.strides[3] == k.strides[3] == v.strides[3] == 1
            and max(q.shape[3], v.shape[3]) <= lib.MAX_HEAD_DIM
            and q.shape[0] * q.shape[1] <= lib.MAX_GRID_Y)


def _check_indices(idx, check: L.IndexCheck) -> None:
    problem = idx.size and check.problem(int(idx.min()), int(idx.max()))
    if problem:
        raise TensorcError(problem)


def library_kernels(program: L.Program) -> dict[str, lib.LibraryKernel]:
    """The hand-written kernels a Program's library calls launch."""
    out = {}
    for s in program.steps:
        if isinstance(s, L.Call) and s.op == "attention" and _flash_fits(s):
            k = lib.flash_attention_kernel(s.inputs[0].shape[3], s.inputs[2].shape[3])
            out[k.name] = k
        if isinstance(s, L.Call) and s.op in SPARSE_OPS and not _runs_on_host(s):
            k = ak.sparse_attention_kernel(s.inputs[0].shape[3], s.inputs[2].shape[3])
            out[k.name] = k
        if isinstance(s, L.Call) and s.op == "linear_attention" and not _runs_on_host(s):
            stages = ("kmax", "causal") if s.attrs["causal"] else ("kmax", "state", "rows")
            for stage in stages:
                k = ak.linear_attention_kernel(stage, s.inputs[0].shape[3], s.inputs[2].shape[3])
                out[k.name] = k
        if isinstance(s, L.Call) and s.op == "matmul_integer" and not s.fallback:
            k = lib.matmul_integer_kernel()
            out[k.name] = k
    return out


def program_source(rendered: dict, library: dict) -> str:
    """One CUDA translation unit with every kernel of a Program."""
    parts = [f"// tensorc: {len(rendered)} generated and {len(library)} library kernels\n"]
    parts += [r.source for r in rendered.values()]
    parts += [k.source for k in library.values()]
    return "\n".join(parts)


class CupyExecutable(Executable):
    """Runs a graph on the GPU. Inputs may be numpy arrays (copied in) or cupy arrays:
    read in place when contiguous in eager runs, copied device to device into the
    arena when a CUDA graph replays (its addresses are fixed). Outputs are numpy
    arrays, or cupy arrays when the backend was made with `outputs="cupy"` or
    `run_device` is used."""

    def __init__(self, graph: Graph, runtime, precision: str = "fp32",
                 cuda_graph: bool = True, outputs: str = "numpy"):
        super().__init__(graph)
        missing = [v.name for v in graph.constants.values() if v.data is None]
        if missing:
            raise TensorcError(f"graph {graph.name} has constants without data: "
                               + ", ".join("%" + n for n in missing[:5]))
        self.runtime, self.precision = runtime, precision
        self.use_cuda_graph = cuda_graph and runtime.can_capture
        self.device_outputs = outputs == "cupy"
        self.device_constants: dict = {}   # id(weight array) -> (array, device copy)
        self._prepared: dict[tuple, _Prepared] = {}
        self.stats = {"programs": 0, "graph_replays": 0, "eager_runs": 0,
                      "inputs_in_place": 0, "fallbacks": []}

    def prepared(self, env: dict[str, int]) -> _Prepared:
        key = tuple(sorted(env.items()))
        if key not in self._prepared:
            check_shapes(self.graph, env)   # device memory is cupy's to refuse
            program = L.lower(self.graph, env, **LOWERING)
            self.stats["fallbacks"] += host_steps(program)
            self._prepared[key] = _Prepared(self, program)
            self.stats["programs"] += 1
        return self._prepared[key]

    def run(self, feeds: dict, out: dict | None = None) -> dict:
        """As `Executable.run`; `out` (numpy arrays) gets a copy of the host results."""
        if self.device_outputs and out is None:
            return self.run_device(feeds)
        res = {n: self.runtime.to_host(a) for n, a in self._run(feeds).items()}
        if out is not None:
            types = [TensorType(res[v.name].shape, v.type.dtype) for v in self.graph.outputs]
            for name, o in zip(self.output_names, self._out_arrays(out, types), strict=True):
                if o is not None:
                    o[...] = res[name]
                    res[name] = o
        return res

    def run_device(self, feeds: dict) -> dict:
        """Like `run`, but the outputs stay on the device (cupy arrays)."""
        return {n: a.copy() for n, a in self._run(feeds).items()}

    def _run(self, feeds: dict) -> dict:
        rt = self.runtime
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InputError(f"inputs do not match the graph: missing {missing}, unknown "
                             f"{extra} (expected {self.input_names})")
        arrays = [feeds[n] for n in self.input_names]
        # Shape and dtype checks on stand-ins, so device arrays are never copied to host.
        stand_ins = [np.broadcast_to(np.zeros((), a.dtype), a.shape)
                     if rt.is_device_array(a) else np.asarray(a) for a in arrays]
        env = bind_shapes([v.type for v in self.graph.inputs], stand_ins, self.input_names)
        prep = self.prepared(env)
        # Every Program has fixed shapes and addresses, so each can be captured once.
        if self.use_cuda_graph and not prep.host_only and not prep.capture_note:
            self._copy_in(prep, arrays)
            if prep.replay is None:
                self._capture(prep)
                self._copy_in(prep, arrays)   # the warm-up run reused the input slots
        if prep.replay is not None:
            for c in prep.index_checks:   # checks read inputs only: before the replay
                _check_indices(prep.array(c.view), c)
            prep.replay()
            self.stats["graph_replays"] += 1
        else:   # eager: contiguous device inputs are read where they are, not copied,
            # unless a step writes their buffer (Program.written)
            written = prep.program.written()
            in_place = {b: a.reshape(-1).view(np.uint8)
                        for b, a in zip(prep.program.inputs, arrays, strict=True)
                        if rt.is_device_array(a) and a.flags.c_contiguous
                        and a.dtype == DTYPES[b.dtype] and b not in written}
            self._copy_in(prep, arrays, skip=in_place)
            prep.run_steps(in_place)
            rt.synchronize()
            self.stats["eager_runs"] += 1
            self.stats["inputs_in_place"] += len(in_place)
        # Views into the arena: valid until the next call, so callers copy them.
        return dict(zip(self.output_names, prep.outputs, strict=True))

    def _copy_in(self, prep: _Prepared, arrays, skip=()) -> None:
        for buf, slot, a in zip(prep.program.inputs, prep.inputs, arrays, strict=True):
            if buf not in skip:
                self.runtime.copy_in(slot, a)

    def _capture(self, prep: _Prepared) -> None:
        """Record the Program's launches in a CUDA graph (`prep.replay`), or note why not.
        Index checks stay outside the graph: they sync with the host. They are run
        before each replay, so they may only read input buffers."""
        if any(c.view.buf.kind != "input" for c in prep.index_checks):
            prep.capture_note = "an index check reads an intermediate buffer"
            return
        for c in prep.index_checks:       # the warm-up run must not read out of bounds
            _check_indices(prep.array(c.view), c)
        kernels = [s for s, st in zip(prep.steps, prep.program.steps, strict=True)
                   if not isinstance(st, L.IndexCheck)]
        try:
            prep.replay = self.runtime.capture(lambda: [s() for s in kernels])
        except Exception as e:  # capture unsupported here: run eagerly from now on
            prep.capture_note = f"CUDA graph capture failed: {e}"

    def execute(self, arrays, env):   # Executable's abstract hook; `run` covers it
        return list(self.run(dict(zip(self.input_names, arrays, strict=True))).values())


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self, precision: str = "fp32", cuda_graph: bool = True,
                 outputs: str = "numpy"):
        if precision not in PRECISIONS:
            raise TensorcError(f"unknown precision {precision!r} (choose from "
                               f"{', '.join(PRECISIONS)})")
        if outputs not in ("numpy", "cupy"):
            raise TensorcError(f"outputs must be 'numpy' or 'cupy', got {outputs!r}")
        self.precision, self.cuda_graph, self.outputs = precision, cuda_graph, outputs

    def unavailable_reason(self) -> str | None:
        return unavailable_reason()

    def compile(self, graph: Graph, runtime=None) -> CupyExecutable:
        return CupyExecutable(graph, runtime or CupyRuntime(), self.precision,
                              self.cuda_graph, self.outputs)

    def planned_memory_bytes(self, graph: Graph, env: dict[str, int]) -> int:
        """The arena of the lowered Program: buffers packed by liveness."""
        from ..lowering import planned_memory
        return planned_memory(graph, env, **LOWERING)["arena_bytes"]

    def emit_source(self, graph: Graph, directory: str, env: dict[str, int] | None = None
                    ) -> list[str]:
        """Write `<graph>.cu`: every kernel of the graph's Program (shapes bound by
        `env` where the graph has symbolic dims). Compiles standalone with
        `nvcc -ptx -arch=sm_80`; needs neither cupy nor a GPU."""
        program = L.lower(graph, _static_env(graph, env), **LOWERING)
        rendered = {k.name: render_kernel(k) for k in program.kernels}
        library = library_kernels(program)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / f"{_file_name(graph.name)}.cu"
        out.write_text(program_source(rendered, library))
        return [str(out)]


def _static_env(graph: Graph, env) -> dict[str, int]:
    symbols = sorted({s for v in graph.inputs for d in v.type.shape for s in dim_symbols(d)})
    missing = [s for s in symbols if s not in (env or {})]
    if missing:
        raise TensorcError(f"graph {graph.name} has symbolic dims {', '.join(missing)}: "
                           "give their sizes (env={" + ", ".join(f"'{s}': 1" for s in missing)
                           + "})")
    return dict(env or {})


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "graph"


BACKEND = CupyBackend()
