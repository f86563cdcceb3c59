"""The `tensorc` command line, run in-process (plus one run of the installed script)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import tensorc
from tensorc import backends, cli
from tensorc.backends import Backend
from tensorc.errors import TensorcError
from tensorc.passes import PASSES, explain
from tensorc.text import parse_graph


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys, *argv) -> str:
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    return out


def traced(name="gpt", batch=1, seq=None, **overrides):
    model = tensorc.models.get(name, "tiny", **overrides)
    inputs = model.example_inputs(batch=batch, seq=seq)
    return tensorc.trace(model, **inputs), inputs


# --- models and inspect -------------------------------------------------------------------

def test_models_lists_every_model_and_preset(capsys):
    out = ok(capsys, "models")
    for name, presets in tensorc.models.list_models().items():
        for preset in presets:
            assert re.search(rf"^{name}\s+{preset}\s", out, re.M), (name, preset)
    listing = json.loads(ok(capsys, "models", "--json"))
    assert listing["gpt"]["small"]["n_layer"] == 6
    assert abs(listing["gpt"]["small"]["params"] - 23_633_920) <= 23_634


def test_inspect_text_is_the_ir(capsys):
    out = ok(capsys, "inspect", "gpt")
    graph, _ = traced()
    assert out == str(graph)
    assert str(parse_graph(out)) == out


def test_inspect_json_fields(capsys):
    info = json.loads(ok(capsys, "inspect", "gpt", "--format", "json"))
    graph, _ = traced()
    assert info["nodes"] == len(graph.nodes) == sum(info["ops"].values())
    assert info["ops"] == graph.op_counts()
    assert info["params"] == graph.param_count()
    assert info["inputs"] == [{"name": "input_ids", "type": "i64[1,16]"}]
    assert info["outputs"] == [{"name": "logits", "type": "f32[1,16,97]"}]
    assert info["config"]["d_model"] == 32 and info["config"]["vocab_size"] == 97
    # matmuls alone: the tied output projection is 2 * 16 * 32 * 97 flops
    assert info["flops"] > 2 * 16 * 32 * 97
    # the logits (1*16*97 f32) are alive at the end, so the peak is at least that
    assert info["peak_memory_bytes"] >= 16 * 97 * 4


def test_inspect_reports_the_backends_memory_plan(capsys):
    from tensorc.backends.lowering import planned_memory
    from tensorc.backends.plan import peak_memory_bytes
    graph, _ = traced()
    llvm = json.loads(ok(capsys, "inspect", "gpt", "--format", "json", "--backend", "llvm"))
    numpy = json.loads(ok(capsys, "inspect", "gpt", "--format", "json"))
    assert llvm["backend"] == "llvm" and numpy["backend"] == "numpy"
    assert llvm["peak_memory_bytes"] == planned_memory(graph, {})["arena_bytes"]
    assert numpy["peak_memory_bytes"] == peak_memory_bytes(graph, {})
    # the llvm arena packs buffers and keeps views lazy: it plans less than numpy frees
    assert 0 < llvm["peak_memory_bytes"] < numpy["peak_memory_bytes"]


def test_inspect_small_param_count(capsys):
    info = json.loads(ok(capsys, "inspect", "gpt", "--preset", "small", "--format", "json",
                         "--seq", "4"))
    assert abs(info["params"] - 23_633_920) <= 0.001 * 23_633_920


def test_set_changes_the_graph(capsys):
    base = json.loads(ok(capsys, "inspect", "gpt", "--format", "json"))
    three = json.loads(ok(capsys, "inspect", "gpt", "--format", "json", "--set", "n_layer=3"))
    assert three["config"]["n_layer"] == 3
    assert three["nodes"] > base["nodes"] and three["params"] > base["params"]


def test_batch_and_seq_size_the_inputs(capsys):
    info = json.loads(ok(capsys, "inspect", "bert", "--format", "json", "--batch", "3",
                         "--seq", "5"))
    assert [i["type"] for i in info["inputs"]] == ["i64[3,5]", "i64[3,5]"]
    assert info["outputs"][0]["type"] == "f32[3,5,101]"


def test_inspect_dot_is_a_digraph(capsys, tmp_path):
    path = tmp_path / "g.dot"
    assert ok(capsys, "inspect", "vit", "--format", "dot", "-o", path) == ""
    dot = path.read_text()
    assert dot.startswith('digraph "vit" {') and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    ident = r'(n\d+|"(?:[^"\\]|\\.)*")'
    declared = set(re.findall(rf"^  {ident} \[", dot, re.M))
    edges = re.findall(rf"^  {ident} -> {ident} \[", dot, re.M)
    graph, _ = traced("vit")
    assert len(edges) == graph.to_networkx().number_of_edges() + len(graph.outputs)
    assert {e for pair in edges for e in pair} <= declared
    assert len(declared) == graph.to_networkx().number_of_nodes() + 1  # + "return"


def test_explain(capsys):
    rc, out, err = run_cli(capsys, "inspect", "gpt", "--explain")
    graph, _ = traced()
    lines = explain(graph)
    assert rc == 0 and out == str(graph)
    assert err.splitlines() == (lines or ["nothing to explain"])
    info = json.loads(ok(capsys, "inspect", "gpt", "--format", "json", "--explain"))
    assert info["explain"] == lines


# --- run ----------------------------------------------------------------------------------

def test_run_prints_a_summary(capsys):
    out = ok(capsys, "run", "gpt", "--batch", "2", "--seq", "8")
    graph, inputs = traced(batch=2, seq=8)
    logits = tensorc.compile(graph)(**inputs)
    line, = out.splitlines()
    assert line.startswith("logits: f32[2,8,97]")
    assert f"max {float(logits.max()):.6g}" in line


def test_run_npz_in_and_out(capsys, tmp_path):
    model = tensorc.models.get("bert", "tiny")
    inputs = model.example_inputs(batch=2, seq=6, seed=7)
    np.savez(tmp_path / "in.npz", **inputs)
    out = ok(capsys, "run", "bert", "--input", tmp_path / "in.npz",
             "--output", tmp_path / "out.npz")
    assert "out.npz" in out
    with np.load(tmp_path / "out.npz", allow_pickle=False) as f:
        assert f.files == ["logits"]
        got = f["logits"]
    want = tensorc.compile(tensorc.trace(model, **inputs))(**inputs)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_run_seed_changes_the_outputs(capsys, tmp_path):
    for seed in (0, 1):
        ok(capsys, "run", "gpt", "--seed", seed, "--output", tmp_path / f"{seed}.npz")
    a, b = (np.load(tmp_path / f"{s}.npz")["logits"] for s in (0, 1))
    assert not np.array_equal(a, b)


# --- errors -------------------------------------------------------------------------------

@pytest.fixture
def bad_inputs(tmp_path):
    ids = np.zeros((1, 16), np.int64)
    files = {
        "missing": {},
        "extra": {"input_ids": ids, "mask": ids},
        "shape": {"input_ids": np.zeros((1, 16, 2), np.int64)},
        "dtype": {"input_ids": ids.astype(np.float32)},
    }
    for name, arrays in files.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "notnpz.npz").write_text("hello")
    return tmp_path


BAD = [
    (["run", "no/such/file.py:make"], "file not found: no/such/file.py"),
    (["run", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["run", "missing.tc"], "file not found: missing.tc"),
    (["inspect", "gpt", "--set", "n_layr=3"], "no config key 'n_layr'"),
    (["inspect", "gpt", "--set", "n_layer=abc"], "'n_layer' takes a int"),
    (["inspect", "gpt", "--set", "n_layer"], "should be key=value"),
    (["inspect", "gpt", "--preset", "huge"], "no preset 'huge'"),
    (["run", "gpt", "--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["compare", "gpt", "--backends", "numpy,nosuch"], "unknown backend 'nosuch'"),
    (["run", "gpt", "--passes", "nosuch"], "unknown pass or pipeline 'nosuch'"),
    (["run", "gpt", "--disable", "nosuch"], "unknown pass 'nosuch'"),
    (["run", "gpt", "--print-after", "nosuch"], "unknown pass 'nosuch'"),
    (["run", "gpt", "--batch", "0"], "--batch: expected a positive integer"),
    (["run", "gpt", "--seq", "1000"], "seq 1000 exceeds max_seq_len 64"),
    (["inspect", "gpt", "--format", "yaml"], "invalid choice: 'yaml'"),
    (["compile", "gpt"], "required: -o/--output"),
    (["compile", "gpt", "-o", "{tmp}/a.tc", "--emit-source", "{tmp}/src"],
     "backend numpy generates no source"),
    (["inspect", "gpt", "-o", "{tmp}/no/dir/out.txt"], "No such file or directory"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["run", "gpt", "--input", "{tmp}/missing.npz"], "missing ['input_ids']"),
    (["run", "gpt", "--input", "{tmp}/extra.npz"], "unknown ['mask']"),
    (["run", "gpt", "--input", "{tmp}/shape.npz"], "got i64[1,16,2]"),
    (["run", "gpt", "--input", "{tmp}/dtype.npz"], "of i64 (like i64[1,16]), got f32"),
    (["run", "gpt", "--input", "{tmp}/notnpz.npz"], "is not an .npz file"),
    (["run", "gpt", "--input", "{tmp}/absent.npz"], "file not found"),
    (["run", "{tmp}/notnpz.npz"], "is not a tensorc artifact"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_user_errors_are_one_line(capsys, bad_inputs, argv, message):
    argv = [a.format(tmp=bad_inputs) for a in argv]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert "Traceback" not in err
    line, = err.splitlines()
    assert line.startswith("tensorc: error: ")
    assert message in line
    if "--input" in argv:  # input problems name the file they came from
        assert argv[argv.index("--input") + 1] in line


@pytest.mark.parametrize("argv", [["run", "nosuchmodel", "--debug"],
                                  ["--debug", "run", "nosuchmodel"]])
def test_debug_shows_the_exception(argv):
    with pytest.raises(TensorcError, match="unknown model"):
        cli.main(argv)


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(graph):
        raise RuntimeError("a bug in a pass")
    monkeypatch.setitem(PASSES, "test-broken", broken)
    with pytest.raises(RuntimeError, match="a bug in a pass"):
        cli.main(["run", "gpt", "--passes", "test-broken"])


# --- the pass-manager flags and compare ---------------------------------------------------

def _copy(graph):
    g = parse_graph(str(graph))
    for name, v in g.constants.items():
        v.data = graph.constants[name].data
    return g


def identity_pass(graph):
    return _copy(graph)


def double_output_pass(graph):
    """Multiplies the first output by 2: a known error (rel_err 1) to be detected."""
    g = _copy(graph)
    out = g.outputs[0]
    name = out.name
    g.rename(out, name + ".pre")
    two = g.add_constant(g.fresh_name("two"), np.array(2, out.type.np_dtype))
    g.outputs[0], = g.add_node("mul", [out, two], names=[name])
    return g.verify()


@pytest.fixture
def test_passes(monkeypatch):
    monkeypatch.setitem(PASSES, "test-identity", identity_pass)
    monkeypatch.setitem(PASSES, "test-double", double_output_pass)


class _NoDevice(Backend):
    name = "nodevice"

    def compile(self, graph):
        raise TensorcError("no GPU found")


@pytest.fixture
def unavailable_backend(monkeypatch):
    module = types.ModuleType("tensorc_test_nodevice")
    module.BACKEND = _NoDevice()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends._BACKENDS, "nodevice", module.__name__)


def test_compare_json(capsys, unavailable_backend):
    rep = json.loads(ok(capsys, "compare", "gpt", "--json", "--backends", "numpy,nodevice",
                        "--repeat", "2"))
    assert rep["reference"] == "numpy"
    numpy_row, missing = rep["results"]
    assert set(numpy_row) >= {"backend", "passes", "max_abs_err", "rel_err", "median_ms"}
    assert numpy_row["backend"] == "numpy" and numpy_row["passes"] == "O0"
    assert numpy_row["max_abs_err"] <= 1e-6 and numpy_row["rel_err"] <= 1e-6
    assert numpy_row["median_ms"] > 0 and numpy_row["unavailable"] is None
    assert missing["backend"] == "nodevice" and missing["rel_err"] is None
    assert missing["unavailable"] == "no GPU found"
    out = ok(capsys, "compare", "gpt", "--backends", "nodevice")
    assert re.search(r"^nodevice\s+O0\s+unavailable: no GPU found$", out, re.M)


def test_compare_shows_a_quantized_pipeline_next_to_its_float_self(capsys, tmp_path):
    rep = json.loads(ok(capsys, "compare", "gpt", "--json", "--backends", "numpy,llvm",
                        "--passes", "O2,quantize", "--repeat", "1"))
    rows = {(r["backend"], r["passes"]): r for r in rep["results"]}
    assert set(rows) == {(b, p) for b in ("numpy", "llvm") for p in ("O2", "O2,quantize")}
    for b in ("numpy", "llvm"):
        assert rows[b, "O2"]["rel_err"] < 1e-5 < rows[b, "O2,quantize"]["rel_err"] < 0.05
        assert rows[b, "O2,quantize"]["speedup_vs_float"] > 0
    out = ok(capsys, "compare", "gpt", "--backends", "llvm", "--passes",
             "O2,quantize:mode=static", "--repeat", "1", "--per-pass")
    assert re.search(r"^llvm\s+O2,quantize:mode=static\s+\S+\s+\S+\s+\S+\s+\d+\.\d\dx$",
                     out, re.M)
    assert re.search(r"^quantize\s+\d", out, re.M)   # its own error line
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.arange(16).reshape(1, 16) % 7)
    info = json.loads(ok(capsys, "inspect", "gpt", "--format", "json", "--passes",
                         "O1,quantize:mode=static", "--calib", calib))
    # 2 layers of q, k, v, o (32 x 32) and up, down (32 x 64) in one byte per weight
    assert info["weight_bytes"]["i8"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    rc, _, err = run_cli(capsys, "inspect", "gpt", "--passes", "quantize:mode=static",
                         "--calib", tmp_path / "none.npz")
    assert rc == 2 and "cannot read calibration data" in err


def test_compare_table_default_backends(capsys):
    out = ok(capsys, "compare", "bert", "--repeat", "1")
    lines = out.splitlines()
    assert lines[1].split() == ["backend", "passes", "max_abs_err", "rel_err", "median_ms",
                                "speed_vs_float"]
    from tensorc.backends import available_backends
    assert [ln.split()[0] for ln in lines[2:]] == available_backends()
    assert re.match(r"numpy\s+O0\s+0\s+0\s+\d", lines[2])


def test_compare_per_pass_finds_the_pass_that_adds_error(capsys, test_passes):
    rep = json.loads(ok(capsys, "compare", "gpt", "--json", "--backends", "numpy",
                        "--repeat", "1", "--passes", "test-identity,test-double",
                        "--per-pass"))
    ident, double = rep["per_pass"]
    assert ident["pass"] == "test-identity" and ident["rel_err"] == 0
    assert double["pass"] == "test-double" and double["rel_err"] == pytest.approx(1.0)
    assert rep["results"][0]["rel_err"] == pytest.approx(1.0)
    out = ok(capsys, "compare", "gpt", "--backends", "numpy", "--repeat", "1",
             "--passes", "test-identity,test-double", "--per-pass")
    assert re.search(r"^test-double\s+\S+\s+1\s", out, re.M)


def test_pass_manager_flags(capsys, test_passes):
    rc, out, err = run_cli(capsys, "inspect", "gpt", "--passes", "test-identity,test-double",
                           "--print-after", "test-double", "--time-passes")
    assert rc == 0
    assert "// IR after test-double" in err and "// IR after test-identity" not in err
    assert re.search(r"ms  test-identity$", err, re.M) and "total (2 passes)" in err
    assert "= mul(%logits.pre" in out
    out = ok(capsys, "inspect", "gpt", "--passes", "test-identity,test-double",
             "--disable", "test-double", "--verify-each")
    assert out == str(traced()[0])


# --- models from files --------------------------------------------------------------------

FACTORY = '''
import numpy as np
import tensorc
from tensorc.frontend import Linear, Module, F


class Tiny(Module):
    def __init__(self):
        super().__init__()
        self.proj = Linear(8, 4)

    def forward(self, x):
        return F.relu(self.proj(x))

    def example_inputs(self, batch=1, seq=None, seed=0):
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((batch, seq or 3, 8)).astype(np.float32)}


def make():
    return Tiny().init_weights(0)


def make_graph():
    return tensorc.trace(Tiny().init_weights(0),
                         x=tensorc.TensorSpec(("batch", "seq", 8), "f32"))


def make_image_graph():
    return tensorc.trace(lambda img: img * 2.0,
                         img=tensorc.TensorSpec(("batch", "height"), "f32"))


def make_nothing():
    return 42


class TupleInputs(Tiny):
    def example_inputs(self, batch=1, seq=None, seed=0):
        return (np.zeros((batch, 3, 8), np.float32),)


def make_tuple_inputs():
    return TupleInputs().init_weights(0)
'''


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


def test_factory_module(capsys, factory):
    info = json.loads(ok(capsys, "inspect", f"{factory}:make", "--format", "json",
                         "--batch", "2", "--seq", "5"))
    assert info["inputs"] == [{"name": "x", "type": "f32[2,5,8]"}]
    assert info["params"] == 8 * 4 + 4
    out = ok(capsys, "run", f"{factory}:make")
    assert out.startswith("output: f32[1,3,4]  min 0")  # relu: nothing below zero


def test_factory_graph_gets_random_inputs(capsys, factory, tmp_path):
    info = json.loads(ok(capsys, "inspect", f"{factory}:make_graph", "--format", "json",
                         "--batch", "3", "--seq", "7"))
    assert info["inputs"] == [{"name": "x", "type": "f32[batch,seq,8]"}]
    assert info["bindings"] == {"batch": 3, "seq": 7}
    out = ok(capsys, "run", f"{factory}:make_graph", "--batch", "3", "--seq", "7")
    assert out.startswith("output: f32[3,7,4]")


def test_dim_sizes_any_symbolic_input_dim(capsys, factory):
    out = ok(capsys, "run", f"{factory}:make_image_graph", "--dim", "height=5", "--batch", "3")
    assert out.startswith("output: f32[3,5]")
    info = json.loads(ok(capsys, "inspect", f"{factory}:make_image_graph", "--dim", "height=4",
                         "--dim", "batch=2", "--format", "json"))
    assert info["bindings"] == {"height": 4, "batch": 2}
    for argv, message in ((["run", "gpt", "--dim", "batch=2"], "traced or stored at fixed"),
                          (["run", f"{factory}:make_image_graph", "--dim", "height"],
                           "should be NAME=SIZE")):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and message in err


def test_random_token_ids_stay_inside_the_tables_they_index(capsys):
    """An export's token_type_ids index a 2-row table: random inputs stay below 2."""
    out = ok(capsys, "run", "tests/data/hf/bert_sdpa_dynamo.onnx", "--dim", "seq=24",
             "--backend", "llvm")
    assert "f32[1,24," in out


FACTORY_BAD = [
    (":make_image_graph", "cannot choose a size for dim 'height' of input %img: "
                          "f32[batch,height]; give it with --dim height=SIZE"),
    (":nosuch", "defines no function 'nosuch'"),
    (":make_nothing", "returned a int; it should return a tensorc Module or Graph"),
    ("", "name the factory function"),
    (":make_tuple_inputs", "TupleInputs.example_inputs() returned a tuple; it should return"),
]


@pytest.mark.parametrize("suffix,message", FACTORY_BAD)
def test_factory_errors(capsys, factory, suffix, message):
    rc, out, err = run_cli(capsys, "run", f"{factory}{suffix}")
    assert rc == 2 and err.startswith("tensorc: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_preset_applies_to_builtins_only(capsys, factory):
    rc, _, err = run_cli(capsys, "run", f"{factory}:make", "--set", "d=3")
    assert rc == 2 and "apply to built-in models only" in err


# --- ONNX (the importer and exporter live in tensorc.frontend.onnx) -------------------------

def test_missing_onnx_file_is_one_clear_line(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "run", tmp_path / "absent.onnx")
    assert rc == 2 and err == f"tensorc: error: file not found: {tmp_path / 'absent.onnx'}\n"


def test_onnx_round_trip(capsys, tmp_path):
    path = tmp_path / "gpt.onnx"
    ok(capsys, "export", "gpt", "-o", path)
    assert path.stat().st_size > 0
    info = json.loads(ok(capsys, "inspect", path, "--format", "json"))
    assert info["outputs"][0]["name"] == "logits"
    ok(capsys, "run", path, "--output", tmp_path / "out.npz")
    assert np.isfinite(np.load(tmp_path / "out.npz")["logits"]).all()


# --- the installed console script ---------------------------------------------------------

def test_console_script_is_installed():
    script = Path(sys.executable).parent / "tensorc"
    assert script.exists(), f"{script} is missing: reinstall with `pip install -e .`"
    res = subprocess.run([str(script), "inspect", "gpt", "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outputs"][0]["name"] == "logits"
    res = subprocess.run([str(script), "run", "nosuchmodel"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("tensorc: error: unknown model") and \
        len(res.stderr.splitlines()) == 1


def test_emit_source_with_a_code_generating_backend(capsys, tmp_path):
    from tensorc.backends import Backend, available_backends, get_backend
    gen = [b for b in available_backends() if b != "numpy"
           and type(get_backend(b)).emit_source is not Backend.emit_source]
    if not gen:
        pytest.skip(f"no registered backend generates source yet (have {available_backends()})")
    out = ok(capsys, "compile", "vit", "--backend", gen[0], "-o", tmp_path / "v.tc",
             "--emit-source", tmp_path / "src")
    written = [ln.removeprefix("wrote ") for ln in out.splitlines()[:-1]]
    assert written and all(Path(p).is_file() and Path(p).stat().st_size for p in written)


FALLBACK = '''
from tensorc.ir import Graph, TensorType


def make():
    g = Graph("grouped")
    x = g.add_input("x", TensorType((1, 4, 9, 9), "f32"))
    w = g.add_input("w", TensorType((4, 2, 3, 3), "f32"))
    g.outputs = g.add_node("conv2d", [x, w], {"group": 2})  # no llvm rule: a fallback
    return g
'''


@pytest.fixture
def fallback_model(tmp_path):
    path = tmp_path / "grouped.py"
    path.write_text(FALLBACK)
    return f"{path}:make"


@pytest.mark.parametrize("command", [["run", "--backend", "llvm"],
                                     ["compare", "--backends", "llvm", "--repeat", "1"]])
def test_fallback_is_a_one_line_warning_or_with_strict_an_error(capsys, fallback_model,
                                                                command, monkeypatch):
    monkeypatch.setenv("TENSORC_STRICT", "0")   # restored after the test: --strict sets it
    rc, _, err = run_cli(capsys, command[0], fallback_model, *command[1:])
    assert rc == 0
    (line,) = err.splitlines()
    assert line.startswith("tensorc: warning: 1 op(s) run the numpy reference")
    assert "conv2d" in line and "conv2d with groups" in line
    rc, _, err = run_cli(capsys, command[0], fallback_model, *command[1:], "--strict")
    assert rc == 2
    (line,) = err.splitlines()
    assert line.startswith("tensorc: error: strict mode: 1 op(s) would run the numpy")


def test_strict_from_the_environment(capsys, fallback_model, monkeypatch):
    monkeypatch.setenv("TENSORC_STRICT", "1")
    rc, _, err = run_cli(capsys, "run", fallback_model, "--backend", "llvm")
    assert rc == 2 and "strict mode" in err


@pytest.mark.parametrize("name", ["gpt", "bert", "vit"])
def test_export_dynamic_writes_one_graph_for_every_shape(capsys, tmp_path, name):
    """`export --dynamic`: symbolic batch (and sequence for token inputs); ONNX Runtime
    runs the file at two shapes as tensorc's model does."""
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / f"{name}.onnx"
    ok(capsys, "export", name, "--dynamic", "--passes", "O2", "-o", path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    model = tensorc.models.get(name, "tiny")
    for batch, seq in ((1, 5), (3, 12)):
        feeds = model.example_inputs(batch=batch, seq=None if name == "vit" else seq)
        want = tensorc.compile(tensorc.trace(model, **feeds)).run(feeds)["logits"]
        np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-4, atol=1e-5)
    rc, _, err = run_cli(capsys, "export", name, "--dynamic", "--batch", "2", "-o", path)
    assert rc == 2 and "--dynamic exports every batch" in err
