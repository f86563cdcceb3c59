"""The compiled artifact: one file with a rewritten graph and all it needs to run.

It is an ``.npz`` (a zip of ``.npy`` arrays) read with ``allow_pickle=False``, so
loading it never runs code:

- ``__graph__``: the IR text (UTF-8 bytes as a uint8 array);
- ``__meta__``: JSON metadata (model name, config, passes, backend, ...), same encoding;
- ``const/NAME``: the data of each constant too large to print inline in the text;
- ``input/NAME``: the example inputs, so ``tensorc run FILE`` reproduces the outputs.

An .npy file cannot name ml_dtypes' bfloat16 (it would be a pickled dtype or anonymous
2-byte records), so a bf16 array is stored as its uint16 bits and given its type back
from the graph's text, which declares every constant's and input's dtype.
"""

from __future__ import annotations

import json

import numpy as np

from .errors import TensorcError
from .files import output_file
from .frontend.weights import read_npz
from .ir import DTYPES, Graph, TensorType
from .text import INLINE_MAX, parse_graph

FORMAT = "tensorc-artifact"
VERSION = 1


def _text_array(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _storable(a: np.ndarray) -> np.ndarray:
    """bf16 as its bits (see the module's doc); anything else as it is."""
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == DTYPES["bf16"] else a


def _declared(a: np.ndarray, t: TensorType) -> np.ndarray:
    """A stored array as its declared type: uint16 bits of a bf16 array viewed as bf16."""
    return a.view(DTYPES["bf16"]) if t.dtype == "bf16" and a.dtype == np.uint16 else a


def save_artifact(path: str, graph: Graph, inputs: dict[str, np.ndarray], meta: dict) -> None:
    """Write `graph`, its large constants, the example `inputs` and JSON-able `meta`."""
    text = str(graph)
    try:  # a graph whose text does not read back would make an artifact nobody can load
        parse_graph(text)
    except TensorcError as e:
        raise TensorcError(f"cannot save graph {graph.name}: its IR text does not parse "
                           f"back ({e})") from None
    arrays = {"__graph__": _text_array(text),
              "__meta__": _text_array(json.dumps({"format": FORMAT, "version": VERSION,
                                                  **meta}))}
    for name, v in graph.constants.items():
        if v.data is None:
            raise TensorcError(f"constant %{name} has no data, so it cannot be saved")
        if v.data.size > INLINE_MAX:  # smaller ones print inline in the text
            arrays[f"const/{name}"] = _storable(v.data)
    for name, a in inputs.items():
        arrays[f"input/{name}"] = _storable(a)
    with output_file(path) as f:  # a file object, so numpy does not append ".npz"
        np.savez(f, **arrays)


def load_artifact(path: str) -> tuple[Graph, dict[str, np.ndarray], dict]:
    """Read an artifact written by `save_artifact` (``tensorc compile``): its graph, inputs
    and metadata (`loading.load_model` makes them a `Loaded`)."""
    arrays = read_npz(path, "a tensorc artifact")
    if "__graph__" not in arrays or "__meta__" not in arrays:
        raise TensorcError(f"{path} is not a tensorc artifact (it has no graph or metadata)")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
        text = arrays.pop("__graph__").tobytes().decode("utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorcError(f"{path}: unreadable artifact metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TensorcError(f"{path} is not a tensorc artifact (format {meta.get('format')!r})"
                           if isinstance(meta, dict) else f"{path}: bad artifact metadata")
    wrong = [k for k in ("name", "model", "preset", "passes", "backend")
             if meta.get(k) is not None and not isinstance(meta[k], str)]
    wrong += [k for k in ("config", "overrides") if not isinstance(meta.get(k), dict | None)]
    if wrong:
        raise TensorcError(f"{path}: bad artifact metadata: {wrong[0]!r} is a "
                           f"{type(meta[wrong[0]]).__name__}")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise TensorcError(f"{path} is artifact version {meta.get('version')}; this tensorc "
                           f"reads versions up to {VERSION}")
    try:
        graph = parse_graph(text)
    except TensorcError as e:
        raise type(e)(f"{path}: {e}") from None

    inputs = {}
    declared = {v.name: v.type for v in graph.inputs}
    for key, a in arrays.items():
        kind, _, name = key.partition("/")
        if kind == "input":
            inputs[name] = _declared(a, declared[name]) if name in declared else a
        elif kind == "const" and name in graph.constants:
            v = graph.constants[name]
            a = _declared(a, v.type)
            if TensorType.of(a) != v.type:
                raise TensorcError(f"{path}: constant %{name} is declared {v.type} but its "
                                   f"data is {TensorType.of(a)}")
            v.data = a
        else:
            raise TensorcError(f"{path}: unexpected entry {key!r}")
    missing = [n for n, v in graph.constants.items() if v.data is None]
    if missing:
        raise TensorcError(f"{path}: no data for constant(s) "
                           + ", ".join("%" + n for n in missing[:5]))
    want = [v.name for v in graph.inputs]
    if sorted(inputs) != sorted(want):
        raise TensorcError(f"{path}: stored inputs {sorted(inputs)} do not match the graph's "
                           f"inputs {want}")
    try:
        graph.verify()
    except TensorcError as e:
        raise type(e)(f"{path}: {e}") from None
    return graph, {n: inputs[n] for n in want}, {**meta, "source": "artifact", "path": path}
