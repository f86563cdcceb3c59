"""The compiled artifact: pickle-free, and `run FILE` gives the model's outputs bit for bit."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

import tensorc
from tensorc import cli
from tensorc.artifact import load_artifact, save_artifact
from tensorc.errors import TensorcError
from tensorc.loading import load_model
from tensorc.passes import PIPELINES


def ok(capsys, *argv) -> str:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def outputs(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def assert_bitwise_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"output {k} differs"


def round_trip(capsys, tmp_path, model, *flags):
    art = tmp_path / "model.tc"
    ok(capsys, "compile", model, "-o", art, *flags)
    ok(capsys, "run", art, "--output", tmp_path / "from_file.npz")
    ok(capsys, "run", model, *flags, "--output", tmp_path / "from_model.npz")
    assert_bitwise_equal(outputs(tmp_path / "from_file.npz"),
                         outputs(tmp_path / "from_model.npz"))
    text_file = ok(capsys, "inspect", art, "--format", "text")
    assert text_file == ok(capsys, "inspect", model, *flags, "--format", "text")
    return art


@pytest.mark.parametrize("model", sorted(tensorc.models.MODELS))
def test_round_trip_every_model(capsys, tmp_path, model):
    flags = ["--batch", "2", "--seed", "3"] + (["--seq", "6"] if model != "vit" else [])
    art = round_trip(capsys, tmp_path, model, *flags)
    info = json.loads(ok(capsys, "inspect", art, "--format", "json"))
    assert info["config"] == json.loads(ok(capsys, "inspect", model, *flags,
                                           "--format", "json"))["config"]


@pytest.mark.parametrize("model", sorted(tensorc.models.MODELS))
@pytest.mark.parametrize("pipeline", ["O1", "O2"])
def test_round_trip_optimised(capsys, tmp_path, pipeline, model):
    if pipeline not in PIPELINES:
        pytest.skip(f"pipeline {pipeline} is not registered yet (have {list(PIPELINES)})")
    round_trip(capsys, tmp_path, model, "--passes", pipeline)


def test_round_trip_symbolic_graph(capsys, tmp_path):
    factory = tmp_path / "sym.py"
    factory.write_text(
        "import tensorc\n"
        "def project(x, w):\n"
        "    return x @ w\n"
        "def make():\n"
        "    return tensorc.trace(project,\n"
        "        x=tensorc.TensorSpec(('batch', 'seq', 4), 'f32'),\n"
        "        w=tensorc.TensorSpec((4, 3), 'f32'))\n")
    art = round_trip(capsys, tmp_path, f"{factory}:make", "--batch", "2", "--seq", "5")
    loaded = load_model(str(art))
    assert str(loaded.graph.inputs[0].type) == "f32[batch,seq,4]"  # stays symbolic
    assert loaded.inputs["x"].shape == (2, 5, 4)


def test_python_api_round_trip(tmp_path):
    m = load_model("bert", overrides={"n_layer": 1}, batch=2, seq=5, seed=1)
    path = str(tmp_path / "bert.tc")
    save_artifact(path, m.graph, m.inputs, {"name": m.name, "config": m.config})
    graph, inputs, meta = load_artifact(path)
    assert str(graph) == str(m.graph) and meta["source"] == "artifact"
    assert_bitwise_equal(inputs, m.inputs)
    back = load_model(path)
    assert str(back.graph) == str(m.graph)
    assert back.name == "bert" and back.config["n_layer"] == 1
    assert back.meta["source"] == "artifact"
    for name, v in m.graph.constants.items():
        assert np.array_equal(back.graph.constants[name].data, v.data), name
    assert_bitwise_equal(back.inputs, m.inputs)
    # loading with load_model finds it by content, whatever its extension
    assert str(load_model(path).graph) == str(m.graph)


def test_artifact_holds_no_pickles(capsys, tmp_path):
    ok(capsys, "compile", "gpt", "-o", tmp_path / "g.tc")
    with zipfile.ZipFile(tmp_path / "g.tc") as z:
        names = z.namelist()
        assert all(n.endswith(".npy") for n in names)
        for n in names:
            with z.open(n) as f:
                assert not np.load(io.BytesIO(f.read()), allow_pickle=False).dtype.hasobject
    assert {"__graph__.npy", "__meta__.npy", "input/input_ids.npy",
            "const/wte.weight.npy"} <= set(names)
    # small constants print inline in the text rather than travelling as arrays
    assert not any(n.startswith("const/c.") or n == "const/c.npy" for n in names)


class _Trap:
    """Unpickling this would create a file: proof that loading runs no code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _artifact_variants(tmp_path, good):
    arrays = dict(np.load(good, allow_pickle=False))
    meta = json.loads(arrays["__meta__"].tobytes())

    def text(s):
        return np.frombuffer(s.encode(), np.uint8)

    def write(name, **changes):
        path = tmp_path / name
        with open(path, "wb") as f:
            np.savez(f, **{k: v for k, v in {**arrays, **changes}.items() if v is not None})
        return path

    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(str(tmp_path / "trap-fired"))
    (tmp_path / "noise.tc").write_bytes(b"\x00\x01not an artifact")
    (tmp_path / "truncated.tc").write_bytes(good.read_bytes()[:1000])
    np.save(tmp_path / "array.npy", np.zeros(3))
    return [
        (tmp_path / "noise.tc", "is not a tensorc artifact"),
        (tmp_path / "truncated.tc", "tensorc artifact"),
        (tmp_path / "array.npy", "is not a tensorc artifact"),
        (write("weights.tc", __graph__=None, __meta__=None), "has no graph or metadata"),
        (write("format.tc", __meta__=text(json.dumps({**meta, "format": "x"}))),
         "format 'x'"),
        (write("future.tc", __meta__=text(json.dumps({**meta, "version": 99}))),
         "artifact version 99"),
        (write("garbled.tc", __graph__=text("graph g(%x: f32[2]) {\n  return %y\n}\n")),
         "%y is used before it is defined"),
        (write("lost.tc", **{"const/wte.weight": None}), "no data for constant(s) %wte.weight"),
        (write("reshaped.tc", **{"const/wte.weight": np.zeros((3, 3), np.float32)}),
         "%wte.weight is declared f32[97,32] but its data is f32[3,3]"),
        (write("noinput.tc", **{"input/input_ids": None}), "do not match the graph's inputs"),
        (write("extra.tc", **{"other/x": np.zeros(2)}), "unexpected entry 'other/x'"),
        (write("pickled.tc", **{"input/input_ids": trap}), "tensorc artifact"),
    ]


def test_bad_artifacts_are_one_line_errors(capsys, tmp_path):
    good = tmp_path / "good.tc"
    ok(capsys, "compile", "gpt", "-o", good)
    for path, message in _artifact_variants(tmp_path, good):
        with pytest.raises(TensorcError, match=None) as e:
            load_model(str(path))
        assert message in str(e.value) and str(path) in str(e.value), (path, e.value)
        rc = cli.main(["run", str(path)])
        _, err = capsys.readouterr()
        assert rc == 2 and err.startswith("tensorc: error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "trap-fired").exists()


def test_artifact_inputs_are_fixed(capsys, tmp_path):
    ok(capsys, "compile", "gpt", "-o", tmp_path / "g.tc")
    rc = cli.main(["run", str(tmp_path / "g.tc"), "--batch", "4"])
    assert rc == 2 and "inputs are fixed" in capsys.readouterr().err
    rc = cli.main(["run", str(tmp_path / "g.tc"), "--seed", "1"])
    assert rc == 2 and "--seed do not apply" in capsys.readouterr().err
    rc = cli.main(["run", str(tmp_path / "g.tc"), "--set", "n_layer=1"])
    assert rc == 2 and "built-in models only" in capsys.readouterr().err


def test_compile_records_metadata(capsys, tmp_path):
    out = ok(capsys, "compile", "gpt", "--set", "n_layer=1", "-o", tmp_path / "g.tc")
    assert out.startswith(f"wrote {tmp_path / 'g.tc'}: gpt, ")
    meta = load_artifact(str(tmp_path / "g.tc"))[2]
    assert meta["name"] == "gpt" and meta["passes"] == "O0" and meta["backend"] == "numpy"
    assert meta["overrides"] == {"n_layer": 1} and meta["config"]["n_layer"] == 1
    assert meta["preset"] == "tiny" and meta["tensorc_version"] == tensorc.__version__


def test_save_refuses_text_that_does_not_read_back(tmp_path, monkeypatch):
    import tensorc.artifact as artifact
    from tensorc.errors import ParseError

    def unreadable(text):
        raise ParseError("line 1: unexpected character '<'")
    m = load_model("gpt")
    monkeypatch.setattr(artifact, "parse_graph", unreadable)
    with pytest.raises(TensorcError, match="its IR text does not parse back"):
        save_artifact(str(tmp_path / "g.tc"), m.graph, m.inputs, {})
    assert not (tmp_path / "g.tc").exists()
