"""Files, text and shapes as a hostile user writes them (issue 10).

Each case ends in one TensorcError line: never a MemoryError, RuntimeError,
NotImplementedError or tokenizer error from deep inside numpy or zipfile, never a
gigabyte inflated before the file is refused, and no .safetensors file accepted that
the `safetensors` library itself rejects.
"""

import io
import json
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import safetensors.numpy
from safetensors import SafetensorError

from tensorc.errors import TensorcError
from tensorc.frontend import weights


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npy_header(shape, descr="<f4") -> bytes:
    """An npy v1.0 header declaring `shape` (no data after it)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def _zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def _patch(path, local_at: int, central_at: int, value: int):
    """Set a 16-bit field of every member's local and central zip header."""
    raw = bytearray(open(path, "rb").read())
    for sig, at in ((b"PK\x03\x04", local_at), (b"PK\x01\x02", central_at)):
        i = raw.find(sig)
        while i >= 0:
            raw[i + at:i + at + 2] = struct.pack("<H", value)
            i = raw.find(sig, i + 4)
    open(path, "wb").write(bytes(raw))


def _refused(path, match=None):
    with pytest.raises(TensorcError, match=match) as info:
        weights.load(str(path))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_npz_header_claiming_a_terabyte_is_refused_before_allocating(tmp_path):
    path = _zip(tmp_path / "huge.npz", {"w.npy": _npy_header((10**12,)) + b"\0" * 64})
    _refused(path, "declares .*more than")


def test_encrypted_and_unknown_compression_members_are_refused(tmp_path):
    enc = _zip(tmp_path / "enc.npz", {"w.npy": _npy(np.ones(3, np.float32))})
    _patch(enc, 6, 8, 0x1)          # general purpose flag bit 0: encrypted
    _refused(enc, "encrypted")
    odd = _zip(tmp_path / "odd.npz", {"w.npy": _npy(np.ones(3, np.float32))})
    _patch(odd, 8, 10, 99)          # compression method
    _refused(odd, "compression method 99")


@pytest.mark.parametrize("flip", [b"'descr'", b"'shape'", b"False"])
def test_a_flipped_header_byte_is_one_line(tmp_path, flip):
    data = bytearray(_npy(np.ones((2, 3), np.float32)))
    i = bytes(data).find(flip)
    data[i + 1] ^= 0x55
    _refused(_zip(tmp_path / "flip.npz", {"w.npy": bytes(data)}))


def test_a_deflate_bomb_is_not_inflated(tmp_path):
    """A member whose header declares 16 floats but whose stream inflates to 256 MiB:
    refused after reading what the header declares, without inflating the rest."""
    bomb = _npy_header((16,)) + b"\0" * (256 << 20)
    path = _zip(tmp_path / "bomb.npz", {"w.npy": bomb}, zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.npz").stat().st_size < (1 << 20)
    tracemalloc.start()
    try:
        _refused(path, "more data than its header declares")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20), peak


def test_object_arrays_non_npy_members_and_truncation(tmp_path):
    objects = _npy_header((2,), "|O") + b"\x80\x04N." * 2
    _refused(_zip(tmp_path / "obj.npz", {"w.npy": objects}), "pickled objects")
    _refused(_zip(tmp_path / "txt.npz", {"notes.txt": b"hello"}), "not an .npy array")
    short = _npy_header((100,)) + b"\0" * 40
    _refused(_zip(tmp_path / "short.npz", {"w.npy": short}), "truncated")
    _refused(_zip(tmp_path / "neg.npz", {"w.npy": _npy_header((-4,))}), "negative shape")


def test_good_npz_files_still_read_exactly(tmp_path):
    """Every dtype, Fortran order, big-endian data, 0-d and empty arrays, compressed."""
    rng = np.random.default_rng(0)
    arrays = {"f": rng.standard_normal((3, 4)).astype(np.float32),
              "fortran": np.asfortranarray(rng.standard_normal((5, 2))),
              "big": rng.standard_normal(7).astype(">f8"),
              "i": rng.integers(-9, 9, (2, 2, 2)), "b": rng.random(5) < 0.5,
              "scalar": np.array(3, np.int32), "empty": np.zeros((0, 3), np.float16)}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        got = weights.load(str(path))
        assert sorted(got) == sorted(arrays)
        for k, want in arrays.items():
            assert got[k].shape == want.shape and got[k].dtype == want.dtype.newbyteorder("=")
            np.testing.assert_array_equal(got[k], want)
            assert got[k].flags.writeable


# --- safetensors: exactly what the library accepts ------------------------------------

def _st(header: dict, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _f32(n):
    return np.arange(n, dtype="<f4").tobytes()


MALFORMED = {
    "negative-offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
                        _f32(2)),
    "overlapping": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, _f32(3)),
    "odd-length": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 7]}}, _f32(2)[:7]),
    "minus-one-shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}},
                        _f32(2)),
    "trailing-bytes": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                       _f32(4)),
    "non-string-metadata": ({"__metadata__": {"n": 3},
                             "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                            _f32(2)),
    "shape-mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                       _f32(2)),
    "unknown-dtype": ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, _f32(2)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_are_refused_like_the_library(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_st(*MALFORMED[case]))
    with pytest.raises(SafetensorError):   # the library's own verdict: it rejects the file
        safetensors.numpy.load_file(str(path))
    _refused(path, "not a readable .safetensors file")


def test_zlib_is_what_deflate_members_use():
    """The bomb test relies on deflate compressing zeros about 1000:1."""
    assert len(zlib.compress(b"\0" * (1 << 20))) < 2048


# --- IR text and artifact metadata (item 7) ------------------------------------------

GRAPH = "graph g(%x: f32[2]) {{\n  %0: f32[2] = {body}\n  return %0\n}}"

BAD_TEXT = {
    "deep-brackets": GRAPH.format(body="reshape(%x, shape=" + "[" * 5000 + "2" + "]" * 5000
                                  + ")"),
    "5000-digit-dim": "graph g(%x: f32[" + "9" * 5000 + "]) {\n  return %x\n}",
    "float-dim": "graph g(%x: f32[1.5]) {\n  return %x\n}",
    "bool-dim": "graph g(%x: f32[true]) {\n  return %x\n}",
    "list-dim": "graph g(%x: f32[[2]]) {\n  return %x\n}",
}


@pytest.mark.parametrize("case", list(BAD_TEXT))
def test_bad_ir_text_is_one_parse_error(case):
    from tensorc.errors import ParseError
    from tensorc.text import parse_graph
    with pytest.raises(ParseError, match="line ") as info:
        parse_graph(BAD_TEXT[case])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field,value", [("passes", 3), ("name", ["x"]), ("backend", {}),
                                         ("config", "gpt"), ("overrides", [1])])
def test_artifact_metadata_of_the_wrong_type_is_one_line(tmp_path, field, value):
    """A hand-edited artifact: valid JSON, wrong types; refused when loaded, naming the
    field, and the CLI exits 2 with one line."""
    import subprocess
    import sys

    import tensorc
    from tensorc.artifact import load_artifact, save_artifact
    g = tensorc.trace(lambda x: x * 2.0, tensorc.TensorSpec((3,)))
    path = str(tmp_path / "a.tensorc")
    save_artifact(path, g, {"x": np.ones(3, np.float32)}, {field: value})
    with pytest.raises(TensorcError, match=f"bad artifact metadata: '{field}'"):
        load_artifact(path)
    out = subprocess.run([sys.executable, "-m", "tensorc.cli", "run", path],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("tensorc: error:"), out.stderr
    assert "Traceback" not in out.stderr


# --- output paths (item 4) ----------------------------------------------------------

def _cli(*argv):
    from tensorc.cli import main
    return main(list(argv))


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_outputs_never_replace_what_is_not_a_regular_file(tmp_path, capsys, kind):
    import os
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "out.tensorc"
    if kind == "symlink":
        out.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(out)            # opening it to write would block: refused before that
    else:
        out.mkdir()
    for argv in (["compile", "gpt", "--preset", "tiny", "-o", str(out)],
                 ["run", "gpt", "--preset", "tiny", "--output", str(out)],
                 ["export", "gpt", "--preset", "tiny", "-o", str(out)],
                 ["inspect", "gpt", "--preset", "tiny", "--format", "dot", "-o", str(out)]):
        assert _cli(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("tensorc: error: refusing to write") and "\n" not in err
    assert target.read_text() == "keep me"
    assert (out.is_symlink() if kind == "symlink" else
            out.is_fifo() if kind == "fifo" else out.is_dir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tensorc-")] == []


def test_a_regular_output_file_is_replaced_with_the_usual_permissions(tmp_path):
    import os
    out = tmp_path / "g.tensorc"
    out.write_bytes(b"old")
    assert _cli("compile", "gpt", "--preset", "tiny", "-o", str(out)) == 0
    assert out.read_bytes()[:2] == b"PK"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# --- product dims in graph inputs (item 3) ----------------------------------------------

def _product_graph():
    import tensorc
    g = tensorc.Graph("prod")
    x = g.add_input("x", tensorc.TensorType(("2*seq",), "f32"))
    y = g.add_input("y", tensorc.TensorType(("seq",), "f32"))
    g.outputs = [g.add("reduce_sum", x, axes=(0,)), g.add("reduce_sum", y, axes=(0,))]
    return g


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_product_dims_are_checked_when_shapes_bind(backend):
    import tensorc
    from tensorc.errors import InputError
    exe = tensorc.compile(_product_graph(), backend=backend)
    ok = exe(np.ones(6, np.float32), np.ones(3, np.float32))
    assert [float(o) for o in ok] == [6.0, 3.0]
    for x, y in [(1, 3), (5, 3), (8, 3)]:   # 1 would broadcast silently; 5 and 8 mismatch
        with pytest.raises(InputError, match="expected f32\\[2\\*seq\\]") as info:
            exe(np.ones(x, np.float32), np.ones(y, np.float32))
        assert "seq=3" in str(info.value)


def test_a_product_dim_alone_binds_its_symbol_or_says_why():
    import tensorc
    from tensorc.errors import InputError
    from tensorc.ir import bind_shapes
    t = tensorc.TensorType(("2*seq",), "f32")
    assert bind_shapes([t], [np.ones(8, np.float32)], ["x"]) == {"seq": 4}
    with pytest.raises(InputError, match="expected f32\\[2\\*seq\\]"):
        bind_shapes([t], [np.ones(7, np.float32)], ["x"])
    two = tensorc.TensorType(("a*b",), "f32")
    with pytest.raises(InputError, match="does not say what a and b are"):
        bind_shapes([two], [np.ones(6, np.float32)], ["x"])


# --- CLI values and resource guards (items 9 and 10) -----------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], "--seed: expected an integer from 0"),
    (["--set", "n_head=0"], "'n_head' must be positive"),
    (["--set", "vocab_size=0"], "'vocab_size' must be positive"),
    (["--set", "vocab_size=-3"], "'vocab_size' must be positive"),
    (["--set", "n_layer=-1"], "'n_layer' must be positive"),
    (["--set", "eps=-1.0"], "'eps' must be positive"),
    (["--set", "d_model=1000000000"], "needs .* GiB, more than this machine's"),
    (["--set", "n_layer=99999999999999999999"], "needs .* GiB, more than this machine's"),
    (["--batch", "100000000000"], "example token ids .* needs .* GiB"),
    (["--batch", "3000000"], "running gpt on input_ids i64\\[3000000,16\\] needs"),
])
def test_bad_cli_values_are_one_line_and_quick(capsys, argv, message):
    import re
    import time
    start = time.perf_counter()
    assert _cli("run", "gpt", "--preset", "tiny", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tensorc: error:") and "\n" not in err, err
    assert re.search(message, err), err
    assert time.perf_counter() - start < 30   # refused before the work, not after


def test_batch_and_seq_do_not_apply_to_fixed_shapes(tmp_path, capsys):
    """A static ONNX model ignores no flag silently: like an artifact, it refuses them."""
    import tensorc
    from tensorc.frontend import onnx as onnx_io
    g = tensorc.trace(lambda x: x * 2.0, tensorc.TensorSpec((2, 3)))
    path = str(tmp_path / "static.onnx")
    onnx_io.save(g, path)
    for flag in ("--seq", "--batch"):
        assert _cli("run", path, flag, "4") == 2
        err = capsys.readouterr().err
        assert f"no input dim named like {flag[2:]}" in err
    assert _cli("run", path) == 0


def test_names_from_files_reach_the_terminal_without_escapes(tmp_path, capsys):
    import tensorc
    from tensorc.artifact import save_artifact
    g = tensorc.trace(lambda x: x * 2.0, tensorc.TensorSpec((3,)))
    path = str(tmp_path / "a.tensorc")
    save_artifact(path, g, {"x": np.ones(3, np.float32)}, {"name": "\x1b[31mred\x1b]0;t\x07"})
    assert _cli("compare", path, "--backends", "numpy") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31mred" in out


# --- the JIT cache is untrusted (item 2) ------------------------------------------------

_COMPILE_AND_RUN = """
import sys
sys.path.insert(0, "tests")
from test_llvm import ELEMENTWISE_IR, _run_twice
from tensorc.backends.llvm import jit
_run_twice(jit.compile_ir(ELEMENTWISE_IR, ["twice"]))
print("compiled", jit.stats["compiled"], "disk_hits", jit.stats["disk_hits"])
"""


def _cache_case(tmp_path, case: str):
    """Plant a hostile entry where the test kernel's cache entry goes."""
    import os
    import sys
    sys.path.insert(0, "tests")
    from test_llvm import ELEMENTWISE_IR

    from tensorc.backends.llvm import jit
    key = jit.cache_key(ELEMENTWISE_IR)
    path = tmp_path / "cache" / key[:2] / (key + ".o")
    path.parent.mkdir(parents=True)
    good = jit._build_object(ELEMENTWISE_IR)
    ours = jit.cache_secret(tmp_path / "cache")
    forged = bytes(32)   # a writer that does not know this user's secret
    if case == "swapped":            # another key's valid entry copied to this path
        path.write_bytes(jit.entry_bytes("f" * 64, good, ours))
    elif case == "forged-truncated":  # key right, object cut short (LLVM would crash)
        path.write_bytes(jit.entry_bytes(key, good[: len(good) // 3], forged))
    elif case == "forged-garbage":
        path.write_bytes(jit.entry_bytes(key, b"\x7fELF" + b"\xff" * 200, forged))
    elif case == "damaged":          # a valid entry with one payload byte flipped
        blob = bytearray(jit.entry_bytes(key, good, ours))
        blob[-10] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif case == "empty":
        path.write_bytes(jit.entry_bytes(key, b"", ours))
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "dev-zero":
        path.symlink_to("/dev/zero")
    elif case == "directory":
        path.mkdir()
    return str(tmp_path / "cache")


@pytest.mark.parametrize("case", ["swapped", "forged-truncated", "forged-garbage", "damaged",
                                  "empty", "fifo", "dev-zero", "directory"])
def test_a_hostile_cache_entry_is_rebuilt_not_trusted(tmp_path, case):
    """In a child process (a use-after-free would kill it): the kernel still compiles
    and computes, with no hang, crash or MemoryError, whatever sits in the cache."""
    import os
    import subprocess
    import sys
    cache = _cache_case(tmp_path, case)
    out = subprocess.run([sys.executable, "-c", _COMPILE_AND_RUN], capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "TENSORC_CACHE_DIR": cache})
    assert out.returncode == 0, (case, out.returncode, out.stderr[-2000:])
    assert "compiled 1 disk_hits 0" in out.stdout, out.stdout


def test_a_cache_secret_that_is_not_private_disables_the_cache(tmp_path):
    """A key file others can read (or a link, or another user's) is not trusted: the
    kernel compiles and runs, and nothing is read from or written to that cache."""
    import os
    import subprocess
    import sys
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "key").write_bytes(bytes(32))
    os.chmod(cache / "key", 0o644)
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _COMPILE_AND_RUN], capture_output=True,
                             text=True, timeout=120,
                             env={**os.environ, "TENSORC_CACHE_DIR": str(cache)})
        assert out.returncode == 0 and "compiled 1 disk_hits 0" in out.stdout, out
    assert sorted(p.name for p in cache.iterdir()) == ["key"]


# --- symbolic-shape facts (item 1) ---------------------------------------------------

def _shape_slice_add_onnx(path):
    """A valid ONNX file: y = w[:len(x)] + x with w of 8 elements, so only len(x) <= 8
    makes sense. It passes onnx.checker's full check."""
    import onnx
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, [8], list(np.arange(8, dtype=np.float32)))
    nodes = [helper.make_node("Shape", ["x"], ["n"]),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor(
                 "z", TensorProto.INT64, [1], [0])),
             helper.make_node("Slice", ["w", "zero", "n"], ["ws"], name="slice_w"),
             helper.make_node("Add", ["ws", "x"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_a_broken_shape_fact_is_an_error_on_every_backend(tmp_path, backend):
    import tensorc
    from tensorc.errors import ShapeError
    from tensorc.frontend import onnx as onnx_io
    path = str(tmp_path / "slice.onnx")
    _shape_slice_add_onnx(path)
    exe = tensorc.compile(onnx_io.load(path), backend=backend)
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(exe(x), np.arange(5) * 2.0)   # seq <= 8: fine
    for n in (9, 30_000):   # llvm used to return heap bytes here (or crash, for huge n)
        with pytest.raises(ShapeError, match="slice.*with seq=") as info:
            exe(np.ones(n, np.float32))
        assert "\n" not in str(info.value)
    np.testing.assert_array_equal(exe(x), np.arange(5) * 2.0)   # and still works after


def test_inspect_makes_no_inputs_it_does_not_need(tmp_path, capsys):
    """`inspect --format json` of a symbolic model at a huge --seq sizes it (flops, peak
    memory) without drawing a billion random tokens."""
    import json
    import time

    import tensorc
    from tensorc.frontend import onnx as onnx_io
    g = tensorc.trace(tensorc.models.get("gpt", "tiny"),
                      input_ids=tensorc.TensorSpec(("batch", "seq"), "i64"))
    path = str(tmp_path / "gsym.onnx")
    onnx_io.save(g, path)
    start = time.perf_counter()
    assert _cli("inspect", path, "--seq", "1000000000", "--format", "json") == 0
    assert time.perf_counter() - start < 10
    info = json.loads(capsys.readouterr().out)
    assert info["bindings"] == {"batch": 1, "seq": 1000000000} and info["flops"] > 10**12


@pytest.mark.parametrize("field", ["graph", "node"])
def test_onnx_text_fields_that_are_not_utf8_are_one_line(tmp_path, field):
    """ONNX is proto2: protobuf does not check UTF-8 and hands such a string over as
    bytes (found by the fuzzer: a TypeError deep in the importer)."""
    from onnx import TensorProto, helper

    from tensorc.frontend import onnx as onnx_io
    node = helper.make_node("Relu", ["x"], ["y"], name="NODENAME" if field == "node" else "")
    graph = helper.make_graph([node], "GRAPHNAME" if field == "graph" else "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    raw = helper.make_model(graph).SerializeToString()
    marker = b"GRAPHNAME" if field == "graph" else b"NODENAME"
    path = tmp_path / "bad.onnx"
    path.write_bytes(raw.replace(marker, b"\xff" * len(marker)))
    with pytest.raises(TensorcError, match="is not UTF-8 text"):
        onnx_io.load(str(path))


def test_integer_division_is_exact_past_two_to_the_53():
    """The reference divided integers through float64: 9007199254740993 // 1 gave ...992."""
    import tensorc
    g = tensorc.Graph("div")
    a = g.add_input("a", tensorc.TensorType((4,), "i64"))
    b = g.add_input("b", tensorc.TensorType((4,), "i64"))
    g.outputs = [g.add("div", a, b)]
    x = np.array([2**53 + 1, -7, 7, 2**62 + 3], np.int64)
    y = np.array([1, 2, -2, 3], np.int64)
    want = np.array([2**53 + 1, -3, -3, (2**62 + 3) // 3], np.int64)
    for backend in ("numpy", "llvm"):
        np.testing.assert_array_equal(tensorc.compile(g, backend=backend)(x, y), want)


def test_reference_errors_at_run_time_name_the_node():
    import tensorc
    g = tensorc.Graph("g")
    x = g.add_input("x", tensorc.TensorType((2, 3), "f32"))
    i = g.add_input("i", tensorc.TensorType((2,), "i64"))
    g.outputs = [g.add("gather", x, i, axis=0)]
    with pytest.raises(TensorcError, match=r"gather %\w+.*index 5 is out of range"):
        tensorc.compile(g, "numpy")(np.ones((2, 3), np.float32), np.array([0, 5]))


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_an_empty_sequence_runs_to_an_empty_result(backend):
    """seq 0 (an ONNX input dim of 0, found by the fuzzer): the numpy softmax raised
    'zero-size array to reduction', the llvm GEMM a ValueError reshaping its operand."""
    import tensorc
    from tensorc.passes import run_pipeline
    g = tensorc.trace(tensorc.models.get("gpt", "tiny"),
                      input_ids=tensorc.TensorSpec(("batch", "seq"), "i64"))
    for pipe in ("O0", "O2"):
        exe = tensorc.compile(run_pipeline(g, pipe), backend=backend)
        out = exe(np.zeros((2, 0), np.int64))
        assert out.shape == (2, 0, 97)


def test_int_min_divided_by_minus_one_does_not_trap():
    """x86 traps (SIGFPE) on INT_MIN / -1 as on x / 0; the generated kernel divides by 1
    there and wraps like the reference. In a child process: a trap would kill it."""
    import subprocess
    import sys
    code = """
import numpy as np, tensorc
for dt, npdt in (("i64", np.int64), ("i32", np.int32), ("i8", np.int8)):
    g = tensorc.Graph("d")
    a = g.add_input("a", tensorc.TensorType((4,), dt))
    b = g.add_input("b", tensorc.TensorType((4,), dt))
    g.outputs = [g.add("div", a, b)]
    lo = np.iinfo(npdt).min
    x, y = np.array([lo, 7, lo, 5], npdt), np.array([-1, -1, 1, 0], npdt)
    got = tensorc.compile(g, "llvm")(x, y)
    assert (got == tensorc.compile(g, "numpy")(x, y)).all(), got
    assert got.tolist() == [lo, -7, lo, 0], got
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])
