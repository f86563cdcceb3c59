"""`tensorc inspect MODEL --mesh tp=2,dp=2`: what each rank of a sharded model holds and
sends. Per rank (ranks alike are printed once, with their list): parameters, weight
bytes, the activation memory the backend plans, and every collective of the forward with
its op, mesh axis, shapes and the bytes the rank sends for it (ring algorithms,
`ops.collective.comm_bytes`); the total against the analytic minimum of Megatron's
arrangement: two all_reduces of the residual stream [batch/dp, seq, d_model] per layer
(one per attention block, one per MLP block), one more for a vocabulary-parallel
embedding, and gathering each output whole onto every rank. With pp > 1 the model is
cut into stages first (`pipeline.cut`, as `tensorc run --mesh` does): a stage's ranks
also send its boundary activation (their rows of it) to the next stage, and only the
last stage gathers outputs.
"""

from __future__ import annotations

from tensorc.backends import get_backend
from tensorc.ir import Graph, TensorType
from tensorc.mesh import Mesh, Sharding
from tensorc.ops.collective import COLLECTIVES, comm_bytes
from tensorc.passes import run_pipeline
from tensorc.passes.prune import PruneError, structures
from tensorc.passes.shard import Plan, plan, prepare

from .pipeline import cut


def _ring(op: str, full_bytes: int, p: int) -> int:
    t = TensorType((full_bytes,), "u8")
    return comm_bytes(op, t, t, p)


def analytic_bytes(p: Plan, env: dict[str, int], gathered: bool = True) -> int:
    """What one rank must send at least in Megatron's arrangement (the module doc);
    `gathered`: the outputs are made whole (a last stage), not sent on as they are."""
    m, g = p.mesh, p.graph
    try:
        layers = structures(g)
    except PruneError:
        layers = []
    total = 0
    if layers and m.tp > 1:
        stream = layers[0].out[-1].outputs[0].type.nbytes(env) // m.dp
        split_tables = sum(1 for n in g.nodes if n.op == "gather"
                           and n.inputs[0] in p.specs and any(p.specs[n.inputs[0]].dims))
        total += (2 * len(layers) + split_tables) * _ring("all_reduce", stream, m.tp)
    for v in g.outputs if gathered else ():
        full = v.type.nbytes(env)
        total += _ring("all_gather", full // m.dp, m.tp) + _ring("all_gather", full, m.dp)
    return total


def rank_summary(g: Graph, env: dict[str, int], backend: str) -> dict:
    colls = {}
    for n in g.nodes:
        if n.op not in COLLECTIVES:
            continue
        a = n.attrs
        x = n.inputs[0].type if n.inputs else None
        key = (n.op, a["axis"], str(x), str(n.outputs[0].type))
        sent = comm_bytes(n.op, x, n.outputs[0].type, a["size"], env)
        c = colls.setdefault(key, {"op": n.op, "axis": a["axis"], "in": key[2],
                                   "out": key[3], "bytes": sent, "count": 0})
        c["count"] += 1
    coll = list(colls.values())
    return {"params": g.param_count(), "weight_bytes": sum(g.weight_bytes().values()),
            "planned_memory_bytes": get_backend(backend).planned_memory_bytes(g, env),
            "collectives": coll,
            "sent_bytes": sum(c["bytes"] * c["count"] for c in coll)}


def mesh_report(graph: Graph, mesh: Mesh, env: dict[str, int] | None = None,
                backend: str = "numpy", strategy: str = "megatron") -> dict:
    """The JSON form; `format_report` prints it."""
    env = env or {}
    inner = Mesh(dp=mesh.dp, tp=mesh.tp)   # within one pipeline stage
    stages = cut(prepare(graph), mesh.pp, env=env) if mesh.pp > 1 else None
    parts = [(st.graph, st.send) for st in stages] if stages else [(graph, [])]
    groups: list[dict] = []
    notes: list[str] = []
    for stage, (g, send) in enumerate(parts):
        values = g.values()
        rows = {n: Sharding(("dp",) + (None,) * (values[n].type.rank - 1)) for n in send} \
            if mesh.dp > 1 else {}   # a boundary activation goes on as this replica's rows
        p = plan(g, inner, strategy, rows)
        notes += [n for n in p.notes if n not in notes]
        extra = {"analytic_min_bytes": analytic_bytes(p, env, gathered=not send)}
        if stages:
            extra.update(stage=stage, layers=len(stages[stage].layers),
                         pipeline_sent_bytes=sum(values[n].type.nbytes(env) for n in send)
                         // mesh.dp)
        for r in range(inner.size):
            rank = mesh.rank({**inner.coords(r), "pp": stage})
            s = {**rank_summary(run_pipeline(p.local(r), "O2-local"), env, backend), **extra}
            same = next((grp for grp in groups if grp["summary"] == s), None)
            if same is None:
                groups.append({"ranks": [rank], "summary": s})
            else:
                same["ranks"].append(rank)
    return {"mesh": str(mesh), "ranks": mesh.size, "strategy": strategy, "backend": backend,
            "whole_params": graph.param_count(),
            "per_rank": [{"ranks": grp["ranks"], **grp["summary"]} for grp in groups],
            "analytic_min_bytes": max(grp["summary"]["analytic_min_bytes"] for grp in groups),
            "notes": notes}


def _b(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def format_report(rep: dict, name: str) -> str:
    lines = [f"{name} on mesh {rep['mesh']} ({rep['ranks']} ranks), strategy "
             f"{rep['strategy']}; whole model {rep['whole_params']:,} params"]
    for grp in rep["per_rank"]:
        stage = f"stage {grp['stage']} ({grp['layers']} layers), " if "stage" in grp else ""
        lines.append(f"ranks {','.join(map(str, grp['ranks']))}: {stage}"
                     f"params {grp['params']:,}, "
                     f"weights {_b(grp['weight_bytes'])}, planned activations "
                     f"{_b(grp['planned_memory_bytes'])} ({rep['backend']})")
        for c in grp["collectives"]:
            shape = c["in"] if c["in"] == c["out"] else f"{c['in']} -> {c['out']}"
            lines.append(f"  {c['count']:>3} x {c['op']:<14} over {c['axis']:<3} {shape}: "
                         f"{_b(c['bytes'])} sent each")
        if grp.get("pipeline_sent_bytes"):
            lines.append(f"  to the next stage: {_b(grp['pipeline_sent_bytes'])} "
                         "(its rows of the boundary activation)")
        lines.append(f"  sent per forward: {_b(grp['sent_bytes'])} in collectives (analytic "
                     f"minimum {_b(grp['analytic_min_bytes'])})")
    lines += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(lines) + "\n"
