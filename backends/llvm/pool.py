"""The LLVM backend's one thread pool (native): one hand-off per call.

Generated kernels (each has a job entry, see `codegen.add_kernel`), the GEMM and flash
attention all run their parallel parts here, through `run`.

A Python pool thread sleeps between calls, and waking it costs tens of microseconds
(a futex wake, then a core coming back from idle) for every GEMM; with ~0.3 ms of
work per thread that is a large share. Here each worker runs a JIT-compiled loop
(ctypes releases the GIL) that spins on a sequence counter for `TENSORC_SPIN_US`
after its last job before it blocks on a semaphore. A call posts a job (a kernel
address, an argument block and n items), and every thread, the caller included,
claims items with a compare-and-swap until none are left. The caller never waits
for a worker that has not started: if the worker is asleep or descheduled (a busy
machine), the caller claims the remaining items itself, so spinning helps when
cores are free and costs at most the spin window when they are not.

Job functions have the signature `void job(ptr block, i64 item, i64 tid)`; `tid`
is 0 for the caller, w + 1 for worker w (it picks a per-thread workspace in the
block).
"""

from __future__ import annotations

import os
import threading
import time
from ctypes import c_int64, c_void_p

import numpy as np
from llvmlite import ir

from tensorc.errors import TensorcError

from .jit import cfunc, compile_ir, compile_library, target

I64, PTR = ir.IntType(64), ir.PointerType()
# control block words (int64), hot fields on separate cache lines
SEQ, CLAIM, DONE, JOB, CONF, STATE, SEEN = 0, 8, 16, 24, 32, 40, 48
FN, BLOCK = JOB, JOB + 1
WORKERS, SPIN, PAUSE = CONF, CONF + 1, CONF + 2
MAX_WORKERS = 8      # STATE and SEEN hold one word per worker
PAUSE_US = 50.0      # spin with `pause` this long, then with sched_yield (see relax)
MAX_ITEMS = 0xFFFF   # the claim word packs tag | n << 16 | next item


def num_threads() -> int:
    """TENSORC_NUM_THREADS, else the cores this process may run on."""
    env = os.environ.get("TENSORC_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise TensorcError(f"TENSORC_NUM_THREADS={env!r} should be a positive integer")
        return n
    return _CORES


_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()



def _spin_us() -> float:
    env = os.environ.get("TENSORC_SPIN_US", "")
    try:
        us = float(env) if env else 200.0
    except ValueError:
        us = -1
    if us < 0:
        raise TensorcError(f"TENSORC_SPIN_US={env!r} should be a non-negative number")
    return us


class _Indirect:
    """A pointer value called as a function of type `function_type` (llvmlite's
    call() wants a Function, or something that looks like one)."""

    def __init__(self, value, function_type):
        self.value, self.function_type, self.type = value, function_type, value.type

    def get_reference(self):
        return self.value.get_reference()


def build_module() -> ir.Module:
    m = ir.Module(name="tensorc_pool")
    void = ir.VoidType()
    ticks = ir.Function(m, ir.FunctionType(I64, []), "llvm.readcyclecounter")
    # libc's, resolved in this process by the JIT: lets other runnable threads in
    sched_yield = ir.Function(m, ir.FunctionType(ir.IntType(32), []), "sched_yield")
    # x86's spin-wait hint; elsewhere a plain re-check
    pause = ir.Function(m, ir.FunctionType(void, []), "llvm.x86.sse2.pause") \
        if target().triple.startswith(("x86_64", "i686", "i386")) else None

    def relax(b, waited, ctl):
        """Wait a little: `pause` for the first PAUSE ticks of a wait (the other thread
        is running and will be done soon), then sched_yield (it may be waiting for
        this core: a busy machine, or other spinning threads in this process)."""
        short, long_ = (b.function.append_basic_block(n) for n in ("pause", "yield"))
        after = b.function.append_basic_block("relaxed")
        b.cbranch(b.icmp_signed("<", waited, load(b, ctl, PAUSE)), short, long_)
        b.position_at_end(short)
        if pause is not None:
            b.call(pause, [])
        b.branch(after)
        b.position_at_end(long_)
        b.call(sched_yield, [])
        b.branch(after)
        b.position_at_end(after)
    job_ty = ir.FunctionType(void, [PTR, I64, I64])
    c = lambda x: ir.Constant(I64, x)  # noqa: E731

    def word(b, ctl, i):
        return b.gep(ctl, [i if isinstance(i, ir.Value) else c(i)], source_etype=I64)

    def load(b, ctl, i):
        return b.load_atomic(word(b, ctl, i), "acquire", 8, typ=I64)

    def store(b, ctl, i, v):
        b.atomic_rmw("xchg", word(b, ctl, i), v, "seq_cst")

    # work(ctl, tid, tag): claim and run items of job `tag` until none are left
    work = ir.Function(m, ir.FunctionType(void, [PTR, I64, I64]), "tc_pool_work")
    ctl, tid, tag = work.args
    entry, top, claim, run, out = (work.append_basic_block(n) for n in
                                   ("entry", "top", "claim", "run", "out"))
    b = ir.IRBuilder(entry)
    b.branch(top)
    b.position_at_end(top)
    v = load(b, ctl, CLAIM)
    n = b.and_(b.lshr(v, c(16)), c(MAX_ITEMS))
    i = b.and_(v, c(MAX_ITEMS))
    ok = b.and_(b.icmp_unsigned("==", b.lshr(v, c(32)), tag), b.icmp_unsigned("<", i, n))
    b.cbranch(ok, claim, out)
    b.position_at_end(claim)
    got = b.extract_value(b.cmpxchg(word(b, ctl, CLAIM), v, b.add(v, c(1)),
                                    "seq_cst", "seq_cst"), 1)
    b.cbranch(got, run, top)
    b.position_at_end(run)
    fn = b.inttoptr(load(b, ctl, FN), PTR)
    block = b.inttoptr(load(b, ctl, BLOCK), PTR)
    b.call(_Indirect(fn, job_ty), [block, i, tid])
    b.atomic_rmw("add", word(b, ctl, DONE), c(1), "seq_cst")
    b.branch(top)
    b.position_at_end(out)
    b.ret_void()

    # post(ctl, fn, block, n) -> mask of workers that were asleep (wake them)
    post = ir.Function(m, ir.FunctionType(I64, [PTR, I64, I64, I64]), "tc_pool_post")
    ctl, fn, block, n = post.args
    b = ir.IRBuilder(post.append_basic_block("entry"))
    seq = b.add(load(b, ctl, SEQ), c(1))
    tag = b.and_(seq, c(0xFFFFFFFF))
    # the claim word first: a late worker of the last job then fails its tag check
    store(b, ctl, CLAIM, b.or_(b.shl(tag, c(32)), b.shl(n, c(16))))
    store(b, ctl, DONE, c(0))
    for k, val in ((FN, fn), (BLOCK, block)):
        store(b, ctl, k, val)
    store(b, ctl, SEQ, seq)
    mask = c(0)
    for w in range(MAX_WORKERS):
        old = b.atomic_rmw("xchg", word(b, ctl, STATE + w), c(0), "seq_cst")
        mask = b.or_(mask, b.shl(old, c(w)))
    b.ret(mask)

    # join(ctl): the caller's share of the posted job, then wait for the workers'
    join = ir.Function(m, ir.FunctionType(void, [PTR]), "tc_pool_join")
    ctl = join.args[0]
    entry, wait, spin, out = (join.append_basic_block(n) for n in
                              ("entry", "wait", "spin", "out"))
    b = ir.IRBuilder(entry)
    v = load(b, ctl, CLAIM)
    b.call(work, [ctl, c(0), b.lshr(v, c(32))])
    n = b.and_(b.lshr(v, c(16)), c(MAX_ITEMS))
    start = b.call(ticks, [])
    b.branch(wait)
    b.position_at_end(wait)
    b.cbranch(b.icmp_unsigned(">=", load(b, ctl, DONE), n), out, spin)
    b.position_at_end(spin)
    relax(b, b.sub(b.call(ticks, []), start), ctl)
    b.branch(wait)
    b.position_at_end(out)
    b.ret_void()

    # worker(ctl, w): run jobs until none comes for SPIN ticks, then return (to sleep)
    worker = ir.Function(m, ir.FunctionType(void, [PTR, I64]), "tc_pool_worker")
    ctl, w = worker.args
    blocks = {n: worker.append_basic_block(n) for n in
              ("entry", "idle", "poll", "spin", "job", "sleep", "late", "out")}
    b = ir.IRBuilder(blocks["entry"])
    b.branch(blocks["idle"])
    b.position_at_end(blocks["idle"])
    start = b.call(ticks, [])
    b.branch(blocks["poll"])
    b.position_at_end(blocks["poll"])
    seen = load(b, ctl, b.add(c(SEEN), w))
    seq = load(b, ctl, SEQ)
    b.cbranch(b.icmp_unsigned("!=", seq, seen), blocks["job"], blocks["spin"])
    b.position_at_end(blocks["job"])
    store(b, ctl, b.add(c(SEEN), w), seq)
    b.call(work, [ctl, b.add(w, c(1)), b.and_(seq, c(0xFFFFFFFF))])
    b.branch(blocks["idle"])
    b.position_at_end(blocks["spin"])
    relax(b, b.sub(b.call(ticks, []), start), ctl)
    waited = b.sub(b.call(ticks, []), start)
    b.cbranch(b.icmp_signed(">", waited, load(b, ctl, SPIN)), blocks["sleep"], blocks["poll"])
    b.position_at_end(blocks["sleep"])
    # announce sleep, then look once more: a job posted in between is run now unless
    # post() already saw us asleep (it then releases the semaphore: consume it)
    store(b, ctl, b.add(c(STATE), w), c(1))
    seq = b.load_atomic(word(b, ctl, SEQ), "seq_cst", 8, typ=I64)  # not before the store
    b.cbranch(b.icmp_unsigned("!=", seq, seen), blocks["late"], blocks["out"])
    b.position_at_end(blocks["late"])
    old = b.atomic_rmw("xchg", word(b, ctl, b.add(c(STATE), w)), c(0), "seq_cst")
    b.cbranch(b.icmp_unsigned("==", old, c(1)), blocks["idle"], blocks["out"])
    b.position_at_end(blocks["out"])
    b.ret_void()
    return m


_lib: dict | None = None
_lib_lock = threading.Lock()


def _kernels() -> dict:
    global _lib
    with _lib_lock:
        if _lib is None:
            addrs = compile_library("pool", build_module, ["tc_pool_post", "tc_pool_join",
                                                           "tc_pool_worker", "tc_pool_work"])
            _lib = {"post": cfunc(addrs["tc_pool_post"], c_int64,
                                  [c_void_p, c_int64, c_void_p, c_int64]),
                    "join": cfunc(addrs["tc_pool_join"], None, [c_void_p]),
                    "worker": cfunc(addrs["tc_pool_worker"], None, [c_void_p, c_int64]),
                    "work": cfunc(addrs["tc_pool_work"], None, [c_void_p, c_int64, c_int64])}
        return _lib


def _ticks_per_us() -> float:
    """readcyclecounter ticks per microsecond (the TSC), measured once."""
    m = ir.Module(name="tensorc_ticks")
    f = ir.Function(m, ir.FunctionType(I64, []), "tc_ticks")
    b = ir.IRBuilder(f.append_basic_block())
    b.ret(b.call(ir.Function(m, ir.FunctionType(I64, []), "llvm.readcyclecounter"), []))
    tick = cfunc(compile_ir(m, ["tc_ticks"])["tc_ticks"], c_int64, [])
    t0, c0 = time.perf_counter(), tick()
    time.sleep(0.002)
    return (tick() - c0) / ((time.perf_counter() - t0) * 1e6)


class Pool:
    """`threads - 1` native workers; `run(fn, block, n)` runs job items 0..n-1 on all."""

    def __init__(self, threads: int):
        self.workers = min(threads - 1, MAX_WORKERS)
        self.threads = self.workers + 1
        lib = _kernels()
        self._post, self._join = lib["post"], lib["join"]
        raw = np.zeros(SEEN + MAX_WORKERS + 8, np.int64)
        start = (-raw.ctypes.data % 64) // 8
        self.ctl = raw[start:start + SEEN + MAX_WORKERS]
        self.ctl[WORKERS] = self.workers
        spin, ticks = _spin_us(), _ticks_per_us()
        self.ctl[SPIN] = int(spin * ticks)
        self.ctl[PAUSE] = int(min(spin, PAUSE_US) * ticks)
        self.ctl[STATE:STATE + self.workers] = 1   # asleep until the first post wakes them
        self.addr = self.ctl.ctypes.data
        self.lock = threading.Lock()   # one caller at a time
        self._wake = [threading.Semaphore(0) for _ in range(self.workers)]
        self.scratch: dict = {}        # workers' buffers, keyed (name, tid)
        for w in range(self.workers):
            threading.Thread(target=self._serve, args=(w, lib["worker"]), daemon=True,
                             name=f"tensorc-native-{w}").start()

    def _serve(self, w: int, worker) -> None:
        while True:
            self._wake[w].acquire()
            worker(self.addr, w)

    def run(self, fn: int, block: int, n: int) -> None:
        """Items 0..n-1 of job `fn` on every thread; the caller must hold `lock`."""
        if n > MAX_ITEMS:
            raise TensorcError(f"thread pool: {n} items, at most {MAX_ITEMS} per call")
        asleep = self._post(self.addr, fn, block, n)
        if asleep:
            for w in range(self.workers):
                if asleep >> w & 1:
                    self._wake[w].release()
        self._join(self.addr)


_pools: dict[int, Pool] = {}
_pools_lock = threading.Lock()


def get(threads: int) -> Pool:
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = Pool(threads)
        return _pools[threads]


def serial(fn: int, block: int, n: int) -> None:
    """Items 0..n-1 of a job on this thread alone (tid 0)."""
    # a private control block: no worker ever reads it
    ctl = np.zeros(SEEN + MAX_WORKERS, np.int64)
    ctl[CLAIM] = (1 << 32) | (n << 16)
    ctl[FN], ctl[BLOCK] = fn, block
    _kernels()["work"](ctl.ctypes.data, 0, 1)


def run(fn: int, block: int, n: int, threads: int) -> None:
    """Items 0..n-1 of job `fn` on up to `threads` threads, this one included. One caller
    uses a pool at a time: a second caller, while it is busy, runs serially instead."""
    if threads > 1 and n > 1:
        workers = get(threads)
        if workers.lock.acquire(blocking=False):
            try:
                workers.run(fn, block, n)
            finally:
                workers.lock.release()
            return
    serial(fn, block, n)


def launcher(fn: int, block: int, n: int, threads: int):
    """A zero-argument function doing `run(fn, block, n, threads)` with everything but
    the hand-off looked up once (the runtime's per-call cost for a small graph is
    mostly such Python). A single item calls the job directly, on this thread."""
    if n == 1:
        call = cfunc(fn, None, [c_void_p, c_int64, c_int64])
        return lambda: call(block, 0, 0)
    if threads > 1:
        workers = get(threads)

        def threaded():
            if workers.lock.acquire(blocking=False):
                try:
                    workers.run(fn, block, n)
                finally:
                    workers.lock.release()
            else:   # another caller has the pool
                serial(fn, block, n)
        return threaded
    return lambda: serial(fn, block, n)
