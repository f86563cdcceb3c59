"""One model on a whole mesh: tensor, data and pipeline parallelism composed
(`tensorc run MODEL --mesh tp=2,dp=2,pp=2`).

Every rank loads the same model (one seed: the same weights and inputs). The graph is
cut into `pp` stages at layer boundaries (`pipeline.cut`); a rank keeps its stage, shards
it over `tp` with the Megatron strategy (`passes/shard.py`: its collectives run over the
rank's tp group), runs the rest of the pipeline and compiles it. Inference needs no
graph change for `dp`: each dp replica runs its own pipeline on its rows of the batch,
and one all_gather over dp puts the rows back together, so every rank ends with the
whole output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TensorcError
from ..ir import Graph
from ..mesh import Mesh
from ..passes import run_pipeline
from ..passes.shard import plan, prepare, shard
from ..types import bind_shapes
from .pipeline import PipelineForward, Stage, cut
from .schedule import Timeline

# --passes on a mesh: what runs on each rank's local graph after sharding (O2's fusion
# without the steps sharding needs first).
LOCAL_PASSES = {"O0": "O0", "O1": "O1", "O2": "O2-local"}


@dataclass
class RankResult:
    outputs: dict[str, np.ndarray]
    timeline: Timeline | None = None
    sent_bytes: int = 0      # pipeline sends (activations to the next stage)


def stages_of(graph: Graph, mesh: Mesh, inputs: dict[str, np.ndarray]) -> list[Stage]:
    """The model cut into the mesh's pipeline stages (one stage when pp=1), costed at
    the sizes of `inputs`."""
    names = [v.name for v in graph.inputs]
    env = bind_shapes([v.type for v in graph.inputs], [inputs[n] for n in names], names)
    return cut(prepare(graph), mesh.pp, env=env)


def stage_compiler(mesh: Mesh, rank: int, backend: str, passes: str = "O2"):
    """compile_stage for `rank`: shard the stage over the mesh's tp axis, then the
    local passes, then the backend."""
    from ..backends import get_backend
    _check_passes(passes)
    tp, tp_rank = Mesh(tp=mesh.tp), mesh.coords(rank)["tp"]

    def compile_stage(graph: Graph):
        local = shard(graph, tp, tp_rank) if mesh.tp > 1 else graph
        return get_backend(backend).compile(run_pipeline(local, LOCAL_PASSES[passes]))
    return compile_stage


def dp_rows(inputs: dict[str, np.ndarray], mesh: Mesh, dp_rank: int,
            micro_batches: int) -> dict[str, np.ndarray]:
    """This dp replica's rows of every input (their first dim is the batch)."""
    parts = mesh.dp * micro_batches
    out = {}
    for name, a in inputs.items():
        n = np.shape(a)[0] if np.ndim(a) else 0
        if n == 0 or n % parts:
            raise TensorcError(f"input {name!r} of shape {list(np.shape(a))}: its batch does "
                               f"not split into dp={mesh.dp} x {micro_batches} micro-batches")
        out[name] = np.split(np.asarray(a), mesh.dp)[dp_rank]
    return out


def _check_passes(passes: str) -> None:
    if passes not in LOCAL_PASSES:
        raise TensorcError(f"--mesh runs O0, O1 or O2 on each rank's shard, not {passes!r}")


def check(graph: Graph, inputs: dict[str, np.ndarray], mesh: Mesh, micro_batches: int = 1,
          passes: str = "O2") -> list[Stage]:
    """The stages, once every rank's part is known to exist (layers for the stages,
    heads and neurons for tp, rows for dp and the micro-batches, the passes): the errors a mesh run
    would meet, raised once, before any rank starts."""
    _check_passes(passes)
    stages = stages_of(graph, mesh, inputs)
    for s in stages if mesh.tp > 1 else ():
        plan(s.graph, Mesh(tp=mesh.tp))
    dp_rows(inputs, mesh, 0, micro_batches)
    return stages


def run_rank(stages: list[Stage], inputs: dict[str, np.ndarray], groups, mesh: Mesh,
             backend: str = "numpy", passes: str = "O2", micro_batches: int = 1,
             schedule: str = "1f1b") -> RankResult:
    """One rank's part of a mesh run (call it on every rank with the same arguments)."""
    coords = mesh.coords(groups.rank)
    pipe = PipelineForward(stages, groups, schedule,
                           stage_compiler(mesh, groups.rank, backend, passes))
    out = pipe.run(dp_rows(inputs, mesh, coords["dp"], micro_batches), micro_batches)
    if mesh.dp > 1:
        dp = groups.group("dp")
        out = {n: dp.all_gather(a, 0) for n, a in out.items()}
    timeline = pipe.measured_timeline(micro_batches, backward=False) if mesh.pp > 1 \
        else None
    return RankResult(out, timeline, pipe.sent_bytes)
