"""The JIT cache's library entries (GEMM, attention, pool): keyed by their generator's
source instead of their IR, compiled per group on first use, shared between models
and shapes, and as untrusted on disk as every other entry (see test_hostile_input.py
for the generated kernels' entries)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tensorc.backends.llvm import jit

sys.path.insert(0, str(Path(__file__).parent))
from test_llvm import ELEMENTWISE_IR, _run_twice  # noqa: E402


def _never():
    raise AssertionError("the library's IR was built on a cache hit")


def test_a_library_entry_is_found_without_building_its_ir(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "c"))
    before = dict(jit.stats)
    jit.clear_memo()
    _run_twice(jit.compile_library("test/twice", lambda: ELEMENTWISE_IR, ["twice"]))
    assert jit.stats["compiled"] == before["compiled"] + 1
    jit.clear_memo()
    _run_twice(jit.compile_library("test/twice", _never, ["twice"]))   # from disk
    assert jit.stats["disk_hits"] == before["disk_hits"] + 1
    _run_twice(jit.compile_library("test/twice", _never, ["twice"]))   # from the memo
    assert jit.stats["memo_hits"] == before["memo_hits"] + 1
    assert jit.stats["compiled"] == before["compiled"] + 1


def test_a_damaged_library_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "c"))
    before = dict(jit.stats)
    jit.clear_memo()
    _run_twice(jit.compile_library("test/twice", lambda: ELEMENTWISE_IR, ["twice"]))
    (entry,) = (tmp_path / "c").rglob("*.o")
    for damage in (lambda b: b[:-7] + b"garbage", lambda b: b[:20]):
        entry.write_bytes(damage(entry.read_bytes()))
        jit.clear_memo()
        _run_twice(jit.compile_library("test/twice", lambda: ELEMENTWISE_IR, ["twice"]))
    assert jit.stats["corrupt"] == before["corrupt"] + 2
    assert jit.stats["compiled"] == before["compiled"] + 3
    jit.clear_memo()
    _run_twice(jit.compile_library("test/twice", _never, ["twice"]))   # rebuilt entry good
    assert jit.stats["disk_hits"] == before["disk_hits"] + 1


def test_library_keys_tell_apart_names_options_targets_and_sources(monkeypatch):
    keys = {jit.library_key("gemm/pa:none"), jit.library_key("gemm/pa:relu"),
            jit.library_key("gemm/pa:none", vectorize=False),
            jit.library_key("gemm/pa:none", unroll=False),
            jit.cache_key("gemm/pa:none")}
    assert len(keys) == 5
    monkeypatch.setattr(jit, "_digest", "0" * 64)      # another version of the source
    assert jit.library_key("gemm/pa:none") not in keys
    monkeypatch.setattr(jit.target(), "fingerprint", "another CPU")
    assert len({jit.library_key("gemm/pa:none")} | keys) == 6


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:   # a name inside a module (tensorc.errors.InputError)
        return False


def _closure(module: str, seen: set[str]) -> set[str]:
    """The tensorc modules `module` imports, directly or not (read with ast)."""
    if module in seen:
        return seen
    seen.add(module)
    mod = importlib.import_module(module)
    tree = ast.parse(Path(mod.__file__).read_text())
    package = module if mod.__file__.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = parent + ("." + node.module if node.module else "")
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("tensorc") and _is_module(name):
                _closure(name, seen)
    return seen


@pytest.mark.parametrize("builder", ["gemm_ir", "attention", "pool"])
def test_the_source_digest_covers_every_module_a_library_is_built_from(builder):
    """A library's key hashes the backends' and the core's source instead of its IR:
    every module its generator imports must be among the files hashed."""
    hashed = {path.resolve() for _, path in jit._source_files()}
    for name in _closure(f"tensorc.backends.llvm.{builder}", set()):
        path = Path(importlib.import_module(name).__file__).resolve()
        assert path in hashed, f"{name} ({path}) is not in jit.source_digest()"


_LAZY = """
import numpy as np
from tensorc.backends.llvm import gemm, gemm_ir, jit
a, b = np.ones((9, 16), np.float32), np.ones((16, 32), np.float32)   # 9 rows: no GEMV
np.testing.assert_allclose(gemm.gemm(a, b, activation="relu", threads=1), 16.0)
print(sorted({k for lib in gemm_ir._libs.values() for k in lib if k != "jobs"}),
      jit.stats["compiled"], jit.stats["disk_hits"])
"""


def test_gemm_compiles_only_the_groups_it_runs_and_a_second_process_shares_them(tmp_path):
    env = {**os.environ, "TENSORC_CACHE_DIR": str(tmp_path / "c")}
    outs = [subprocess.run([sys.executable, "-c", _LAZY], capture_output=True, text=True,
                           timeout=300, env=env) for _ in range(2)]
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    # pack_b's group (B packed per call) and relu's plain kernel: nothing else
    assert outs[0].stdout.split() == ["['pack_b',", "'pack_bt',", "'relu']", "2", "0"]
    assert outs[1].stdout.split() == ["['pack_b',", "'pack_bt',", "'relu']", "0", "2"]


_HOSTILE = """
import sys
sys.path.insert(0, "tests")
from test_llvm import ELEMENTWISE_IR, _run_twice
from tensorc.backends.llvm import jit
_run_twice(jit.compile_library("test/twice", lambda: ELEMENTWISE_IR, ["twice"]))
print("compiled", jit.stats["compiled"], "disk_hits", jit.stats["disk_hits"])
"""


@pytest.mark.parametrize("case", ["forged", "swapped", "link"])
def test_a_tampered_library_entry_is_not_loaded(tmp_path, case):
    """An entry at a library key's path that this user's tensorc did not write (its
    HMAC is made with another secret), or another key's valid entry, or a link, is
    rebuilt, in a child process (loading a bad object would crash it)."""
    cache = tmp_path / "cache"
    key = jit.library_key("test/twice")
    path = cache / key[:2] / (key + ".o")
    path.parent.mkdir(parents=True)
    good = jit._build_object(ELEMENTWISE_IR)
    if case == "forged":
        path.write_bytes(jit.entry_bytes(key, good[: len(good) // 2], bytes(32)))
    elif case == "swapped":
        path.write_bytes(jit.entry_bytes(jit.cache_key(ELEMENTWISE_IR), good,
                                         jit.cache_secret(cache)))
    else:
        target = tmp_path / "elsewhere.o"
        target.write_bytes(jit.entry_bytes(key, good, jit.cache_secret(cache)))
        path.symlink_to(target)
    out = subprocess.run([sys.executable, "-c", _HOSTILE], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TENSORC_CACHE_DIR": str(cache)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiled 1 disk_hits 0" in out.stdout, out.stdout


def _fma_loops(asm: str) -> list[str]:
    """The basic blocks of an assembly listing that hold 8 FMAs or more, with registers
    and labels blanked out (register allocation may differ)."""
    blocks = []
    for block in re.split(r"\n(?=\.LBB)", asm):
        if block.count("vfmadd") >= 8:
            lines = [ln.strip() for ln in block.splitlines()[1:]]
            lines = [re.sub(r"%\w+", "%R", re.sub(r"\.LBB\d+_\d+", "L", ln)) for ln in lines
                     if ln and not ln.startswith(("#", ".p2align"))]
            blocks.append("\n".join(lines))
    return sorted(blocks)


def _assembly(text: str, vectorize: bool, unroll: bool) -> str:
    mod = jit.parse(text)
    mod.triple = jit.target().triple
    mod.data_layout = str(jit.target().machine.target_data)
    jit.optimize(mod, vectorize, unroll)
    return jit.target().machine.emit_assembly(mod)


def test_gemm_groups_compile_without_loop_passes_to_the_same_inner_loops():
    """Why the GEMM's modules are built without LLVM's vectorisers and unroller: the
    micro-kernel loop is the same code (measured on AVX-512 hosts, for their tile)."""
    from tensorc.backends.llvm import gemm_ir
    if "+avx512f" not in jit.target().features.split(","):
        pytest.skip("an AVX-512 host's finding: on AVX2 the loop passes schedule the "
                    "micro-kernel's loads and stores differently (the library is still "
                    "built without them, for compile time)")
    tile = gemm_ir.AVX512_TILE.code
    for group in ("pa:none", "plain:none"):
        text = str(gemm_ir.build_module(f"{group}@{tile}"))
        loops = _fma_loops(_assembly(text, True, True))
        assert loops and loops == _fma_loops(_assembly(text, False, False)), group


def test_a_constant_loop_around_loops_is_not_unrolled():
    """The [16, 512] embedding gather of GPT at seq 16: its row loop carries
    llvm.loop.unroll.disable (fully unrolled it took the instruction scheduler 0.8 s
    and made 21 KB of code); the parallel loop and innermost loops do not."""
    import tensorc
    import tensorc.models
    from tensorc.backends.llvm import codegen
    from tensorc.backends.lowering import lower
    from tensorc.passes import run_pipeline
    model = tensorc.models.get("gpt", "small")
    feeds = model.example_inputs(batch=1, seq=16)
    program = lower(run_pipeline(tensorc.trace(model, **feeds), "O2"), {})
    (gather,) = [k for k in program.kernels if k.name.startswith("gather")]
    text = codegen.render([gather])
    assert text.count("!llvm.loop") == 1 and '!"llvm.loop.unroll.disable"' in text
    assert len(jit._build_object(text)) < 8000   # 21624 bytes unrolled


_AHEAD = """
import numpy as np
import tensorc, tensorc.models
from tensorc.backends.llvm import jit
model = tensorc.models.get("gpt", "tiny")
feeds = model.example_inputs(batch=1, seq=8)
graph = tensorc.trace(model, **feeds)
got = tensorc.compile(graph, "llvm", passes="O2").run(feeds)
want = tensorc.compile(graph, "numpy").run(feeds)
for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
print("ahead", jit.stats["ahead"], "compiled", jit.stats["compiled"], "disk_hits",
      jit.stats["disk_hits"])
"""


def test_attention_and_gelu_compile_in_a_second_process_on_a_cold_cache(tmp_path):
    """A fresh process compiling GPT hands attention and the gelu GEMM's group to a
    child process and finds their entries; the next process compiles nothing."""
    env = {**os.environ, "TENSORC_CACHE_DIR": str(tmp_path / "c")}
    outs = [subprocess.run([sys.executable, "-c", _AHEAD], capture_output=True, text=True,
                           timeout=300, env=env) for _ in range(2)]
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    first = outs[0].stdout.split()
    assert first[:2] == ["ahead", "2"] and int(first[5]) >= 2, outs[0].stdout
    assert outs[1].stdout.split()[:4] == ["ahead", "0", "compiled", "0"], outs[1].stdout


_AHEAD_FAILS = """
import sys
sys.path.insert(0, "tests")
from test_llvm import ELEMENTWISE_IR, _run_twice
from tensorc.backends.llvm import jit
def broken():
    raise RuntimeError("the child fails")
assert jit.compile_ahead([("test/twice", broken, True, True)]) is not None
assert jit.compile_ahead([("test/twice", broken, True, True)]) is None   # pending
_run_twice(jit.compile_library("test/twice", lambda: ELEMENTWISE_IR, ["twice"]))
print("compiled", jit.stats["compiled"], "disk_hits", jit.stats["disk_hits"])
"""


def test_a_failed_compile_ahead_is_compiled_here(tmp_path):
    out = subprocess.run([sys.executable, "-c", _AHEAD_FAILS], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TENSORC_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiled 1 disk_hits 0" in out.stdout, out.stdout


_GROUPS = """
import numpy as np
from tensorc.backends.llvm import gemm, gemm_ir
def entries():   # (tile, entry) of every compiled entry point
    return {(t, e) for t, lib in gemm_ir._libs.items() for e in [*lib, *lib["jobs"]]}
for m, k, n, act in [(128, 512, 2048, "gelu_tanh"), (128, 2048, 512, None), (8, 64, 64, "relu")]:
    a, b = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
    out = np.empty((m, n), np.float32)
    before = entries()
    gemm.bind(a, gemm.PackedB(b, threads=2), out, activation=act, threads=2)()
    groups = sorted({gemm_ir.group_name(g, t) for t, e in entries() - before
                     for g, names in gemm_ir.GROUPS.items() if e in names} - {"pack_b"})
    print(groups == sorted(gemm.library_groups(m, k, n, act, 2)), groups)
"""


def test_library_groups_name_the_groups_a_bound_gemm_compiles(tmp_path):
    out = subprocess.run([sys.executable, "-c", _GROUPS], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TENSORC_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("True") for line in lines), out.stdout
