"""JIT-compile LLVM IR for the host CPU, with an on-disk cache of object code.

    addrs = compile_ir(ir_text, ["my_kernel"])        # {name: address}
    f = cfunc(addrs["my_kernel"], None, [c_void_p, c_int64])

The module is optimised at O3 (loop and SLP vectorisation on) for the host CPU's
name and features, turned into an object file, and loaded with MCJIT. Object
files are cached under `$TENSORC_CACHE_DIR` (default `~/.cache/tensorc`), keyed
by a hash of the IR text, the target and the llvmlite version. Each cache entry
carries a checksum of its payload; an entry that fails the check or fails to
load is rebuilt, never trusted. Engines are kept alive for the life of the
process, so the returned addresses stay valid.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

from tensorc.errors import TensorcError

_MAGIC = b"TCOBJ1\n"
_lock = threading.Lock()
_engines: list = []  # keep every engine (and so its code) alive
_memo: dict[str, dict[str, int]] = {}  # key -> addresses, for this process
stats = {"compiled": 0, "disk_hits": 0, "memo_hits": 0, "corrupt": 0}


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
        target = llvm.Target.from_triple(self.triple)
        self.machine = target.create_target_machine(
            cpu=self.cpu, features=self.features, opt=3, reloc="static", codemodel="jitdefault")
        self.fingerprint = "|".join([self.triple, self.cpu, self.features, llvmlite.__version__])


_target: _Target | None = None


def target() -> _Target:
    global _target
    if _target is None:
        _target = _Target()
    return _target


def cache_dir() -> Path:
    return Path(os.environ.get("TENSORC_CACHE_DIR") or Path.home() / ".cache" / "tensorc")


def cache_key(ir_text: str) -> str:
    h = hashlib.sha256()
    h.update(target().fingerprint.encode())
    h.update(b"\0O3\0")
    h.update(ir_text.encode())
    return h.hexdigest()


def optimize(mod: llvm.ModuleRef) -> None:
    """O3 with loop and SLP vectorisation, for the host target (new pass manager)."""
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_unrolling = True
    pb = llvm.create_pass_builder(target().machine, pto)
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


def _build_object(ir_text: str) -> bytes:
    mod = parse(ir_text)
    mod.triple = target().triple
    mod.data_layout = str(target().machine.target_data)
    optimize(mod)
    stats["compiled"] += 1
    return target().machine.emit_object(mod)


def _read_entry(path: Path) -> bytes | None:
    """The payload of a cache entry, or None if it is missing or fails its checksum."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + 32
    if len(blob) < head or not blob.startswith(_MAGIC):
        return None
    digest, payload = blob[len(_MAGIC):head], blob[head:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def _write_entry(path: Path, payload: bytes) -> None:
    """Atomic write (temp file + rename) so a crash never leaves a half entry behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache only costs a recompile next time


def _load(obj: bytes, symbols: list[str]) -> dict[str, int]:
    # An empty module gives MCJIT its target; the object file brings the code.
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target().machine)
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    addrs = {s: engine.get_function_address(s) for s in symbols}
    missing = [s for s, a in addrs.items() if not a]
    if missing:
        raise RuntimeError(f"symbols not found in object: {missing}")
    _engines.append(engine)
    return addrs


def compile_ir(ir, symbols: list[str]) -> dict[str, int]:
    """Compile LLVM IR (text or llvmlite.ir.Module) and return {symbol: address}.

    Uses the in-process memo, then the disk cache, then compiles. Thread safe.
    """
    text = str(ir)
    key = cache_key(text)
    with _lock:
        if key in _memo and all(s in _memo[key] for s in symbols):
            stats["memo_hits"] += 1
            return {s: _memo[key][s] for s in symbols}
        path = cache_dir() / key[:2] / (key + ".o")
        obj = _read_entry(path)
        addrs = None
        if obj is not None:
            try:
                addrs = _load(obj, symbols)
                stats["disk_hits"] += 1
            except Exception:  # an entry that does not load: rebuild it below
                stats["corrupt"] += 1
        elif path.exists():
            stats["corrupt"] += 1
        if addrs is None:
            obj = _build_object(text)
            addrs = _load(obj, symbols)
            _write_entry(path, obj)
        _memo[key] = addrs
        return dict(addrs)


def cfunc(address: int, restype, argtypes):
    """A ctypes function for a JIT address. ctypes releases the GIL during the call."""
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def clear_memo() -> None:
    """Forget in-process compilations (the disk cache stays); for tests."""
    with _lock:
        _memo.clear()
