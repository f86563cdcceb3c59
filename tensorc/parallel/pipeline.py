"""Pipeline parallelism: a model's graph cut into stages at layer boundaries, and the
runtime that runs one stage per rank of the mesh's `pp` axis in the order a schedule
(`schedule.py`: GPipe, 1F1B) gives, for inference and training.

The cut works on a graph after `training.FORWARD_PASSES` (O1, fuse-patterns,
fuse-attention), not O2. Both leave one value (the residual stream) live between the
zoo's layers, but after O1 every node is one op reading one layer's weights under their
own names, while O2 merges q/k/v into new weights (`...q.weight.merged`: gradients and
tensor-parallel sharding go by the model's names) and fuses across what were op
boundaries (the embedding's add with block 0's layer norm: a region reading two layers'
values cannot be cut). A training graph must be cut before `grad` anyway, and O2 loses
nothing by running later: each stage is compiled on its own (O2 and a backend, or the
caller's `compile_stage`, e.g. sharding it first).

Activations move between stages with the pp group's `send`/`recv` from the host, not
with send/recv ops inside the stage graphs: the order of sends and receives is the
schedule's (1F1B interleaves forward activations and backward gradients of different
micro-batches), which is host control, and a stage graph without communication stays
an ordinary graph that any pass (sharding) or backend takes as it is.

Training re-materialises: a stage's backward graph recomputes its forward from the
stage's inputs (GPipe's re-materialisation), so what a stage keeps per micro-batch in
flight is only the activation it received, the cost one more forward per backward.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable

import numpy as np

from ..errors import InputError
from ..ir import FLOAT_DTYPES, Graph, TensorType, Value, bind_shapes
from ..ops import get_op
from .schedule import PipelineError, Timeline, get_schedule, simulate

# --- the cut ----------------------------------------------------------------------------

# A layer is the weights under one index of a module list: blocks.3.attn.q.weight -> blocks.3
LAYER = re.compile(r"^([A-Za-z_][\w.]*?\.\d+)\.")


@dataclasses.dataclass
class Stage:
    """One stage: a normal graph whose inputs are the activations it receives (`recv`,
    first) and the original inputs it reads, and whose outputs are what later stages
    need (`send`), or the model's outputs on the last stage."""

    index: int
    graph: Graph
    recv: list[str]
    send: list[str]
    layers: list[str]
    weights: set[str] = dataclasses.field(repr=False)
    flops: int
    param_bytes: int
    model_inputs: dict[str, TensorType]   # the whole model's (non-weight) inputs: sizes

    @property
    def params(self) -> list[str]:
        """The weights it reads, as inputs (a training graph) or constants."""
        return [v.name for v in list(self.graph.inputs) + list(self.graph.constants.values())
                if v.name in self.weights]

    def __str__(self) -> str:
        first, last = (self.layers[0], self.layers[-1]) if self.layers else ("-", "-")
        return (f"stage {self.index}: layers {first}..{last} ({len(self.layers)}), "
                f"{self.flops / 1e6:.2f} MFLOP, {self.param_bytes / 2**20:.2f} MiB params, "
                f"recv {', '.join(self.recv) or '-'}, send {', '.join(self.send) or '-'}")


def _free_values(graph: Graph, weights: set[str]) -> set[Value]:
    """Values computed from the inputs alone, reading no weight (an attention mask,
    positions): every rank has the inputs, so each stage that reads one computes it
    itself rather than receiving it."""
    free = {v for v in graph.inputs if v.name not in weights}
    free |= {v for n, v in graph.constants.items() if n not in weights}
    for node in graph.nodes:
        if all(v in free for v in node.inputs):
            free.update(node.outputs)
    return free


def _layer(v: Value, weights: set[str]) -> str | None:
    """The layer of a weight (`blocks.3` of blocks.3.attn.q.weight), else None."""
    m = LAYER.match(v.name) if v.producer is None and v.name in weights else None
    return m.group(1) if m else None


def cut(graph: Graph, stages: int, weights: list[str] | None = None,
        env: dict[str, int] | None = None) -> list[Stage]:
    """Cut `graph` into `stages` consecutive stages at layer boundaries, balancing their
    FLOPs (then their parameter bytes). `weights`: the names of the weights when they
    are graph inputs (a training graph); by default the float constants of rank >= 1.
    `env`: sizes of symbolic dims, for the costs."""
    from ..passes.autodiff import trainable
    if not isinstance(stages, int) or stages < 1:
        raise PipelineError(f"a pipeline needs a positive number of stages, not {stages!r}")
    env = dict(env or {})
    weights_set = set(trainable(graph) if weights is None else weights)
    free = _free_values(graph, weights_set)
    owned = [n for n in graph.nodes if not all(v in free for v in n.outputs)]
    n = len(owned)

    # live[p]: values made before owned node p and read from p on (or a graph output)
    last_use: dict[Value, int] = {}
    for i, node in enumerate(owned):
        for v in node.inputs:
            if v.producer is not None and v not in free:
                last_use[v] = i
    for v in graph.outputs:
        if v.producer is not None and v not in free:
            last_use[v] = n

    def live(p: int) -> list[Value]:
        return [v for node in owned[:p] for v in node.outputs
                if last_use.get(v, -1) >= p]

    # the layers each node reads weights of, in order of first appearance
    node_layers = [{_layer(v, weights_set) for v in node.inputs} - {None} for node in owned]
    order: list[str] = []
    for ls in node_layers:
        order += sorted(x for x in ls if x not in order)
    rank = {name: i for i, name in enumerate(order)}

    # a boundary between layers j and j+1: after the last node of layers <= j, up to the
    # first node of layers > j; the point there where the fewest bytes are live
    bounds = []
    for j in range(len(order) - 1):
        lo = max(i for i, ls in enumerate(node_layers) if any(rank[x] <= j for x in ls))
        hi = min(i for i, ls in enumerate(node_layers) if any(rank[x] > j for x in ls))
        if lo >= hi:
            continue   # the layers interleave: no cut between them
        cost = {p: (len(live(p)), sum(v.type.nbytes(env) for v in live(p)))
                for p in range(lo + 1, hi + 1)}
        bounds.append(min(cost, key=lambda p: (cost[p], -p)))
    if len(bounds) + 1 < stages:
        layers = len(bounds) + 1
        raise PipelineError(f"{graph.name} has {layers} layer{'s' * (layers != 1)}, fewer "
                            f"than the {stages} pipeline stages asked for")

    flops = np.cumsum([0] + [get_op(node.op).count_flops(node, env) for node in owned])
    reads = [{v.name for v in node.inputs if v.producer is None and v.name in weights_set}
             for node in owned]
    values = graph.values()

    @functools.cache
    def segment(a: int, b: int) -> tuple[int, int]:
        """(flops, parameter bytes) of owned nodes a..b-1."""
        names = set().union(*reads[a:b])
        return int(flops[b] - flops[a]), sum(values[x].type.nbytes(env) for x in names)

    # minimise the costliest stage: best[k][i] = (cost, cuts) splitting points[:i+1]
    points = [0, *bounds, n]

    @functools.cache
    def best(k: int, i: int):
        if k == 1:
            return segment(0, points[i]), ()
        options = []
        for j in range(k - 1, i):
            worst, cuts = best(k - 1, j)
            options.append((max(worst, segment(points[j], points[i])), cuts + (points[j],)))
        return min(options)
    _, cuts = best(stages, len(points) - 1)
    edges = [0, *cuts, n]
    return [_stage(graph, k, owned[edges[k]:edges[k + 1]], live(edges[k]),
                   live(edges[k + 1]) if k < stages - 1 else list(graph.outputs),
                   free, weights_set, env, last=k == stages - 1)
            for k in range(stages)]


def _stage(graph: Graph, k: int, nodes: list, recv: list[Value], send: list[Value],
           free: set[Value], weights: set[str], env: dict, last: bool) -> Stage:
    """The graph of one stage: its nodes, and the input-only nodes they read."""
    keep = {id(node) for node in nodes}
    todo = [v for node in nodes for v in node.inputs] + list(send)
    while todo:   # the free values it reads, computed here again
        v = todo.pop()
        if v in free and v.producer is not None and id(v.producer) not in keep:
            keep.add(id(v.producer))
            todo += v.producer.inputs
    body = [node for node in graph.nodes if id(node) in keep]
    g = Graph(f"{graph.name}.stage{k}")
    vals: dict[Value, Value] = {v: g.add_input(v.name, v.type) for v in recv}
    read = {v for node in body for v in node.inputs} | set(send)
    for v in graph.inputs:
        if v in read and v not in vals:
            vals[v] = g.add_input(v.name, v.type)
    for name, v in graph.constants.items():
        if v in read:
            vals[v] = g.add_constant(name, v.data, v.type)
    for node in body:
        outs = g.add_node(node.op, [vals[v] for v in node.inputs], node.attrs,
                          names=[v.name for v in node.outputs], loc=node.loc)
        vals.update(zip(node.outputs, outs, strict=True))
    g.outputs = [vals[v] for v in send]
    g.verify()
    layers = list(dict.fromkeys(x for node in nodes for v in node.inputs
                                if (x := _layer(v, weights)) is not None))
    stage = Stage(k, g, [v.name for v in recv], [] if last else [v.name for v in send],
                  layers, weights, sum(get_op(node.op).count_flops(node, env) for node in g.nodes),
                  0, {v.name: v.type for v in graph.inputs if v.name not in weights})
    stage.param_bytes = sum(g.values()[x].type.nbytes(env) for x in stage.params)
    return stage


# --- the runtime: one stage per rank of the pp axis -------------------------------------

def default_compile(backend: str = "numpy", passes: str = "O2") -> Callable[[Graph], object]:
    """Compile a stage graph the usual way: O2 (``O2-local`` for a graph already sharded
    over tp), then the backend."""
    from ..backends import get_backend
    from ..passes import run_pipeline

    def compile_stage(graph: Graph):
        return get_backend(backend).compile(run_pipeline(graph, passes))
    return compile_stage


def split_batch(inputs: dict[str, np.ndarray], m: int) -> list[dict[str, np.ndarray]]:
    """`m` equal micro-batches, each input split along its first (batch) dim."""
    if not isinstance(m, int) or m < 1:
        raise PipelineError(f"micro-batches should be a positive integer, not {m!r}")
    for name, a in inputs.items():
        if np.ndim(a) == 0 or np.shape(a)[0] % m:
            raise PipelineError(f"input {name!r} of shape {list(np.shape(a))} does not split "
                                f"into {m} equal micro-batches along its first dim")
    parts = {n: np.split(np.asarray(a), m) for n, a in inputs.items()}
    return [{n: parts[n][i] for n in inputs} for i in range(m)]


class _Rank:
    """What forward and training share on one rank: its stage, its neighbours over the
    pp group, and the sizes of each micro-batch's values."""

    def __init__(self, stages: list[Stage], groups, schedule: str):
        self.comm = groups.group("pp")
        if self.comm.size != len(stages):
            raise PipelineError(f"{len(stages)} stages need a pp axis of {len(stages)} ranks; "
                                f"the mesh has pp={self.comm.size}")
        self.stages, self.s, self.p = stages, self.comm.rank, len(stages)
        self.stage = stages[self.s]
        self.schedule = get_schedule(schedule)
        self.last = self.s == self.p - 1
        self.seconds: dict[str, list[float]] = {}   # per action kind: compute seconds
        self.sent_bytes = 0   # to the neighbouring stages, activations and gradients

    def env(self, micro: dict[str, np.ndarray]) -> dict[str, int]:
        """The sizes of the model's symbolic dims in this micro-batch."""
        names = [n for n in self.stage.model_inputs if n in micro]
        try:
            return bind_shapes([self.stage.model_inputs[n] for n in names],
                               [micro[n] for n in names], names)
        except InputError as e:
            raise PipelineError(f"a micro-batch does not fit the stages ({e}): trace the "
                                "model symbolically or at the micro-batch's size") from None

    def recv(self, graph: Graph, names: list[str], env, source: int) -> dict[str, np.ndarray]:
        vals = graph.values()
        return {n: self.comm.recv(vals[n].type.concrete(env).shape, vals[n].type.np_dtype,
                                  source) for n in names}

    def send(self, arrays: list[np.ndarray], dest: int) -> None:
        for a in arrays:
            self.comm.send(np.ascontiguousarray(a), dest)
            self.sent_bytes += a.nbytes

    def originals(self, graph: Graph, micro: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {v.name: micro[v.name] for v in graph.inputs if v.name in micro}

    def timed(self, kind: str, exe, feeds: dict) -> dict:
        """Run one action, keeping its compute time (not the wait for its inputs)."""
        t0 = time.perf_counter()
        out = exe.run(feeds)
        self.seconds.setdefault(kind, []).append(time.perf_counter() - t0)
        return out

    def measured_timeline(self, micro_batches: int, backward: bool = True) -> Timeline:
        """The schedule simulated with each stage's measured forward (and backward) time
        per micro-batch: the median of the runs so far (a first call also binds shapes).
        A collective over the pp group: every rank calls it. Durations only, no
        timestamps: ranks on different hosts share no clock."""
        mine = np.array([[np.median(self.seconds.get(k, [np.nan])) for k in "FB"]])
        costs = self.comm.all_gather(mine, 0) if self.p > 1 else mine
        return simulate(self.schedule(self.p, micro_batches, backward=backward),
                        list(costs[:, 0]), list(costs[:, 1]) if backward else None)


class PipelineForward(_Rank):
    """Inference on one rank: `run(inputs, micro_batches)` runs this rank's stage on each
    micro-batch in schedule order and returns the model's outputs (on every rank)."""

    def __init__(self, stages: list[Stage], groups, schedule: str = "1f1b",
                 compile_stage: Callable[[Graph], object] | None = None):
        super().__init__(stages, groups, schedule)
        self.exe = (compile_stage or default_compile())(self.stage.graph)

    def run(self, inputs: dict[str, np.ndarray], micro_batches: int = 1
            ) -> dict[str, np.ndarray]:
        micro = split_batch(inputs, micro_batches)
        env = self.env(micro[0])
        g, got = self.stage.graph, []
        for a in self.schedule(self.p, micro_batches, backward=False)[self.s]:
            mb = micro[a.micro]
            feeds = self.originals(g, mb)
            if self.s > 0:
                feeds.update(self.recv(g, self.stage.recv, self.env(mb), self.s - 1))
            out = self.timed("F", self.exe, feeds)
            if self.last:
                got.append(out)
            else:
                self.send([out[n] for n in self.stage.send], self.s + 1)
        # the last stage's outputs, concatenated, to every rank of the group
        final = self.stages[-1].graph.outputs
        result = {}
        for v in final:
            if self.last:
                whole = np.concatenate([o[v.name] for o in got])
            else:
                shape = v.type.concrete(env).shape
                whole = np.empty((shape[0] * micro_batches, *shape[1:]), v.type.np_dtype)
            result[v.name] = self.comm.broadcast(whole, self.p - 1) if self.p > 1 else whole
        return result


def run_forward(stages: list[Stage], inputs: dict[str, np.ndarray], groups,
                micro_batches: int = 1, schedule: str = "1f1b",
                compile_stage: Callable[[Graph], object] | None = None
                ) -> dict[str, np.ndarray]:
    """Run the pipeline once on this rank (see `PipelineForward`)."""
    return PipelineForward(stages, groups, schedule, compile_stage).run(inputs, micro_batches)


# --- training ---------------------------------------------------------------------------

COTANGENT = "cot."   # a backward graph's input: the gradient of the stage output it names


def backward_graph(stage: Stage, scale: float = 1.0) -> Graph:
    """The stage's backward, its forward recomputed inside (re-materialisation): inputs
    the stage's own, plus ``cot.<name>`` per float output it sends; outputs
    ``grad.<name>`` for each weight it reads and each float activation it receives.
    It differentiates sum(output * cotangent), or on the last stage the loss times
    `scale` (1/m: micro-batch gradients then add up to the whole batch's mean)."""
    from ..passes.autodiff import grad
    from ..passes.rewrite import copy_graph, dce
    g = copy_graph(stage.graph)
    if not stage.send:
        (loss,) = g.outputs
        target = g.add("mul", loss, g.add_constant(g.fresh_name("micro.scale"),
                                                   np.asarray(scale, loss.type.np_dtype)))
    else:
        terms = [g.add("reduce_sum", g.add("mul", v, g.add_input(COTANGENT + v.name, v.type)))
                 for v in g.outputs if v.type.dtype in FLOAT_DTYPES]
        target = terms[0]
        for t in terms[1:]:
            target = g.add("add", target, t)
    g.rename(target, g.fresh_name("stage.target"))
    g.outputs = [target]
    wrt = stage.params + [n for n in stage.recv if _is_float(stage.graph, n)]
    g = grad(g, target.name, wrt)
    g.outputs = g.outputs[1:]
    dce(g)
    return g.verify()


def _is_float(graph: Graph, name: str) -> bool:
    return graph.values()[name].type.dtype in FLOAT_DTYPES


class PipelineStep(_Rank):
    """`training.TrainStep` on one rank of a pipeline: `step(batch)` -> (loss, {name:
    gradient}) for the weights of this rank's stage (`params`, shared with the model, so
    `train_steps` and the optimizers take it as they take a TrainStep). The batch is
    split into `micro_batches`; the gradients are the whole batch's, the loss its mean
    (on every rank). A weight read by several stages (a tied embedding) gets the sum of
    their gradients on each. On a mesh with dp replicas (each with its own rows of the
    batch, equal label counts assumed) the gradients and loss are averaged over dp.
    `clip`: gradients scaled to this global L2 norm over every stage (as
    `optim.clip_grad_norm` on the whole model; train_steps' own clipping sees one stage's
    gradients only, already within the norm then); the norm is kept in `grad_norm`.
    On a mesh with tp, each stage's forward and backward graphs are sharded over the
    rank's tp group as `passes.shard.plan_step` shards a step (`specs`: each split weight
    and its gradient; `params` then this rank's slices of them, copies), a weight several
    stages read split alike on each (the tied embedding and head)."""

    def __init__(self, model, task, batch: dict[str, np.ndarray], groups,
                 micro_batches: int = 1, schedule: str = "1f1b", backend: str = "numpy",
                 compile_stage: Callable[[Graph], object] | None = None,
                 clip: float | None = None):
        from ..passes import run_pipeline
        from ..passes.autodiff import GRAD_PREFIX, as_inputs
        from ..training import FORWARD_PASSES, loss_graph
        self.micro_batches, self.grad_prefix, self.clip = micro_batches, GRAD_PREFIX, clip
        self.grad_norm = float("nan")
        first = split_batch(batch, micro_batches)[0]
        graph, names = loss_graph(model, task, first)
        graph = run_pipeline(as_inputs(graph, names), FORWARD_PASSES)
        p = groups.group("pp").size
        super().__init__(cut(graph, p, weights=names), groups, schedule)
        mesh = getattr(groups, "mesh", None)
        self.dp = groups.group("dp") if mesh is not None and mesh.dp > 1 else None
        self.tp = groups.group("tp") if mesh is not None and mesh.tp > 1 else None
        self.names = self.stage.params
        held = [set(st.params) for st in self.stages]
        self.shared = sorted(n for n in set().union(*held) if sum(n in h for h in held) > 1)
        fwd, bwd = self.stage.graph, backward_graph(self.stage, 1.0 / micro_batches)
        self.specs, self.split, self.plan = {}, {}, None
        if self.tp is not None:
            fwd, bwd = self._shard(fwd, bwd, mesh.tp)
        compile_stage = compile_stage or default_compile(
            backend, "O2-local" if self.tp is not None else "O2")
        self.fwd, self.bwd = compile_stage(fwd), compile_stage(bwd)
        arrays = dict(model.named_parameters())
        self.params = {}
        for n in self.names:   # one contiguous f32 array per weight, shared with the model
            # (a weight split over tp: this rank's slice, a copy)
            p_ = arrays[n]
            p_.data = np.ascontiguousarray(p_.data, np.float32)
            self.params[n] = self.part(n, p_.data)
        self.shapes = {n: self.split[n].local_shape(arrays[n].data.shape, self.plan.mesh)
                       if n in self.split else arrays[n].data.shape for n in self.shared}
        self.float_recv = [n for n in self.stage.recv if _is_float(self.stage.graph, n)]
        self.float_send = [n for n in self.stage.send if _is_float(self.stage.graph, n)]

    def _shard(self, fwd: Graph, bwd: Graph, tp: int) -> tuple[Graph, Graph]:
        """This rank's parts of the stage's forward and backward over its tp group:
        `passes.shard.step_specs` on every stage (a weight several stages read takes the
        split any of them gives it, alike on all), then `plan` with those specs."""
        from ..mesh import Mesh
        from ..passes.autodiff import GRAD_PREFIX
        from ..passes.shard import plan, prepare, step_specs
        mesh = Mesh(tp=tp)
        for st in self.stages:   # self.split: every stage's split weights (and gradients)
            for n, spec in step_specs(prepare(st.graph), st.params, mesh).items():
                if self.split.setdefault(n, spec) != spec:
                    raise PipelineError(f"weight {n!r} is split over tp as {self.split[n]} "
                                        f"on one stage and as {spec} on another")
        self.specs = {n: self.split[n] for n in self.names if n in self.split}
        grads = {GRAD_PREFIX + n: s for n, s in self.specs.items()}
        self.plan = plan(fwd, mesh, None, self.specs)
        rank = self.tp.rank
        return self.plan.local(rank), plan(bwd, mesh, None, {**self.specs, **grads}).local(rank)

    def part(self, name: str, whole: np.ndarray) -> np.ndarray:
        """This rank's part of weight `name` (or of its gradient, its optimizer state):
        its slice over tp where the weight is split, else the whole array."""
        if name not in self.specs:
            return whole
        (got,) = self.plan.local_inputs({name: whole}, self.tp.rank).values()
        return np.ascontiguousarray(got, np.float32)

    def counted(self, name: str) -> bool:
        """Whether this stage counts weight `name` in the global norm (a shared weight:
        on its owner only)."""
        return name not in self.shared or self.owner(name) == self.s

    def __call__(self, batch: dict[str, np.ndarray]):
        micro = split_batch(batch, self.micro_batches)
        self.env(micro[0])   # a batch of another size fails here, in one line
        g, s = self.stage.graph, self.s
        grads = {n: np.zeros_like(a) for n, a in self.params.items()}
        kept: dict[int, dict] = {}   # per micro-batch in flight: the activations received
        loss = 0.0
        for a in self.schedule(self.p, self.micro_batches)[s]:
            mb = micro[a.micro]
            if a.kind == "F":
                got = self.recv(g, self.stage.recv, self.env(mb), s - 1) if s > 0 else {}
                out = self.timed("F", self.fwd, {**self.originals(g, mb), **got, **self.params})
                if self.last:
                    loss += float(out["loss"]) / self.micro_batches
                else:
                    self.send([out[n] for n in self.stage.send], s + 1)
                kept[a.micro] = got
                continue
            cot = {} if self.last else {
                COTANGENT + n: x for n, x in
                self.recv(g, self.float_send, self.env(mb), s + 1).items()}
            out = self.timed("B", self.bwd, {**self.originals(g, mb), **kept.pop(a.micro), **cot,
                                **self.params})
            for n in grads:
                grads[n] += out[self.grad_prefix + n]
            if s > 0:
                self.send([out[self.grad_prefix + n] for n in self.float_recv], s - 1)
        for n in self.shared:   # every rank of the group takes part, holding it or not
            mine = grads.get(n, np.zeros(self.shapes[n], np.float32))
            total = self.comm.all_reduce(mine)
            if n in grads:
                grads[n] = total
        if self.p > 1:
            loss = float(self.comm.broadcast(np.asarray(loss, np.float64), self.p - 1))
        if self.dp is not None:   # dp replicas of the pipeline: the mean of their rows'
            scale = np.float32(1 / self.dp.size)
            for n in grads:   # one all_reduce per gradient (not bucketed)
                grads[n] = self.dp.all_reduce(grads[n]) * scale
            loss = float(self.dp.all_reduce(np.asarray(loss, np.float64))) / self.dp.size
        if self.clip is not None:
            self.clip_grad_norm(grads, self.clip)
        return loss, grads

    def owner(self, name: str) -> int | None:
        """The first stage that holds weight `name` (None: no stage reads it)."""
        return min((st.index for st in self.stages if name in st.params), default=None)

    def clip_grad_norm(self, grads: dict[str, np.ndarray], max_norm: float) -> float:
        """optim.clip_grad_norm by the global norm over every stage (a shared weight
        counted once: on its owner; a weight split over tp, its slices' squares summed
        over the tp group); returns it, kept in `grad_norm` too."""
        from ..optim import _sum_squares, clip_grad_norm, sum_over_split
        others = sum(_sum_squares(g) for n, g in grads.items() if not self.counted(n))
        over_tp = sum_over_split(self.tp, {n: g for n, g in grads.items()
                                           if n in self.specs and self.counted(n)}) \
            if self.tp is not None else (lambda s: s)

        def total(s: float) -> float:
            s = over_tp(s - others)
            return float(self.comm.all_reduce(np.asarray(s, np.float64))) if self.p > 1 \
                else s
        self.grad_norm = clip_grad_norm(grads, max_norm, sum_over=total)
        return self.grad_norm
