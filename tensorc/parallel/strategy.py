"""Training on a mesh: the parallel strategy the mesh decides, the object `training.fit`
calls (`fit(..., parallel=)`). Every strategy speaks one interface:

- `writer`: whether this rank prints, evaluates and writes checkpoints (rank 0);
- `shard(batch)`: this rank's part of the batch every rank drew alike;
- `step(model, task, batch, backend, distill, recompute, qat)`: a `TrainStep`-like
  object (`params`, `step(batch) -> (loss, grads)`), the loss the whole batch's;
- `optimizer(params, make)`, `clip_grad_norm(grads, max_norm)` (the global norm);
- `gather(model, params)`: the whole weights (every rank takes part), also put into
  `model` so that the writer evaluates the whole model;
- `save_checkpoint(...)` (the whole optimizer state gathered, rank 0 writes) and
  `restore(checkpoint, params, optimizer, rng)` (this rank's part of a whole one).

Strategies: `DataParallel` (`data_parallel.py`: dp, with ZeRO-1), `TensorParallel`
(tp, or tp x dp: `passes.shard.plan_step`'s sharded step, each rank updating its slices
of the split weights) and `PipelineParallel` (pp, pp x dp, and with tp too:
`pipeline.PipelineStep`, each stage updating its own weights, or on tp its rank's slices
of them); `parallel.strategy_for` picks one for a rank.
`check_mesh` refuses the rest before any rank starts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import TensorcError
from ..mesh import Mesh, Sharding
from .comm import MeshGroups

# tasks whose loss counts every label: a mean over dp's equal rows is the whole batch's
EVERY_LABEL_TASKS = ("clm", "classify")


def check_mesh(mesh: Mesh, batch_size: int | None = None, task: str | None = None,
               zero: bool = False, micro_batches: int = 1) -> None:
    """The errors a training mesh meets, before any rank starts (one line each)."""
    if zero and (mesh.tp > 1 or mesh.pp > 1):
        raise TensorcError(f"--zero shards the optimizer over dp only; mesh {mesh} has "
                           f"{'tp' if mesh.tp > 1 else 'pp'}")
    if (mesh.tp > 1 or mesh.pp > 1) and mesh.dp > 1 and task is not None \
            and task not in EVERY_LABEL_TASKS:
        raise TensorcError(f"training {task} on {'tp' if mesh.tp > 1 else 'pp'} x dp is not "
                           "supported (its dp ranks may count different labels); give dp "
                           "alone")
    if micro_batches > 1 and mesh.pp == 1:
        raise TensorcError("--micro-batches splits the batch over pipeline stages: give "
                           "--mesh pp=N")
    if batch_size is not None:
        if batch_size % mesh.dp:
            raise TensorcError(f"batch {batch_size} does not split over dp={mesh.dp}: "
                               "give a multiple")
        if batch_size // mesh.dp % micro_batches:
            raise TensorcError(f"batch {batch_size} does not split into dp={mesh.dp} x "
                               f"{micro_batches} micro-batches: give a multiple")


def _refuse(what: str, model, distill, recompute, qat) -> None:
    """What a tp or pp step does not do (checked on every rank alike, before any step)."""
    for flag, name in ((model.config.dropout, "dropout (train with --set dropout=0)"),
                       (distill, "distillation"), (recompute, "--recompute"), (qat, "--qat")):
        if flag:
            raise TensorcError(f"{what} training does not support {name}")


@dataclasses.dataclass
class _Snapshot:
    """Whole optimizer state gathered for a checkpoint (`optim.save_checkpoint` takes it)."""

    state: dict
    hyper_: dict

    def state_dict(self):
        return self.state

    def hyper(self):
        return self.hyper_


class _Strategy:
    """What the tp and pp strategies share: rank 0 writes; a checkpoint holds the whole
    weights and optimizer state (`_whole`, per name, a collective), and `restore` takes a
    whole checkpoint's part for this rank (`_part`)."""

    def __init__(self, groups: MeshGroups):
        self.groups, self.mesh = groups, groups.mesh
        self.writer = groups.rank == 0

    def shard(self, batch):
        """This rank's rows of the batch: its dp replica's (tp ranks and stages alike)."""
        dp, at = self.mesh.dp, self.groups.coords["dp"]
        return {k: (np.split(a, dp)[at] if np.ndim(a) else a) for k, a in batch.items()}

    def optimizer(self, params, make):
        return make(params)

    def gather(self, model, params) -> dict[str, np.ndarray]:
        whole = {}
        for n, p in model.named_parameters():
            whole[n] = self._whole(n, params.get(n), p.data)
            if params.get(n) is not p.data:   # (an array the optimizer updates stays)
                p.data = whole[n]
        return whole

    def save_checkpoint(self, directory, params, optimizer, step, extra=None, **kw):
        from ..optim import save_checkpoint
        state = optimizer.state_dict()
        whole = {}
        for k in optimizer.STATE:   # the same keys, in the same order, on every rank
            for n, p in self._named:
                got = state.get(f"{k}.{n}")
                whole[f"{k}.{n}"] = self._whole(n, got, np.zeros(p.shape, np.float32))
        if self.writer:
            save_checkpoint(directory, params, _Snapshot(whole, optimizer.hyper()), step,
                            extra, **kw)

    def restore(self, ck, params, optimizer, rng) -> None:
        part = dataclasses.replace(
            ck, params={n: self._part(n, ck.params[n]) for n in params if n in ck.params},
            optimizer_state={k: self._part(k.split(".", 1)[1], a)
                             for k, a in ck.optimizer_state.items()
                             if k.split(".", 1)[1] in params})
        part.restore(params, optimizer, rng)

    def _whole(self, name, mine, like):
        raise NotImplementedError

    def _part(self, name, whole):
        raise NotImplementedError


def _split_dim(spec: Sharding | None) -> int | None:
    """The dim a weight's spec splits over tp (None: replicated)."""
    return next((d for d, ax in enumerate(spec.dims if spec else ()) if ax is not None), None)


def _gather_tp(tp, spec: Sharding | None, mine):
    """The whole of a weight (or its optimizer state) from this rank's slice: all-gathered
    over the tp group along the dim `spec` splits (a collective of the group)."""
    d = _split_dim(spec)
    return mine if d is None else tp.all_gather(np.ascontiguousarray(mine), d)


class TensorParallel(_Strategy):
    """Tensor-parallel training (Megatron), with dp replicas if the mesh has them: the
    step is `plan_step`'s, each rank holding and updating its slices of the split weights
    (and their optimizer state), the gradients of dp replicas summed in the step graph."""

    def __init__(self, groups: MeshGroups):
        super().__init__(groups)
        self.tp = groups.group("tp")
        self.specs: dict[str, Sharding] = {}
        self.plan = None

    def step(self, model, task, batch, backend="llvm", distill=None, recompute=False,
             qat=False):
        _refuse("tensor-parallel", model, distill, recompute, qat)
        return _ShardedStep(self, model, task, batch, backend)

    def clip_grad_norm(self, grads, max_norm):
        """optim.clip_grad_norm by the global norm: a split weight's squares summed over
        the tp group, a replicated one's counted once."""
        from ..optim import clip_grad_norm, sum_over_split
        return clip_grad_norm(grads, max_norm, sum_over=sum_over_split(
            self.tp, {n: g for n, g in grads.items() if _split_dim(self.specs.get(n))
                      is not None}))

    def _whole(self, name, mine, like):
        return _gather_tp(self.tp, self.specs.get(name), mine)

    def _part(self, name, whole):
        (got,) = self.plan.local_inputs({name: whole}, self.groups.rank).values()
        return np.ascontiguousarray(got, np.float32)


class _ShardedStep:
    """One rank's compiled step of `plan_step`: `params` its slices (copies: the model
    keeps whole weights, the writer's evaluation reads them after `gather`)."""

    def __init__(self, tp: TensorParallel, model, task, batch, backend):
        from ..backends import get_backend
        from ..passes import run_pipeline
        from ..passes.autodiff import as_inputs
        from ..passes.shard import plan_step
        from ..training import loss_graph
        whole = {k: (np.concatenate([a] * tp.mesh.dp) if np.ndim(a) else a)
                 for k, a in batch.items()}   # the shapes plan_step splits over dp
        forward, names = loss_graph(model, task, whole)
        tp.plan = plan_step(as_inputs(forward, names), "loss", names, tp.mesh)
        specs = tp.plan.input_specs()
        tp.specs = {n: specs[n] for n in names}
        tp._named = [(n, p.data) for n, p in model.named_parameters()]
        graph = run_pipeline(tp.plan.local(tp.groups.rank), "O2-local")
        self.exe = get_backend(backend).compile(graph)
        self.names = names
        self.params = {n: tp._part(n, p.data) for n, p in model.named_parameters()}
        self.batch_names = [v.name for v in graph.inputs if v.name not in self.params]

    def __call__(self, batch):
        from ..passes.autodiff import GRAD_PREFIX
        out = self.exe.run({**{n: batch[n] for n in self.batch_names}, **self.params})
        return float(out["loss"]), {n: out[GRAD_PREFIX + n] for n in self.names}


class PipelineParallel(_Strategy):
    """Pipeline-parallel training, with dp replicas if the mesh has them:
    `pipeline.PipelineStep` (`micro_batches`, `schedule`) on this replica's rows, each
    stage updating the weights it holds (tied ones all-reduced over pp, every gradient
    averaged over dp by the step); the whole weights are broadcast over pp from the first
    stage holding each. With tp the stages are sharded over it (`PipelineStep`): a rank
    updates its slices, gathered over tp (as `TensorParallel` does) before that broadcast."""

    def __init__(self, groups: MeshGroups, micro_batches: int = 1, schedule: str = "1f1b"):
        super().__init__(groups)
        self.pp = groups.group("pp")
        self.micro_batches, self.schedule = micro_batches, schedule
        self.pipe = None

    def step(self, model, task, batch, backend="llvm", distill=None, recompute=False,
             qat=False):
        from .pipeline import PipelineStep
        _refuse("pipeline", model, distill, recompute, qat)
        self._named = [(n, p.data) for n, p in model.named_parameters()]
        self.pipe = PipelineStep(model, task, batch, self.groups, self.micro_batches,
                                 self.schedule, backend)
        return self.pipe

    def clip_grad_norm(self, grads, max_norm):
        return self.pipe.clip_grad_norm(grads, max_norm)

    def _whole(self, name, mine, like):
        owner = self.pipe.owner(name)
        if owner is None:   # read by no stage: never trained, alike everywhere
            return like
        if self.pipe.s == owner and self.pipe.tp is not None:   # its tp group alike
            mine = _gather_tp(self.pipe.tp, self.pipe.specs.get(name), mine)
        return self.pp.broadcast(np.ascontiguousarray(mine if self.pipe.s == owner else like,
                                                      np.float32), owner)

    def _part(self, name, whole):
        return self.pipe.part(name, whole)
