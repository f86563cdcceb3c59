"""Quantization: matmuls by weights computed in 8-bit integers (the `quantize` pass).

`quantize:mode=dynamic|static|qdq:weights=per_channel|per_tensor:activations=u8|s8:
act_scale=row|tensor:calib=minmax|percentile|entropy:skip=NAME+NAME:head=0|1:
embeddings=1|0:sensitive=N:data=FILE`

Every matmul `x @ W` by a constant 2-D f32 weight becomes, with W quantized ahead of
time to i8 (symmetric, a scale per output column or one per tensor):

    dynamic  s, z = quant_params(x)        # per row (act_scale=row) or per tensor
             acc: i32 = matmul_integer(quantize(x, s, z), Wq, z)
             y = cast(acc, f32) * s * ws   # the dequantize epilogue
    static   the same with s, z constants from a calibration run over `data`
             (minmax, percentile or entropy: `calibrate`)
    qdq      y = fake_quantize(x, s, z) @ fake_quantize(W, ws, 0): the same rounding
             simulated in f32 (fp32 vs fake-quant vs int8 compare three ways; a weight
             that is a graph input, as in training, gets its scale computed in the graph:
             quantization-aware training differentiates through this form)

Layer norm, softmax and attention stay float; so does the logits head (a matmul whose
result, through a bias, reshape or cast, is a graph output) unless `head=1`. An
embedding table that only lookups read in float then (a tied one once the head is
quantized too: the head reads the same int8 table) becomes int8 with a scale per row
(`embeddings=0` keeps it). `sensitive=N` leaves in float the N matmuls whose
quantization alone changes the outputs most on the calibration data. `skip` names
matmuls to leave in float by a part of their weight's or result's name. A graph at O2
has its regions opened first and fused again after (`fuse-epilogues` makes the integer
matmul and its dequantize + bias + activation + residual one region: on llvm one GEMM).
"""

from __future__ import annotations

import numpy as np

from tensorc.errors import InputError, TensorcError
from tensorc.ir import Graph, Value
from tensorc.ops import get_op
from tensorc.ops.quant import QUANT_RANGE, dequantize_ref, quantize_ref, scale_role
from tensorc.types import bind_shapes

from .rewrite import copy_graph, dce, graph_pass, inline_regions, replace_keeping_name

MODES = ("dynamic", "static", "qdq")
CALIBRATORS = ("minmax", "percentile", "entropy")
_HEAD_CHAIN = ("add", "reshape", "cast", "transpose")
_ACT_DTYPE = {"u8": "u8", "s8": "i8"}


def _choice(name: str, value, choices) -> str:
    if isinstance(value, (list, dict)) or value not in choices:
        raise TensorcError(f"quantize: {name}={value!r} should be one of "
                           f"{', '.join(map(str, choices))}")
    return value


def _weight(node, inputs_ok: bool):
    """W when `node` is x @ W by a 2-D f32 constant (or graph input, for training), or by
    the transpose of one (a tied embedding's logits head)."""
    if node.op != "matmul":
        return None
    x, w = node.inputs
    ok = w.type.rank == 2 and x.type.rank >= 2 and w.type.dtype == "f32" == x.type.dtype \
        and (w.is_constant or (inputs_ok and w.producer is None) or _transposed(w) is not None)
    return w if ok else None


def _transposed(w: Value):
    """The constant whose transpose `w` is, or None."""
    n = w.producer
    return n.inputs[0] if n is not None and n.op == "transpose" and n.inputs[0].is_constant \
        else None


def _data(w: Value) -> np.ndarray:
    return w.data if w.is_constant else np.ascontiguousarray(_transposed(w).data.T)


def weight_name(w: Value) -> str:
    t = _transposed(w)
    return w.name if t is None else t.name + ".T"


def heads(g: Graph) -> set:
    """The matmuls whose result, through bias adds, reshapes and casts only, is an output."""
    found = set()
    for v in g.outputs:
        n = v.producer
        while n is not None and n.op in _HEAD_CHAIN:
            n = next((x.producer for x in n.inputs if x.producer is not None), None)
        if n is not None and n.op == "matmul":
            found.add(n)
    return found


def weight_qparams(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(i8 weight, f32 scale) of a [K, N] weight: symmetric, max|w| / 127 per column
    (shape [N]) or for all (shape [])."""
    amax = np.max(np.abs(w), axis=0) if per_channel else np.max(np.abs(w))
    scale = np.asarray(amax / np.float32(127), np.float32)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    return quantize_ref(w, scale, np.zeros(scale.shape, np.int8)), scale


@graph_pass("quantize")
def quantize(g: Graph, mode: str = "dynamic", weights: str = "per_channel",
             activations: str = "u8", act_scale: str = "row", calib: str = "minmax",
             skip: str = "", head: bool = False, embeddings: bool = True, sensitive: int = 0,
             data=None, percentile: float = 99.99):
    _choice("mode", mode, MODES)
    _choice("weights", weights, ("per_channel", "per_tensor"))
    _choice("activations", activations, tuple(_ACT_DTYPE))
    _choice("act_scale", act_scale, ("row", "tensor"))
    _choice("calib", calib, CALIBRATORS)
    for name, value in (("head", head), ("embeddings", embeddings)):
        _choice(name, value, (True, False, 0, 1))
    if not isinstance(sensitive, int) or isinstance(sensitive, bool) or sensitive < 0:
        raise TensorcError(f"quantize: sensitive={sensitive!r} should be a count of matmuls")
    if not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
        raise TensorcError(f"quantize: percentile={percentile!r} should be in (50, 100]")
    regions = any(n.op == "fused" for n in g.nodes)
    if regions:
        g = inline_regions(g)
    skips = [s for s in str(skip or "").split("+") if s]
    no = set() if head else heads(g)
    targets = [n for n in g.nodes if _weight(n, mode == "qdq") is not None and n not in no
               and not any(s in weight_name(n.inputs[1]) or s in n.outputs[0].name
                           for s in skips)]
    for need, what in ((mode == "static", "mode=static"), (sensitive > 0, "sensitive=N")):
        if need and data is None:
            raise TensorcError(f"quantize:{what} needs calibration data: --calib "
                               "FILE.npz (inputs by name), or data= in the Python API")
    adt = _ACT_DTYPE[activations]
    per_channel, axes = weights == "per_channel", None if act_scale == "tensor" else (-1,)
    if sensitive > 0:
        targets = least_sensitive(g, targets, data, int(sensitive), lambda trial, node: _rewrite(
            trial, node, "qdq", per_channel, adt, axes, None))
    ranges = {}
    if mode == "static":
        ranges = calibrate(g, [n.inputs[0] for n in targets], data, calib, percentile)
    for node in targets:
        _rewrite(g, node, mode, per_channel, adt, axes, ranges.get(node.inputs[0]))
    dce(g)
    if embeddings and mode != "qdq":
        quantize_tables(g)
        dce(g)
    if regions:
        from .fusion import fuse_regions
        from .gemm import fuse_epilogues
        g = fuse_regions(fuse_epilogues(g))
    return g


def least_sensitive(g: Graph, targets: list, data, keep: int, fake_quantize) -> list:
    """`targets` less the `keep` matmuls whose quantization alone (`fake_quantize(graph,
    node)`: the qdq form) moves the graph's outputs most on the first calibration batch:
    mixed precision for the layers a model is most sensitive in."""
    feed = load_feeds(data)[0]
    outs = [v for v in g.outputs if v.type.dtype == "f32"]
    ref = run_collect(g, feed, set(outs))
    errors = []
    for i, node in enumerate(g.nodes):
        if node not in targets:
            continue
        trial = copy_graph(g)
        fake_quantize(trial, trial.nodes[i])
        got = run_collect(trial, feed, set(trial.outputs))
        err = sum(float(np.sqrt(np.mean((got[t] - ref[v]) ** 2) / np.mean(ref[v] ** 2)))
                  for v, t in zip(g.outputs, trial.outputs, strict=True) if v in outs)
        errors.append((err, node))
    worst = {n for _, n in sorted(errors, key=lambda e: -e[0])[:keep]}
    return [n for n in targets if n not in worst]


def _rewrite(g: Graph, node, mode: str, per_channel: bool, adt: str, axes, lohi) -> None:
    """Replace `node` (x @ W) by its quantized form, built at the end of the graph and
    moved in front of it."""
    x, w = node.inputs
    start = len(g.nodes)
    name = weight_name(w)
    given = _dequantized(x) if mode != "qdq" else None
    if given is not None:   # x is already integers (an imported QDQ file): keep them
        xq, s, z = given
    elif lohi is None:
        s, z = g.add_node("quant_params", [x], {"dtype": adt, "axes": axes})
    else:
        s, z = (g.add_constant(g.fresh_name(f"{name}.in_{k}"), a)
                for k, a in zip(("scale", "zero"), static_qparams(*lohi, adt), strict=True))
    if mode == "qdq":
        xq = g.add("fake_quantize", x, s, z)
        if w.is_constant or _transposed(w) is not None:
            wq, ws = weight_qparams(_data(w), per_channel)
            wf = g.add_constant(g.fresh_name(name + ".qdq"),
                                dequantize_ref(wq, ws, np.zeros(ws.shape, np.int8)))
        else:   # a weight the graph gets as input (training): its scale computed here
            wsv, wz = g.add_node("quant_params", [w], {
                "dtype": "i8", "axes": (0,) if per_channel else None})
            wf = g.add("fake_quantize", w, wsv, wz)
        y = g.add("matmul", xq, wf)
    else:
        wqv, wsv = _int8_weight(g, w, per_channel)
        if given is None:
            xq = g.add("quantize", x, s, z)
        zps = [] if adt == "i8" and given is None else [z]   # symmetric i8: zero point 0
        acc = g.add("matmul_integer", xq, wqv, *zps)
        y = g.add("mul", g.add("mul", g.add("cast", acc, dtype="f32"), s), wsv)
    new = g.nodes[start:]
    del g.nodes[start:]
    at = g.nodes.index(node)
    g.nodes[at:at] = new
    replace_keeping_name(g, node.outputs[0], y)


def _int8_weight(g: Graph, w: Value, per_channel: bool) -> tuple[Value, Value]:
    """The i8 weight (a constant, or the transpose of one: then the table the embedding
    gather reads too, quantized per row, so one int8 copy serves both) and its scale."""
    table = _transposed(w)
    if table is None:
        wq, ws = weight_qparams(w.data, per_channel)
        return (g.add_constant(g.fresh_name(w.name + ".q"), wq),
                g.add_constant(g.fresh_name(w.name + ".scale"), ws))
    q, scale = int8_table(g, table, per_channel)
    return g.add("transpose", q, perm=(1, 0)), scale


def int8_table(g: Graph, table: Value, per_row: bool = True) -> tuple[Value, Value]:
    """A [V, D] constant as i8 with a scale per row ([V]; or one, rank 0), made once."""
    key = table.name + (".q" if per_row else ".qt")
    if key not in g.constants:
        wq, ws = weight_qparams(np.ascontiguousarray(table.data.T), per_row)
        g.add_constant(key, np.ascontiguousarray(wq.T))
        g.add_constant(key + ".scale", ws)
    return g.constants[key], g.constants[key + ".scale"]


def quantize_tables(g: Graph) -> None:
    """Embedding lookups `gather(T, ids)` from a constant f32 table that nothing else
    reads in float read an i8 table instead, each row times its scale: the f32 table
    goes, so the whole model is about 4x smaller."""
    users = g.users()
    for table in list(g.constants.values()):
        readers = users.get(table, [])
        if table.type.dtype != "f32" or table.type.rank != 2 or not readers or any(
                n.op != "gather" or n.inputs[0] is not table or n.attrs["axis"] != 0
                for n in readers):
            continue
        q, scale = int8_table(g, table)
        col = g.add_constant(g.fresh_name(scale.name + ".col"),
                             scale.data.reshape(table.type.shape[0], 1))
        for n in readers:
            start = len(g.nodes)
            ids = n.inputs[1]
            y = g.add("mul", g.add("cast", g.add("gather", q, ids, axis=0), dtype="f32"),
                      g.add("gather", col, ids, axis=0))
            new = g.nodes[start:]
            del g.nodes[start:]
            at = g.nodes.index(n)
            g.nodes[at:at] = new
            replace_keeping_name(g, n.outputs[0], y)


def _dequantized(x: Value):
    """(q, scale, zero point) when x = dequantize(q, ...) of 8-bit q by one scale per
    tensor or per row, which the integer matmul's dequantize can take; else None."""
    n = x.producer
    if n is None or n.op != "dequantize" or n.inputs[0].type.dtype not in QUANT_RANGE:
        return None
    q, scale, zp = n.inputs
    return (q, scale, zp) if scale_role(scale.type, x.type) in ("tensor", "row") else None


def static_qparams(lo: float, hi: float, adt: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (rank 0) for a calibrated range, as quant_params makes them."""
    probe = np.array([min(lo, 0.0), max(hi, 0.0)], np.float32)
    if adt == "i8":
        probe = np.array([-max(abs(lo), abs(hi)), max(abs(lo), abs(hi))], np.float32)
    scale, zp = get_op("quant_params").evaluate([probe], {"dtype": adt, "axes": None})
    return scale.reshape(()), zp.reshape(())


# --- calibration ---------------------------------------------------------------------

def load_feeds(data) -> list[dict]:
    """Calibration batches: a list of {input name: array}, or an .npz path (one batch)."""
    if isinstance(data, (list, tuple)):
        return [dict(d) for d in data]
    if isinstance(data, dict):
        return [data]
    try:
        with np.load(str(data), allow_pickle=False) as f:
            return [{k: f[k] for k in f.files}]
    except (OSError, ValueError) as e:
        raise TensorcError(f"cannot read calibration data {data}: {e}") from None


def run_collect(g: Graph, feed: dict, wanted: set) -> dict:
    """Run `g` on `feed` through the reference implementations; the arrays of `wanted`."""
    missing = [v.name for v in g.inputs if v.name not in feed]
    if missing:
        raise TensorcError(f"calibration data lacks input(s) {missing} (has {sorted(feed)})")
    arrays = [np.asarray(feed[v.name]) for v in g.inputs]
    try:
        env = bind_shapes([v.type for v in g.inputs], arrays, [v.name for v in g.inputs])
    except InputError as e:
        raise InputError(f"calibration data: {e}") from None
    vals = {v: v.data for v in g.constants.values()}
    vals.update(zip(g.inputs, arrays, strict=True))
    got = {v: vals[v] for v in wanted if v in vals}
    for node in g.nodes:
        outs = get_op(node.op).evaluate([vals[v] for v in node.inputs], node.attrs, env)
        vals.update(zip(node.outputs, outs, strict=True))
        got.update((v, a) for v, a in zip(node.outputs, outs, strict=True) if v in wanted)
    return got


_SAMPLE = 1 << 20   # values kept per tensor for the percentile and entropy calibrators


def calibrate(g: Graph, values: list[Value], data, method: str = "minmax",
              percentile: float = 99.99) -> dict:
    """{value: (lo, hi)}: the range each value is quantized over, from running `g` on the
    calibration batches. minmax: the observed range; percentile: the central
    `percentile` % of values; entropy: the clipping threshold whose 128-level histogram
    loses least information (KL divergence, as TensorRT's calibrator)."""
    wanted = set(values)
    seen: dict = {v: [] for v in wanted}
    for feed in load_feeds(data):
        for v, a in run_collect(g, feed, wanted).items():
            seen[v].append(np.asarray(a, np.float32).ravel())
    rng = np.random.default_rng(0)
    out = {}
    for v, parts in seen.items():
        x = np.concatenate(parts) if parts else np.zeros(1, np.float32)
        if method == "minmax":
            out[v] = (float(x.min()), float(x.max()))
            continue
        if x.size > _SAMPLE:
            x = rng.choice(x, _SAMPLE, replace=False)
        if method == "percentile":
            out[v] = (float(np.percentile(x, 100 - percentile)),
                      float(np.percentile(x, percentile)))
        else:
            t = entropy_threshold(np.abs(x))
            out[v] = (max(float(x.min()), -t), min(float(x.max()), t))
    return out


def entropy_threshold(a: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """The |x| threshold minimising KL(P || Q), P the histogram clipped at the threshold
    (outliers folded into its last bin), Q that histogram merged into `levels` bins and
    spread back over the non-empty ones."""
    top = float(a.max())
    if top == 0:
        return 1.0
    hist, edges = np.histogram(a, bins=bins, range=(0, top))
    hist = hist.astype(np.float64)
    best, best_kl = bins, np.inf
    for i in range(levels, bins + 1, 16):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for chunk in np.array_split(np.arange(i), levels):
            src = hist[chunk]
            nz = src > 0
            if nz.any():
                q[chunk[nz]] = src.sum() / nz.sum()
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-30)
        m = ps > 0
        kl = np.inf if np.any(qs[m] == 0) else float(np.sum(ps[m] * np.log(ps[m] / qs[m])))
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])
