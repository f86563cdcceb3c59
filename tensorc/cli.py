"""The `tensorc` command line: models, inspect, run, compare, compile, export.

User errors print one line, ``tensorc: error: ...``, and exit 2 (``--debug`` shows the
traceback). Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

import numpy as np

from .cli_args import (
    _Parser,
    _positive_int,
    _seed,
    _table,
    add_mesh_arguments,
    parse_dims,
    parse_overrides,
    start_mesh,
)
from .cli_train import add_commands
from .errors import FallbackError, InputError, TensorcError
from .files import output_file
from .frontend.weights import read_npz

MODEL_HELP = """\
MODEL is one of:
  a built-in name        gpt, bert, transformer, vit, llama (see `tensorc models`)
  FILE.py:FACTORY        a function returning a Module with example_inputs(), or a Graph
  FILE.onnx              an ONNX model
  FILE                   an artifact written by `tensorc compile`
  DIR                    a checkpoint written by `tensorc train` (the model, trained weights)
"""


# --- shared steps ---------------------------------------------------------------------

def _load(args, inputs=None, symbolic=False):
    from .loading import load_model
    return load_model(args.model, preset=args.preset, overrides=parse_overrides(args.set),
                      batch=args.batch, seq=args.seq, seed=args.seed, inputs=inputs,
                      dims=parse_dims(getattr(args, "dim", [])), symbolic=symbolic)


def _pipeline(args, graph, after=None, loaded=None):
    """Run `--passes` with the pass-manager flags; diagnostics go to stderr. Static
    quantization calibrates on `--calib` or, without it, on the example inputs."""
    from tensorc.passes import PASSES, run_pipeline
    for name in args.disable + args.print_after:
        if name not in PASSES and name != "all":
            raise TensorcError(f"unknown pass {name!r} (known: {', '.join(sorted(PASSES))})")
    times = []

    def after_pass(name, g, seconds):
        times.append((name, seconds))
        if name in args.print_after or "all" in args.print_after:
            print(f"// IR after {name}\n{g}", file=sys.stderr, end="")
        if after:
            after(name, g, seconds)

    options = {}
    for name in ("quantize", "prune"):   # the passes that read calibration data
        if name in (args.passes or "") and (args.calib or loaded is not None):
            options[name] = {"data": args.calib or [loaded.inputs]}
    graph = run_pipeline(graph, args.passes, verify=args.verify_each,
                         disable=set(args.disable), after=after_pass, options=options)
    if args.time_passes:
        for name, s in times:
            print(f"{s * 1e3:10.3f} ms  {name}", file=sys.stderr)
        print(f"{sum(s for _, s in times) * 1e3:10.3f} ms  total ({len(times)} passes)",
              file=sys.stderr)
    return graph


def _emit(text: str, path: str | None) -> None:
    if path:
        with output_file(path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


# --- models ---------------------------------------------------------------------------

def cmd_models(args) -> int:
    from tensorc.models import MODELS, config
    fields = ["vocab_size", "d_model", "n_layer", "n_head", "d_ff", "max_seq_len"]
    listing = {}
    for name, (cls, presets) in MODELS.items():
        for preset in presets:
            cfg = config(name, preset)
            params = cls(cfg).num_parameters()  # shapes only: no weights are drawn
            listing.setdefault(name, {})[preset] = {**{f: getattr(cfg, f) for f in fields},
                                                    "params": params}
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    rows = [["model", "preset", *fields, "params"]]
    for name, presets in listing.items():
        for preset, info in presets.items():
            rows.append([name, preset, *(str(info[f]) for f in fields),
                         _fmt_count(info["params"])])
    sys.stdout.write(_table(rows))
    print("\nchange a field with --set key=value, e.g. `tensorc inspect gpt --preset small "
          "--set n_layer=3`")
    return 0


# --- inspect --------------------------------------------------------------------------

def graph_summary(graph, env: dict[str, int], config=None, backend: str = "numpy") -> dict:
    """What `inspect --format json` reports; flops and memory at the symbol sizes `env`,
    peak memory is what `backend` plans."""
    from tensorc.backends import get_backend
    from tensorc.ops import get_op
    ops = dict(sorted(graph.op_counts().items(), key=lambda kv: (-kv[1], kv[0])))
    return {
        "name": graph.name,
        "ops": ops,
        "nodes": len(graph.nodes),
        "params": graph.param_count(),
        "weight_bytes": graph.weight_bytes(),
        "flops": sum(get_op(n.op).count_flops(n, env) for n in graph.nodes),
        "peak_memory_bytes": get_backend(backend).planned_memory_bytes(graph, env),
        "backend": backend,
        "bindings": env,
        "inputs": [{"name": v.name, "type": str(v.type)} for v in graph.inputs],
        "outputs": [{"name": v.name, "type": str(v.type)} for v in graph.outputs],
        "config": config,
    }


def to_dot(graph) -> str:
    """Graphviz DOT of the dataflow graph: op boxes, input and constant ellipses."""
    def q(s) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def label(*parts) -> str:
        return q("\n".join(parts)).replace("\n", "\\n")

    g = graph.to_networkx()
    ids = {k: f"n{k}" if isinstance(k, int) else q("%" + k) for k in g.nodes}
    lines = [f"digraph {q(graph.name)} {{", "  node [shape=box, fontname=monospace];"]
    for k, d in g.nodes(data=True):
        if d["kind"] == "op":
            outs = ", ".join("%" + n for n in d["outputs"])
            lines.append(f"  {ids[k]} [label={label(d['op'], outs)}];")
        else:
            shape = "ellipse" if d["kind"] == "input" else "note"
            lines.append(f"  {ids[k]} [label={label('%' + k, d['type'])}, shape={shape}];")
    for u, v, d in g.edges(data=True):
        lines.append(f"  {ids[u]} -> {ids[v]} [label={q(d['type'])}];")
    lines.append('  "return" [shape=doubleoctagon];')
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    for v in graph.outputs:
        src = ids[index[id(v.producer)]] if v.producer is not None else q("%" + v.name)
        lines.append(f'  {src} -> "return" [label={q("%" + v.name)}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _train_step_graph(args):
    """`inspect --train TASK`: the training step (loss and every weight's gradient) of a
    built-in model, with the weights as inputs; its memory figure includes what the
    backward keeps of the forward."""
    from tensorc.models import MODELS, get
    from tensorc.training import example_batch, get_task, step_graph
    if args.model not in MODELS:
        raise TensorcError(f"--train takes a built-in model ({', '.join(MODELS)})")
    model = get(args.model, args.preset or "tiny", seed=args.seed or 0,
                **parse_overrides(args.set))
    batch = example_batch(model, args.train, args.batch or 1, args.seq)
    graph, names = step_graph(model, get_task(args.train), batch, passes=args.passes or "O2",
                              recompute=args.recompute)
    return graph, dataclasses.asdict(model.config), sum(p.data.size
                                                         for _, p in model.named_parameters())


def cmd_inspect(args) -> int:
    from tensorc.passes import explain
    if args.train:
        graph, config, params = _train_step_graph(args)
        env, loaded = {}, None
    elif args.mesh:
        return _inspect_mesh(args)
    else:
        loaded = _load(args)
        graph = _pipeline(args, loaded.graph, loaded=loaded)
        env, config, params = loaded.symbol_sizes(), loaded.config, None
    if args.importance:
        return _importance(args, graph, loaded)
    notes = explain(graph) if args.explain else []
    if args.format == "json":
        info = graph_summary(graph, env, config, args.backend)
        if params is not None:
            info["params"] = params   # the weights are the step's inputs
        info["passes"] = args.passes
        if args.explain:
            info["explain"] = notes
        _emit(json.dumps(info, indent=2) + "\n", args.output)
    else:
        _emit(str(graph) if args.format == "text" else to_dot(graph), args.output)
        if args.explain:  # remarks go beside the output, like a compiler's diagnostics
            print("\n".join(notes) if notes else "nothing to explain", file=sys.stderr)
    return 0


def _inspect_mesh(args) -> int:
    """inspect --mesh: per rank params, memory and collectives (tensorc.parallel.report).
    Its pipeline is the shard pass's own: O1, attention fused, shard, then O2-local."""
    from .mesh import Mesh
    from .parallel.report import format_report, mesh_report
    loaded = _load(args)
    rep = mesh_report(loaded.graph, Mesh.parse(args.mesh), loaded.symbol_sizes(), args.backend)
    _emit(json.dumps(rep, indent=2) + "\n" if args.format == "json"
          else format_report(rep, loaded.name), args.output)
    return 0


# --- run ------------------------------------------------------------------------------

def _run_checked(exe, feeds, source: str | None):
    try:
        return exe.run(feeds)
    except InputError as e:
        raise InputError(f"{source}: {e}" if source else str(e)) from None


def describe_array(name: str, a: np.ndarray) -> str:
    from .ir import TensorType
    try:
        head = f"{name}: {TensorType.of(a)}"
    except TensorcError:
        head = f"{name}: {a.dtype}{list(a.shape)}"
    if a.size == 0:
        return head + "  (empty)"
    x = a.astype(np.float64)
    finite = np.isfinite(x)
    stats = f"  min {x.min():.6g}  max {x.max():.6g}  mean {x.mean():.6g}  std {x.std():.6g}"
    if not finite.all():
        stats += f"  non-finite {int((~finite).sum())}"
    return head + stats


def _importance(args, graph, loaded) -> int:
    """inspect --importance BY: heads', neurons' and layers' importance (on --calib
    inputs, else the example inputs), as text or JSON, and a heat map with --heatmap."""
    from tensorc import pruning
    from tensorc.passes.prune import importance
    from tensorc.passes.quantize import load_feeds
    data = load_feeds(args.calib) if args.calib else [loaded.inputs]
    scores = importance(graph, args.importance, data)
    if args.heatmap:
        pruning.importance_heatmap(scores, args.heatmap,
                                   f"{loaded.name}: head importance ({args.importance})")
    if args.format == "json":
        _emit(json.dumps({k: [np.asarray(x).tolist() for x in v] if k != "layers"
                          else np.asarray(v).tolist() for k, v in scores.items()}) + "\n",
              args.output)
    else:
        _emit(pruning.importance_table(scores), args.output)
    return 0


def cmd_run(args) -> int:
    from tensorc.backends import get_backend
    if args.mesh:
        return _run_mesh(args)
    given = read_npz(args.input, "an .npz file of inputs") if args.input else None
    try:  # a model is traced at the shapes of the given inputs
        loaded = _load(args, given)
    except InputError as e:
        raise InputError(f"{args.input}: {e}" if args.input else str(e)) from None
    graph = _pipeline(args, loaded.graph, loaded=loaded)
    backend = args.backend or loaded.meta.get("backend") or "numpy"
    exe = get_backend(backend).compile(graph)
    _show_outputs(_run_checked(exe, loaded.inputs, args.input), args.output)
    return 0


def _show_outputs(outs: dict, path: str | None) -> None:
    if path:
        with output_file(path) as f:  # a file object, so numpy adds no ".npz"
            np.savez(f, **outs)
        print(f"wrote {len(outs)} output(s) to {path}")
    else:
        for name, a in outs.items():
            print(describe_array(name, a))


def _run_mesh(args) -> int:
    """run --mesh: every rank (an MPI process, or a thread with --mesh-threads) runs its
    pipeline stage's tensor-parallel shard on its data-parallel rows; rank 0 prints."""
    from .mesh import Mesh
    from .parallel import launch
    from .parallel.run import check, run_rank
    from .parallel.schedule import timeline_png, timeline_text
    given = read_npz(args.input, "an .npz file of inputs") if args.input else None
    loaded = _load(args, given, symbolic=given is None)
    stages = check(loaded.graph, loaded.inputs, Mesh.parse(args.mesh), args.micro_batches,
                   args.passes)
    mesh, code = start_mesh(args)   # checked first: a bad mesh is one error, not one per rank
    if code is not None:
        return code
    backend = args.backend or loaded.meta.get("backend") or "numpy"
    results = launch.run_ranks(mesh, lambda groups: run_rank(
        stages, loaded.inputs, groups, mesh, backend, args.passes, args.micro_batches,
        args.schedule))
    if 0 not in results:   # under mpiexec: rank 0's process prints
        return 0
    mine = results[0]
    how = "MPI processes" if launch.under_mpiexec() else "threads"
    print(f"mesh {mesh}: {mesh.size} ranks ({how}), {args.micro_batches} micro-batch(es)")
    if mine.timeline is not None:
        print(timeline_text(mine.timeline))
        if args.timeline:
            timeline_png(mine.timeline, args.timeline, f"{loaded.name} on {mesh}")
    _show_outputs(mine.outputs, args.output)
    return 0


# --- generate -------------------------------------------------------------------------

def _id_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}"
                                         ) from None


def _decoder(args):
    """The built-in decoder model MODEL names (one with a key/value cache)."""
    from tensorc.models import MODELS, get
    from tensorc.training import is_checkpoint, load_checkpoint_model
    if is_checkpoint(args.model):
        return load_checkpoint_model(args.model)
    decoders = [n for n, (cls, _) in MODELS.items() if hasattr(cls, "cache_layout")]
    if args.model not in decoders:
        raise TensorcError(f"{args.model} is not a built-in decoder language model "
                           f"({', '.join(decoders)})")
    return get(args.model, args.preset or "tiny", seed=args.seed or 0,
               **parse_overrides(args.set))


def cmd_generate(args) -> int:
    from .generation import ByteTokenizer, Generator
    if bool(args.prompt) == bool(args.ids):
        raise TensorcError("give the prompt as --prompt TEXT or as --ids 1,2,3 (either may "
                           "repeat, one per batch row)")
    from tensorc.models import MODELS
    from tensorc.training import is_checkpoint
    if args.model in MODELS or is_checkpoint(args.model):   # a zoo decoder: cached steps
        gen = Generator(_decoder(args), args.backend, args.passes)
    else:   # an exported cached step, or any graph from token ids to logits
        gen = Generator(_pipeline(args, _load(args).graph), args.backend, "O0")
    tokenizer = ByteTokenizer()
    if args.prompt:
        tokenizer.check(gen.vocab_size)
        prompts = [tokenizer.encode(p) for p in args.prompt]
    else:
        prompts = args.ids
    stream = args.format == "text" and len(prompts) == 1
    if stream:
        text = tokenizer.stream() if args.prompt else None
        sys.stdout.write(text(prompts[0]) if text else " ".join(map(str, prompts[0])))
        sys.stdout.flush()

    def on_step(tokens):
        if stream and tokens[0] >= 0:
            sys.stdout.write(text([tokens[0]]) if text else f" {tokens[0]}")
            sys.stdout.flush()
    result = gen.generate(prompts, args.max_new_tokens, on_step=on_step,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed or 0,
                          stop_ids=(tokenizer.eos,) if args.prompt else ())
    if args.format == "json":
        out = result.as_dict()
        if args.prompt:
            out["text"] = [tokenizer.decode(r) for r in result.ids]
        print(json.dumps(out))
        return 0
    if stream:
        sys.stdout.write((text.flush() if text else "") + "\n")
    else:
        for r, ids in enumerate(result.ids):
            shown = tokenizer.decode(ids) if args.prompt else " ".join(map(str, ids))
            print(f"[{r}] {shown}")
    n = sum(len(r) for r in result.new_tokens)
    print(f"{n} new tokens, {result.tokens_per_s:.1f} tokens/s (prefill "
          f"{result.prefill_ms:.1f} ms, {result.ms_per_token:.2f} ms per decode step, "
          f"{'KV cache' if result.cached else 'no KV cache: each step runs the whole sequence'}"
          f"; {args.backend}, compiled in {result.compile_ms / 1e3:.1f} s)", file=sys.stderr)
    return 0


# --- compare --------------------------------------------------------------------------

def output_errors(out: dict, ref: dict) -> dict:
    """Max abs error and ||out - ref|| / ||ref|| over all outputs (float64)."""
    max_abs = diff2 = ref2 = 0.0
    for name, r in ref.items():
        if name not in out:
            raise TensorcError(f"output {name!r} is missing (got {', '.join(out)})")
        o, r = np.asarray(out[name], np.float64), np.asarray(r, np.float64)
        if o.shape != r.shape:
            raise TensorcError(f"output {name!r} has shape {list(o.shape)}, the reference "
                               f"{list(r.shape)}")
        d = np.where(o == r, 0.0, o - r)  # equal infinities (masks) count as no error
        if d.size:
            max_abs = max(max_abs, float(np.max(np.abs(d))))
        diff2 += float(np.sum(d * d))
        ref2 += float(np.sum(np.where(np.isfinite(r), r, 0.0) ** 2))
    rel = (diff2 ** 0.5) / (ref2 ** 0.5) if ref2 > 0 else (0.0 if diff2 == 0 else float("inf"))
    return {"max_abs_err": max_abs, "rel_err": rel}


def _fmt_err(x) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.3g}"


def cmd_compare(args) -> int:
    from tensorc.backends import available_backends, get_backend
    loaded = _load(args)
    feeds = loaded.inputs
    reference = get_backend("numpy").compile(loaded.graph)
    ref = _run_checked(reference, feeds, None)

    per_pass = []

    def after(name, g, seconds):
        out = get_backend("numpy").compile(g).run(feeds)
        per_pass.append({"pass": name, **output_errors(out, ref), "seconds": seconds})

    graph = _pipeline(args, loaded.graph, after if args.per_pass else None, loaded)
    names = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends \
        else available_backends()
    for name in names:  # a typo is an error; a known backend that cannot run gets a row
        if name not in available_backends():
            raise TensorcError(f"unknown backend {name!r} "
                               f"(known: {', '.join(available_backends())})")
    # a lossy pipeline (quantization, bf16 weights) is shown next to its float self
    variants = [(args.passes, graph)]
    exact = lossless(args.passes or "")
    if exact != (args.passes or ""):
        from tensorc.passes import run_pipeline
        variants.insert(0, (exact or "O0", run_pipeline(loaded.graph, exact)))
    results = []
    for name in names:
        for passes, g in variants:
            results.append(_measure(name, passes, g, feeds, ref, args.repeat))
        if len(variants) > 1 and None not in (results[-1]["median_ms"],
                                              results[-2]["median_ms"]):
            results[-1]["speedup_vs_float"] = results[-2]["median_ms"] / results[-1]["median_ms"]

    if args.json:
        report = {"reference": "numpy", "model": loaded.name, "results": results}
        if args.per_pass:
            report["per_pass"] = per_pass
        print(json.dumps(report, indent=2))
        return 0
    shapes = ", ".join(f"{v.name} {v.type}" for v in loaded.graph.inputs)
    print(f"{loaded.name} ({shapes}); reference: numpy, un-optimised")
    rows = [["backend", "passes", "max_abs_err", "rel_err", "median_ms", "speed_vs_float"]]
    for r in results:
        if r["unavailable"] is not None:
            rows.append([r["backend"], r["passes"], f"unavailable: {r['unavailable']}"])
        else:
            speedup = r.get("speedup_vs_float")
            rows.append([r["backend"], r["passes"], _fmt_err(r["max_abs_err"]),
                         _fmt_err(r["rel_err"]), f"{r['median_ms']:.3f}",
                         "" if speedup is None else f"{speedup:.2f}x"])
    sys.stdout.write(_table(rows))
    if args.per_pass:
        print("\nerror after each pass (numpy, against the un-optimised graph):")
        rows = [["pass", "max_abs_err", "rel_err", "ms"]]
        rows += [[p["pass"], _fmt_err(p["max_abs_err"]), _fmt_err(p["rel_err"]),
                  f"{p['seconds'] * 1e3:.2f}"] for p in per_pass]
        sys.stdout.write(_table(rows) if per_pass else "  (no passes ran)\n")
    return 0


def lossless(spec: str) -> str:
    """The pipeline without its lossy passes (quantize, cast-weights)."""
    from tensorc.passes import LOSSY
    return ",".join(item for item in spec.split(",")
                    if item.split(":")[0].strip() not in LOSSY)


def _measure(backend: str, passes: str, graph, feeds, ref, repeat: int) -> dict:
    """One row of `compare`: errors against the reference and the median time."""
    from tensorc.backends import get_backend
    row = {"backend": backend, "passes": passes}
    try:
        exe = get_backend(backend).compile(graph)
        errs = output_errors(exe.run(feeds), ref)  # also the warm-up run
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            exe.run(feeds)
            times.append(time.perf_counter() - t0)
        row.update(errs, median_ms=statistics.median(times) * 1e3, unavailable=None)
    except FallbackError:   # --strict: the command fails, not just this row
        raise
    except TensorcError as e:  # not installed, no GPU, an op it cannot compile, ...
        row.update(max_abs_err=None, rel_err=None, median_ms=None, unavailable=str(e))
    return row


# --- compile and export ---------------------------------------------------------------

def cmd_compile(args) -> int:
    from tensorc import __version__
    from tensorc.backends import get_backend

    from .artifact import save_artifact
    loaded = _load(args)
    graph = _pipeline(args, loaded.graph, loaded=loaded)
    backend_name = args.backend or loaded.meta.get("backend") or "numpy"
    backend = get_backend(backend_name)
    if args.emit_source:  # generating source needs no device, so it comes first
        os.makedirs(args.emit_source, exist_ok=True)
        for path in backend.emit_source(graph, args.emit_source):
            print(f"wrote {path}")
    reason = backend.unavailable_reason()
    if reason is None:
        backend.compile(graph)  # fail now, not at run time, if the target cannot take it
    else:
        print(f"note: not compiled here, {backend_name} is unavailable ({reason}); "
              "the artifact runs where it is", file=sys.stderr)
    earlier = loaded.meta.get("passes") if loaded.meta.get("source") == "artifact" else None
    passes = ",".join(p for p in (earlier, args.passes) if p and p != "O0") or "O0"
    meta = {"name": loaded.name, "model": args.model, "config": loaded.config,
            "preset": loaded.meta.get("preset"), "overrides": loaded.meta.get("overrides"),
            "passes": passes, "backend": backend_name, "seed": args.seed or 0,
            "tensorc_version": __version__}
    save_artifact(args.output, graph, loaded.inputs, meta)
    print(f"wrote {args.output}: {loaded.name}, {len(graph.nodes)} nodes, "
          f"{_fmt_count(graph.param_count())} parameters, passes {passes}, "
          f"backend {backend_name}")
    return 0


def cmd_export(args) -> int:
    from tensorc.frontend import onnx as onnx_io
    if args.kv_cache:
        from tensorc.frontend.cache import decoder_step
        name, graph = args.model, decoder_step(_decoder(args))
    else:
        if args.dynamic and (args.batch or args.seq):
            raise TensorcError("--dynamic exports every batch and length: --batch and --seq "
                               "do not apply")
        loaded = _load(args, symbolic=args.dynamic)
        name, graph = loaded.name, loaded.graph
    graph = _pipeline(args, graph, loaded=None if args.kv_cache else loaded)
    onnx_io.save(graph, args.output)
    print(f"wrote {args.output}: {name}{' (cached step)' if args.kv_cache else ''}, "
          f"{len(graph.nodes)} nodes")
    return 0


# --- the parser -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show a traceback on errors")

    def model_parser(inputs: str):
        parser = _Parser(add_help=False)
        parser.add_argument("model", metavar="MODEL", help="the model to load (forms below)")
        g = parser.add_argument_group("model")
        g.add_argument("--preset", help="preset of a built-in model (default: tiny)")
        g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field of a built-in model (repeatable)")
        g.add_argument("--batch", type=_positive_int, help=f"batch size of the {inputs}")
        g.add_argument("--seq", type=_positive_int, help=f"sequence length of the {inputs}")
        g.add_argument("--seed", type=_seed,
                       help=f"seed of the weights and {inputs} (default: 0)")
        g.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                       help="size of a symbolic input dim of a graph, by name (repeatable; "
                            "ONNX files and factories' graphs)")
        return parser

    trained = model_parser("training batches")   # train/distill build their own pipeline
    model = model_parser("example inputs")
    p = model.add_argument_group("passes")
    p.add_argument("--passes", metavar="P", help="pipeline, e.g. O1 or O2,name:key=value "
                   "(default: O0; for generate O2)")
    p.add_argument("--print-after", action="append", default=[], metavar="NAME",
                   help="print the IR after pass NAME, or after every pass with 'all', "
                        "to stderr (repeatable)")
    p.add_argument("--time-passes", action="store_true", help="print each pass's time")
    p.add_argument("--disable", action="append", default=[], metavar="NAME",
                   help="skip pass NAME (repeatable)")
    p.add_argument("--verify-each", action="store_true", help="verify the graph after each pass")
    p.add_argument("--calib", metavar="DATA.npz",
                   help="calibration inputs (by graph input name) for quantize:mode=static "
                        "and prune's activation/taylor importance (default: the example "
                        "inputs)")

    parser = _Parser(prog="tensorc", description="A small graph compiler for transformer "
                     "models.", epilog=MODEL_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    def command(name, fn, help, parents=(common, model)):
        sp = sub.add_parser(name, parents=list(parents), help=help, description=help,
                            epilog=MODEL_HELP if model in parents or trained in parents else None,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=fn)
        return sp

    sp = command("models", cmd_models, "list built-in models and presets", parents=(common,))
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = command("inspect", cmd_inspect, "print a model's graph and statistics")
    sp.add_argument("--format", choices=("text", "json", "dot"), default="text")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")
    sp.add_argument("--backend", default="numpy",
                    help="whose memory plan peak_memory_bytes reports (default: numpy)")
    sp.add_argument("--explain", action="store_true",
                    help="say why rewrites did not fire (to stderr; a key in JSON)")
    sp.add_argument("--train", metavar="TASK", choices=("clm", "mlm", "classify", "translate"),
                    help="show the training step of a built-in model instead: loss and the "
                         "gradient of every weight (--passes default O2)")
    sp.add_argument("--recompute", action="store_true",
                    help="with --train: recompute cheap activations in the backward")
    sp.add_argument("--importance", choices=("magnitude", "activation", "taylor"),
                    help="rank attention heads, FFN neurons and layers by importance (on "
                         "--calib inputs, else the example inputs) instead")
    sp.add_argument("--heatmap", metavar="FILE.png",
                    help="with --importance: draw head importance, layers x heads")
    sp.add_argument("--mesh", metavar="tp=2,dp=2",
                    help="shard on this device mesh (Megatron tensor parallel, data parallel) "
                         "and show each rank's params, memory and collectives instead")

    strict = _Parser(add_help=False)
    strict.add_argument("--strict", action="store_true",
                        help="fail if a compiled backend would run an op on the numpy "
                             "reference (same as TENSORC_STRICT=1)")

    sp = command("run", cmd_run, "run a model and print or save its outputs",
                 parents=(common, model, strict))
    sp.add_argument("--backend", help="backend (default: numpy, or the artifact's)")
    sp.add_argument("--input", metavar="IN.npz", help="inputs by graph input name")
    sp.add_argument("--output", metavar="OUT.npz", help="save outputs by graph output name")
    m = sp.add_argument_group("mesh (tensor, data and pipeline parallel)")
    add_mesh_arguments(m, "run on this device mesh: pp pipeline stages, each sharded over "
                          "tp ranks (Megatron), the batch split over dp replicas")
    m.add_argument("--timeline", metavar="FILE.png",
                   help="with pp > 1: draw the measured schedule (matplotlib)")

    sp = command("compare", cmd_compare,
                 "compare backends and passes against the numpy reference",
                 parents=(common, model, strict))
    sp.add_argument("--backends", metavar="B1,B2",
                    help="comma-separated backends (default: all known)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--repeat", type=_positive_int, default=5,
                    help="timed runs per backend (default: 5)")
    sp.add_argument("--per-pass", action="store_true",
                    help="also show the error after each pass (on numpy)")

    sp = command("generate", cmd_generate, "generate tokens from a prompt, streaming them",
                 parents=(common, model, strict))
    sp.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                    help="prompt text (byte tokenizer); repeat for a batch")
    sp.add_argument("--ids", action="append", default=[], type=_id_list, metavar="1,2,3",
                    help="prompt token ids; repeat for a batch")
    sp.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N")
    sp.add_argument("--temperature", type=float, default=0.0,
                    help="0 (default) is greedy; above 0 samples (seeded by --seed)")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest")
    sp.add_argument("--top-p", type=float, default=1.0,
                    help="sample among the likeliest tokens holding probability p")
    sp.add_argument("--backend", default="llvm", help="backend (default: llvm)")
    sp.add_argument("--format", choices=("text", "json"), default="text")

    sp = command("compile", cmd_compile, "write a compiled artifact (graph, weights, inputs)")
    sp.add_argument("--backend", help="target backend (default: numpy)")
    sp.add_argument("-o", "--output", metavar="FILE", required=True, help="artifact to write")
    sp.add_argument("--emit-source", metavar="DIR", help="also write the generated source")

    sp = command("export", cmd_export, "write the (rewritten) graph as an ONNX file")
    sp.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    sp.add_argument("--dynamic", action="store_true",
                    help="symbolic batch and sequence (token inputs) in the file: one graph "
                         "for every shape, as torch's dynamic_axes")
    sp.add_argument("--kv-cache", action="store_true",
                    help="export a built-in decoder's cached step (input_ids, start, past.* "
                         "-> logits, present.*), which `tensorc generate` runs")
    add_commands(command, common, trained)   # train, distill, prune
    from .cli_tune import add_command as add_tune_command
    add_tune_command(command, common)   # tune
    from .parallel.planner import add_command as add_plan_command
    add_plan_command(command, (common,), _positive_int)   # plan
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.strerror or e}: {e.filename}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split("\n"))


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (tests and callers may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _warnings_to_stderr() -> None:
    """Library warnings (a reference fallback, say) as `tensorc: warning: ...` lines."""
    log = logging.getLogger("tensorc")
    if not any(getattr(h, "tensorc_cli", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("tensorc: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler.tensorc_cli = True
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv   # --mesh runs this very command again under mpiexec
        if getattr(args, "passes", "") is None:
            args.passes = "O2" if args.command == "generate" else "O0"
        if getattr(args, "strict", False):
            os.environ["TENSORC_STRICT"] = "1"   # read where lowering decides (any backend)
        _warnings_to_stderr()
        return args.func(args) or 0
    except (TensorcError, OSError) as e:
        if debug:
            raise
        if isinstance(e, BrokenPipeError):  # e.g. `tensorc inspect gpt | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit flush
            return 0
        print(f"tensorc: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
