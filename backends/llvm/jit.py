"""JIT-compile LLVM IR for the host CPU, with an on-disk cache of object code.

    addrs = compile_ir(ir_text, ["my_kernel"])        # {name: address}
    f = cfunc(addrs["my_kernel"], None, [c_void_p, c_int64])

The module is optimised at O3 (loop and SLP vectorisation on) for the host CPU's
name and features, turned into an object file, and loaded with MCJIT. Object
files are cached under `$TENSORC_CACHE_DIR` (default `~/.cache/tensorc`), one entry
per module. A generated module's key is a hash of its IR text, the target, the
llvmlite version and the optimisation options. A library module (`compile_library`:
each group of GEMM entry points, each attention mask kind, the pool) is keyed by its
name and a hash of the source it is generated from (`source_digest`) instead, so
that a hit builds no IR: every model and shape shares these entries. The cache is
untrusted: LLVM crashes on a malformed object file, so only an object this user's
tensorc wrote is loaded. Each entry carries its own key and an HMAC of key and
payload under a secret kept in the cache folder (`key`, mode 0600, owned by this
user; if it is anything else the disk cache is not used). Only a regular file
(not a link, FIFO or device) of bounded size is read; an entry that fails a check
is rebuilt. Each engine gets a target machine of its own (MCJIT takes ownership of
it and frees it with the engine). Engines are kept alive for the life of the
process, so the returned addresses stay valid. llvmlite runs one LLVM call at a
time (a process-wide lock), so threads cannot compile modules side by side; a
forked child can (`compile_ahead`: the backend hands it attention and the GEMM's
activation epilogues on a cold cache).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import os
import stat
import threading
import time
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

import tensorc.errors
from tensorc.errors import TensorcError
from tensorc.files import output_file

_MAGIC = b"TCOBJ2\n"
_MAX_ENTRY = 256 << 20  # bytes; a kernel module's object is far smaller
_lock = threading.Lock()
_engines: list = []  # keep every engine (and so its code) alive
_memo: dict[str, dict[str, int]] = {}  # key -> addresses, for this process
stats = {"compiled": 0, "disk_hits": 0, "memo_hits": 0, "corrupt": 0, "ahead": 0}


def _init():
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


_init()


class _Target:
    """The host target machine, built once."""

    def __init__(self):
        self.triple = llvm.get_process_triple()
        self.cpu = llvm.get_host_cpu_name()
        self.features = llvm.get_host_cpu_features().flatten()
        self.machine = self.new_machine()
        self.fingerprint = "|".join([self.triple, self.cpu, self.features, llvmlite.__version__])


    def new_machine(self, features: str | None = None):
        return llvm.Target.from_triple(self.triple).create_target_machine(
            cpu=self.cpu, features=self.features if features is None else features, opt=3,
            reloc="static", codemodel="jitdefault")

    def features_without(self, *names: str) -> str:
        """The host's feature string with `names` switched off (a library module that
        must not use them: the portable int8 GEMM without VNNI or AMX)."""
        feats = {f[1:]: f[0] for f in self.features.split(",") if f}
        for n in names:
            feats[n] = "-"
        return ",".join(sign + name for name, sign in sorted(feats.items()))


_machines: dict[str, object] = {}   # feature string -> a target machine for it


def machine(features: str | None = None):
    """The host target machine, or one for `features` (made once each)."""
    if features is None or features == target().features:
        return target().machine
    if features not in _machines:
        _machines[features] = target().new_machine(features)
    return _machines[features]


_target: _Target | None = None


def target() -> _Target:
    global _target
    if _target is None:
        _target = _Target()
    return _target


def cache_dir() -> Path:
    return Path(os.environ.get("TENSORC_CACHE_DIR") or Path.home() / ".cache" / "tensorc")


def _options(vectorize: bool, unroll: bool) -> bytes:
    return b"\0O3\0" if vectorize and unroll else \
        f"\0O3 vectorize={vectorize:d} unroll={unroll:d}\0".encode()


def cache_key(ir_text: str, vectorize: bool = True, unroll: bool = True) -> str:
    h = hashlib.sha256()
    h.update(target().fingerprint.encode())
    h.update(_options(vectorize, unroll))
    h.update(ir_text.encode())
    return h.hexdigest()


_digest: str | None = None


def source_digest() -> str:
    """A hash of the source of the layers a library kernel's IR can depend on: the
    backends and the core (`tests/test_layers.py` keeps backends from importing
    anything else), so that a library's cache key needs no IR built."""
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        for root, path in _source_files():
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
        _digest = h.hexdigest()
    return _digest


def _source_files() -> list[tuple[Path, Path]]:
    """(root, file) for every .py file of the backends and the core (in an installed
    tensorc the core's folder holds the other layers too: hashed as well); where a
    folder has no source (a bytecode-only install), its .pyc files."""
    backends, core = Path(__file__).parent.parent, Path(tensorc.errors.__file__).parent
    return [(root, path) for root in (backends, core)
            for path in sorted(root.rglob("*.py")) or sorted(root.rglob("*.pyc"))]


def library_key(name: str, vectorize: bool = True, unroll: bool = True,
                features: str | None = None) -> str:
    """The cache key of library module `name` (see `compile_library`)."""
    h = hashlib.sha256()
    h.update(target().fingerprint.encode())
    h.update(_options(vectorize, unroll))
    if features is not None:
        h.update(b"features\0" + features.encode() + b"\0")
    h.update(b"library\0" + name.encode() + b"\0" + source_digest().encode())
    return h.hexdigest()


def optimize(mod: llvm.ModuleRef, vectorize: bool = True, unroll: bool = True,
             features: str | None = None) -> None:
    """O3 for the host target (new pass manager), with loop and SLP vectorisation and
    loop unrolling unless switched off: hand-vectorised library kernels compile several
    times faster without them (into the same inner loops: see `compile_library`)."""
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = vectorize
    pto.slp_vectorization = vectorize
    pto.loop_unrolling = unroll
    pb = llvm.create_pass_builder(machine(features), pto)
    pb.getModulePassManager().run(mod, pb)


def parse(ir) -> llvm.ModuleRef:
    """Parse and verify IR text (or an llvmlite.ir.Module); one clear error if invalid."""
    text = str(ir)
    try:
        mod = llvm.parse_assembly(text)
        mod.verify()
    except RuntimeError as e:
        raise TensorcError(f"generated LLVM IR is invalid: {str(e).strip().splitlines()[0]}") \
            from e
    return mod


def _build_object(ir_text: str, vectorize: bool = True, unroll: bool = True,
                  features: str | None = None) -> bytes:
    """Object code for the host (`features`: another feature string, see
    `compile_library`)."""
    mod = parse(ir_text)
    mod.triple = target().triple
    mod.data_layout = str(target().machine.target_data)
    optimize(mod, vectorize, unroll, features)
    stats["compiled"] += 1
    return machine(features).emit_object(mod)


def assembly(ir, features: str | None = None, vectorize: bool = False,
             unroll: bool = False) -> str:
    """The assembly the library build of `ir` compiles to (for tests: which
    instructions a kernel uses)."""
    mod = parse(ir)
    mod.triple = target().triple
    mod.data_layout = str(target().machine.target_data)
    optimize(mod, vectorize, unroll, features)
    return machine(features).emit_assembly(mod)


_SECRET_BYTES = 32
_secrets: dict[Path, bytes | None] = {}   # cache folder -> its secret (None: unusable)


def cache_secret(folder: Path) -> bytes | None:
    """The HMAC secret of a cache folder, made on first use; None if the file there is
    not a private regular file of this user (then nothing is read from or written to
    the cache)."""
    if folder not in _secrets:
        _secrets[folder] = _read_or_make_secret(folder / "key")
    return _secrets[folder]


def _read_or_make_secret(path: Path) -> bytes | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(_SECRET_BYTES))
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        secret = f.read(_SECRET_BYTES + 1)
    return secret if len(secret) == _SECRET_BYTES else None


def _mac(secret: bytes, key: str, payload: bytes) -> bytes:
    return hmac.new(secret, key.encode() + b"\0" + payload, hashlib.sha256).digest()


def entry_bytes(key: str, payload: bytes, secret: bytes) -> bytes:
    """A cache entry: magic, its own key, the HMAC of key and payload, the payload."""
    return _MAGIC + key.encode() + _mac(secret, key, payload) + payload


def _read_entry(path: Path, key: str, secret: bytes) -> bytes | None:
    """The payload of the cache entry for `key`, or None if there is none or it is not
    a regular file of bounded size holding this key and a valid HMAC."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:   # missing, a symlink (O_NOFOLLOW), unreadable
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_ENTRY:
        os.close(fd)
        return None   # a directory, FIFO or device: unreadable, endless or hanging
    with os.fdopen(fd, "rb") as f:
        blob = f.read(_MAX_ENTRY + 1)
    head = len(_MAGIC) + 64 + 32
    if len(blob) <= head or not blob.startswith(_MAGIC):
        return None
    stored_key = blob[len(_MAGIC):len(_MAGIC) + 64]
    mac, payload = blob[len(_MAGIC) + 64:head], blob[head:]
    if stored_key != key.encode() or not hmac.compare_digest(mac, _mac(secret, key, payload)):
        return None   # another key's entry copied here, damaged, or not written by us
    return payload


def _write_entry(path: Path, key: str, payload: bytes, secret: bytes) -> None:
    """Atomic write (temp file + rename) so a crash never leaves a half entry behind."""
    # A read-only or full cache, or something not a file at the path, only costs a
    # recompile next time.
    with contextlib.suppress(OSError, TensorcError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with output_file(str(path)) as f:
            f.write(entry_bytes(key, payload, secret))


def _load(obj: bytes, symbols: list[str]) -> dict[str, int]:
    # An empty module gives MCJIT its target; the object file brings the code.
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target().new_machine())
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    addrs = {s: engine.get_function_address(s) for s in symbols}
    missing = [s for s, a in addrs.items() if not a]
    if missing:
        raise RuntimeError(f"symbols not found in object: {missing}")
    _engines.append(engine)
    return addrs


def compile_ir(ir, symbols: list[str], vectorize: bool = True, unroll: bool = True
               ) -> dict[str, int]:
    """Compile LLVM IR (text or llvmlite.ir.Module) and return {symbol: address}.

    Uses the in-process memo, then the disk cache, then compiles. Thread safe.
    `vectorize`, `unroll`: see `optimize`.
    """
    text = str(ir)
    return _compile(cache_key(text, vectorize, unroll), lambda: text, symbols,
                    (vectorize, unroll))


def compile_library(name: str, build, symbols: list[str], vectorize: bool = True,
                    unroll: bool = True, features: str | None = None) -> dict[str, int]:
    """`compile_ir(build(), symbols, ...)` for a library module (GEMM, attention, the
    pool): keyed by `name` and the source that generates it (`source_digest`) instead
    of its IR text, so that a cache hit builds no IR. `name` must tell apart every
    module one source can build (the variant: activation, mask kind).

    The GEMM is built without LLVM's vectorisers and unroller, attention without the
    unroller: both are vectorised by hand (16-lane vectors, unrolled where it pays), so
    that their inner loops compile to the same instructions (`tests/test_jit_cache.py`
    checks the GEMM's micro-kernel), and those passes cost most of their compile time
    (GEMM 5-15x, attention 1.5x).

    `features`: a target feature string other than the host's (part of the key), for a
    module that must use only some of the host's instructions (the int8 GEMM's
    portable path, compiled without VNNI and AMX so that LLVM cannot use them)."""
    return _compile(library_key(name, vectorize, unroll, features), lambda: str(build()),
                    symbols, (vectorize, unroll, features))


_pending: dict[str, int] = {}   # library key -> the child process compiling it


def compile_ahead(jobs: list[tuple]) -> int | None:
    """Start compiling library modules in a child process, while this one goes on to
    the rest of its work: jobs are `(name, build, vectorize, unroll)` as for
    `compile_library`. The child writes their cache entries and exits; asked for one
    of them, `compile_library` first waits for its entry (or for the child to exit:
    then it compiles the module itself if the child failed). llvmlite runs one LLVM
    call at a time per process, so threads would not overlap. Nothing is started
    (None) unless the disk cache is usable, some entry is missing, and this process
    has one thread (fork copies only the calling thread: a lock another one holds, in
    LLVM or Python, would stay held in the child). Returns the child's pid."""
    if not hasattr(os, "fork") or threading.active_count() > 1:
        return None
    folder = cache_dir()
    secret = cache_secret(folder)
    if not secret:
        return None
    with _lock:
        todo = []
        for name, build, vectorize, unroll in jobs:
            key = library_key(name, vectorize, unroll)
            path = folder / key[:2] / (key + ".o")
            if key not in _memo and key not in _pending and not os.path.lexists(path):
                todo.append((key, path, build, (vectorize, unroll)))
        if not todo:
            return None
        pid = os.fork()
        if pid == 0:   # the child: build, write, leave without running any exit handler
            code = 0
            try:
                for key, path, build, options in todo:
                    _write_entry(path, key, _build_object(str(build()), *options), secret)
            except BaseException:
                code = 1
            os._exit(code)
        for key, *_ in todo:
            _pending[key] = pid
        stats["ahead"] += len(todo)
        return pid


def _await(key: str, path: Path) -> None:
    """Wait (under _lock) until the compile_ahead child compiling `key` has written its
    entry (renamed into place whole) or has exited."""
    pid = _pending.pop(key)
    while not os.path.lexists(path):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:   # already reaped
            done = pid
        if done:
            for k in [k for k, p in _pending.items() if p == pid]:
                del _pending[k]
            return
        time.sleep(0.002)
    if pid not in _pending.values():   # its last entry: reap it (it is exiting)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _compile(key: str, text, symbols: list[str], options: tuple) -> dict[str, int]:
    with _lock:
        if key in _memo and all(s in _memo[key] for s in symbols):
            stats["memo_hits"] += 1
            return {s: _memo[key][s] for s in symbols}
        folder = cache_dir()
        secret = cache_secret(folder)
        path = folder / key[:2] / (key + ".o")
        if key in _pending:
            _await(key, path)
        obj = _read_entry(path, key, secret) if secret else None
        addrs = None
        if obj is not None:
            try:
                addrs = _load(obj, symbols)
                stats["disk_hits"] += 1
            except Exception:  # an entry that does not load: rebuild it below
                stats["corrupt"] += 1
        elif secret and os.path.lexists(path):
            stats["corrupt"] += 1
        if addrs is None:
            obj = _build_object(text(), *options)
            addrs = _load(obj, symbols)
            if secret:
                _write_entry(path, key, obj, secret)
        _memo[key] = addrs
        return dict(addrs)


def cfunc(address: int, restype, argtypes):
    """A ctypes function for a JIT address. ctypes releases the GIL during the call."""
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def clear_memo() -> None:
    """Forget in-process compilations (the disk cache stays); for tests."""
    with _lock:
        _memo.clear()
