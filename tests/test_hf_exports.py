"""Real exporter output: tiny random Hugging Face GPT-2, BERT and ViT, each exported by
both PyTorch ONNX exporters (TorchScript and dynamo), with eager and SDPA attention, and
Llama (grouped-query attention, rotary positions) by the dynamo exporter.

The files, their example inputs and ONNX Runtime's outputs are in tests/data/hf/ (made by
tools/make_hf_exports.py; this test needs no torch). Each export must import, match ONNX
Runtime on every backend before and after O2, run at a second batch and sequence length,
and have every layer's attention fused by O2.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest

from tensorc.backends import available_backends, get_backend
from tensorc.frontend import onnx as tx
from tensorc.ir import Graph
from tensorc.passes import explain, run_pipeline

DATA = Path(__file__).parent / "data" / "hf"
EXPORTS = sorted(p.stem for p in DATA.glob("*.onnx"))
LAYERS = 2   # every model tools/make_hf_exports.py builds
RTOL = 1e-4
BACKENDS = ["numpy"] + [b for b in ("llvm",) if b in available_backends()]

# What does not work yet, by stage: {(stage, export-name part, backend or None): (the
# error it raises, why)}. Strict: once fixed, the test says so (XPASS fails) and the entry
# must go.
KNOWN: dict[tuple[str, str, str | None], tuple[type[Exception], str]] = {}


def _cases(stage: str, backends=(None,)):
    params = []
    for stem in EXPORTS:
        for b in backends:
            why = [r for (s, part, kb), r in KNOWN.items()
                   if s == stage and part in stem and kb in (None, b)]
            marks = [pytest.mark.xfail(strict=True, raises=why[0][0], reason=why[0][1])] \
                if why else []
            params.append(pytest.param(stem, *(() if b is None else (b,)), marks=marks,
                                       id=stem if b is None else f"{stem}-{b}"))
    return params


@functools.cache
def _graph(stem: str) -> Graph:
    return tx.load(DATA / f"{stem}.onnx")


@functools.cache
def _optimized(stem: str) -> Graph:
    return run_pipeline(_graph(stem), "O2", verify=True)


def _feeds(stem: str, prefix: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{stem}.npz") as d:
        return {k.removeprefix(prefix): d[k] for k in d.files if k.startswith(prefix)}


def _run(graph: Graph, backend: str, feeds: dict) -> np.ndarray:
    return get_backend(backend).compile(graph)(**feeds)


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, \
        (got.shape, want.shape, got.dtype, want.dtype)
    err = float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL}"


def _op_count(graph: Graph, op: str) -> int:
    """How many `op` nodes, inside fused regions' bodies too."""
    return sum((n.op == op) + sum(_op_count(a, op) for a in n.attrs.values()
                                  if isinstance(a, Graph)) for n in graph.nodes)


def test_all_exports_are_there():
    stems = {f"{m}_{a}_{e}" for m in ("gpt2", "bert", "vit") for a in ("sdpa", "eager")
             for e in ("legacy", "dynamo")}
    stems |= {"bert-no-types_eager_legacy", "bert-no-types_eager_dynamo"}
    stems |= {"llama_sdpa_dynamo", "llama_eager_dynamo"}   # TorchScript cannot export it
    assert set(EXPORTS) == stems
    assert all((DATA / f"{s}.npz").is_file() for s in stems)


@pytest.mark.parametrize("pipeline", ["O0", "O2"])
@pytest.mark.parametrize(("stem", "backend"), _cases("run", BACKENDS))
def test_matches_onnxruntime(stem, backend, pipeline):
    graph = _graph(stem) if pipeline == "O0" else _optimized(stem)
    want = _feeds(stem, "out:")["logits"]
    _assert_close(_run(graph, backend, _feeds(stem, "in:")), want)


@pytest.mark.parametrize(("stem", "backend"), _cases("reshape", BACKENDS))
def test_second_shape_matches_live_onnxruntime(stem, backend):
    try:
        import onnxruntime as ort
    except ImportError as e:
        pytest.skip(f"onnxruntime is not importable ({e}): cannot check a second shape")
    # Every export was made with a dynamic batch (and sequence) axis: import keeps them.
    declared = [d.dim_param for i in onnx.load(DATA / f"{stem}.onnx").graph.input
                for d in i.type.tensor_type.shape.dim if d.dim_param]
    assert declared and all(any(isinstance(d, str) for d in v.type.shape)
                            for v in _graph(stem).inputs)
    feeds = _feeds(stem, "in2:")
    sess = ort.InferenceSession(str(DATA / f"{stem}.onnx"), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, feeds)
    _assert_close(_run(_optimized(stem), backend, feeds), want)


@pytest.mark.parametrize("stem", _cases("fuse"))
def test_o2_fuses_every_attention(stem):
    graph = _optimized(stem)
    found = (_op_count(graph, "attention"), _op_count(graph, "softmax"))
    assert found == (LAYERS, 0), \
        f"{found[0]} attention ops and {found[1]} softmaxes left after O2; expected " \
        f"{LAYERS} and 0. explain:\n" + "\n".join(explain(graph))


@pytest.mark.parametrize("stem", [s for s in EXPORTS if s.startswith("llama")])
def test_llama_attention_reads_the_kv_heads_unrepeated(stem):
    """Llama's 4 query heads share 2 key/value heads: fusion sees through repeat_kv
    (and, for sdpa, the dynamo exporter's 3-d transpose of it) and the op reads the 2."""
    graph = _optimized(stem)
    kv_heads = [n.inputs[1].type.shape[1] for n in graph.nodes if n.op == "attention"]
    assert kv_heads == [2] * LAYERS
    assert not [n for n in graph.nodes if n.op == "expand" and n.outputs[0].type.rank == 5]


@pytest.mark.parametrize("stem", [s for s in EXPORTS if s.startswith(("gpt2", "llama"))])
def test_decoders_merged_masks_fuse_as_causal_with_a_key_mask(stem):
    """Hugging Face ANDs the causal triangle (key position <= query position, one range
    along each axis) into the padding mask: fusion splits it back, so the op is causal
    (the kernels skip the tiles above the diagonal) with a [batch, 1, 1, keys] mask."""
    nodes = [n for n in _optimized(stem).nodes if n.op == "attention"]
    assert [n.attrs["causal"] for n in nodes] == [True] * LAYERS
    assert all(n.inputs[3].type.shape[-2] == 1 for n in nodes)


@pytest.mark.parametrize("stem", EXPORTS)
def test_inspect_sizes_every_export_after_o2(stem, capsys):
    """`inspect --format json` counts FLOPs and plans memory after O2, also where a fused
    region only sees `batch*seq` (GPT-2's flattened rows): its work is the product's."""
    import json

    from tensorc.cli import main
    sizes = ["--batch", "2"] + ([] if stem.startswith("vit") else ["--seq", "8"])
    assert main(["inspect", str(DATA / f"{stem}.onnx"), "--passes", "O2", "--format", "json",
                 "--backend", "llvm", *sizes]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["flops"] > 0 and info["peak_memory_bytes"] > 0
