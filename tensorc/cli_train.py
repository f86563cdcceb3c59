"""The training commands of the CLI: `train`, `distill` (a student from a teacher's soft
targets) and `prune` (structured pruning, measured and recovered). `cli.build_parser`
adds them with its `command` maker and parent parsers."""

from __future__ import annotations

import json
import sys

from .cli_args import (
    _Parser,
    _positive_int,
    _table,
    add_mesh_arguments,
    parse_overrides,
    start_mesh,
)
from .errors import TensorcError


def add_commands(command, common, trained) -> None:
    """The subcommands, made with `cli.build_parser`'s `command` and parent parsers."""
    train_args = _Parser(add_help=False)
    t = train_args.add_argument_group("training")
    t.add_argument("--task", choices=("clm", "mlm", "classify", "translate"),
                   help="what to learn (default: clm for gpt/llama, mlm for bert, classify "
                        "for vit, translate for transformer)")
    t.add_argument("--steps", type=_positive_int, default=200)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps before the cosine decay (default: steps / 10)")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip", type=float, default=1.0, help="global gradient norm (0: none)")
    t.add_argument("--accumulate", type=_positive_int, default=1,
                   help="micro-batches per optimizer step")
    t.add_argument("--data", metavar="PATH", help="text for clm/mlm: a file, or a folder "
                   "of .py/.txt/.md/.rst files (default: the Python standard library's "
                   "source); cleaned and split by file like the default")
    t.add_argument("--data-bytes", type=_positive_int, default=2_000_000,
                   help="how much text clm/mlm read (default 2 MB)")
    t.add_argument("--backend", default="llvm", help="backend (default: llvm)")
    t.add_argument("-o", "--output", metavar="DIR", help="checkpoint directory (written at "
                   "every evaluation and at the end)")
    t.add_argument("--resume", metavar="DIR", help="continue from a checkpoint")
    t.add_argument("--init", metavar="DIR", help="start from a checkpoint's weights with a "
                   "new optimizer and schedule (fine-tuning, e.g. with --qat)")
    t.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate on held-out data every N steps (always at the end)")
    t.add_argument("--metrics", metavar="FILE.jsonl", help="append one JSON object per step")
    t.add_argument("--plot", metavar="FILE.png", help="write the loss curve (matplotlib)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--recompute", action="store_true",
                   help="recompute cheap activations (gelu, layer norm) in the backward "
                        "instead of keeping them: less memory")
    t.add_argument("--qat", action="store_true",
                   help="quantization-aware: train through int8 rounding (fake quantization, "
                        "straight-through gradients); run the result with --passes O2,quantize")
    add_mesh_arguments(t, "train on this device mesh: dp=N (each rank trains on batch/N "
                          "rows), tp=N (Megatron, with dp too) or pp=N (pipeline stages); "
                          "the result is the single-process run's")
    t.add_argument("--zero", action="store_true",
                   help="with --mesh dp=N: shard the optimizer state over the ranks (ZeRO-1)")
    t.add_argument("--bucket-mb", type=float, default=25.0, metavar="MB",
                   help="with --mesh: gradients all-reduced together, per message (default 25)")

    command("train", cmd_train, "train a built-in model on bundled data",
            parents=(common, trained, train_args))
    sp = command("distill", cmd_train, "train a student from a teacher checkpoint's soft "
                 "targets", parents=(common, trained, train_args))
    sp.add_argument("--teacher", metavar="DIR", required=True,
                    help="checkpoint of the teacher (`tensorc train -o DIR`)")
    sp.add_argument("--temperature", type=float, default=1.0,
                    help="softens both distributions (default 1: on stdlib bytes, 2 did worse "
                         "than no teacher; see docs/training.md)")
    sp.add_argument("--alpha", type=float, default=0.5,
                    help="weight of the soft (teacher) loss; 1 - alpha on the labels")
    sp = command("prune", cmd_prune, "remove attention heads, feed-forward neurons or "
                 "layers, and recover by fine-tuning or distillation", parents=(common, trained))
    sp.add_argument("--heads", type=float, default=0.0, help="share of heads to remove")
    sp.add_argument("--ffn", type=float, default=0.0, help="share of FFN neurons to remove")
    sp.add_argument("--layers", type=int, default=0, help="whole layers to remove")
    sp.add_argument("--by", choices=("magnitude", "activation", "taylor"), default="taylor",
                    help="importance that picks what goes (default: taylor, on held-out "
                         "batches of the task)")
    sp.add_argument("--task", choices=("clm", "mlm", "classify"),
                    help="data to measure and recover on (default: the model's)")
    sp.add_argument("--recover", choices=("finetune", "distill"),
                    help="train the pruned model: on the labels, or also on the unpruned "
                         "model's logits")
    sp.add_argument("--steps", type=_positive_int, default=200, help="recovery steps")
    sp.add_argument("--lr", type=float, default=5e-4, help="recovery learning rate")
    sp.add_argument("--data-bytes", type=_positive_int, default=4_000_000,
                    help="text clm/mlm read (default 4 MB, as tools/train_checkpoints.py)")
    sp.add_argument("--backend", default="llvm", help="backend (default: llvm)")
    sp.add_argument("--format", choices=("text", "json"), default="text")
    sp.add_argument("-o", "--output", metavar="FILE",
                    help="write the pruned (recovered) model as an artifact")


def cmd_train(args) -> int:
    from tensorc.models import MODELS
    from tensorc.parallel import launch
    from tensorc.training import DEFAULT_TASKS
    if args.mesh:   # checked here: one error, not one per rank
        from tensorc.mesh import Mesh
        from tensorc.parallel.strategy import check_mesh
        check_mesh(Mesh.parse(args.mesh), args.batch or 8,
                   args.task or DEFAULT_TASKS.get(args.model), args.zero, args.micro_batches)
    _, code = start_mesh(args)
    if code is not None:   # ran as MPI processes
        return code
    reporter = launch.mpiexec_rank() == 0   # under mpiexec, rank 0's process reports
    from tensorc.training import Run, TrainConfig, plot_losses
    if args.model not in MODELS:
        raise TensorcError(f"{args.command} takes a built-in model ({', '.join(MODELS)}); "
                           f"got {args.model}")
    if args.init and args.resume:
        raise TensorcError("--init starts a new run from a checkpoint's weights, --resume "
                           "continues one: give one of them")
    task = args.task or DEFAULT_TASKS[args.model]
    cfg = TrainConfig(steps=args.steps, lr=args.lr, optimizer=args.optimizer,
                      warmup=args.steps // 10 if args.warmup is None else args.warmup,
                      weight_decay=args.weight_decay, clip=args.clip or None,
                      accumulate=args.accumulate, seed=args.seed or 0,
                      recompute=args.recompute, qat=args.qat)
    run = Run(args.model, args.preset or "tiny", parse_overrides(args.set), task,
              batch=args.batch or 8, seq=args.seq or 64, data_bytes=args.data_bytes,
              data=args.data,
              backend=args.backend, out=args.output, eval_every=args.eval_every,
              teacher=getattr(args, "teacher", None), init=args.init,
              temperature=getattr(args, "temperature", 1.0), alpha=getattr(args, "alpha", 0.5))
    records: list[dict] = []
    bar = None
    if not args.quiet and reporter:
        try:   # tqdm: a progress bar with loss, tokens/s and the ETA (the train extra)
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, unit="step", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    metrics = open(args.metrics, "a") if args.metrics and reporter else None  # noqa: SIM115

    def on_step(r):
        records.append(r)
        if metrics:
            metrics.write(json.dumps(r) + "\n")
            metrics.flush()
        if bar is not None:
            if bar.n == 0 and r["step"] > 1:
                bar.update(r["step"] - 1)   # resumed
            bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=f"{r['tokens_per_s']:.0f}")
            bar.update(1)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r.items()
                          if k in ("val_loss", "bits_per_byte", "val_accuracy", "bleu"))
        if shown:
            (bar.write if bar is not None else print)(f"step {r['step']}: {shown}")
    def on_data(lines):
        print("\n".join(lines), file=sys.stderr)
    try:
        last = _fit_on_mesh(args, run, cfg, on_step, on_data)
    finally:
        if metrics:
            metrics.close()
        if bar is not None:
            bar.close()
    if last is None:   # under mpiexec, a rank other than 0: rank 0 reports
        return 0
    if args.plot and records:
        plot_losses(records, args.plot)
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    print(json.dumps({"model": args.model, "task": task, "steps": last["step"], **shown,
                      "checkpoint": args.output}))
    return 0


def _fit_on_mesh(args, run, cfg, on_step, on_data) -> dict:
    """fit, on one rank or on every rank of `--mesh` (rank 0 reports and writes)."""
    from tensorc.mesh import Mesh
    from tensorc.parallel import launch
    from tensorc.training import fit
    mesh = Mesh.parse(args.mesh) if args.mesh else Mesh()
    if mesh.size == 1:
        if args.zero:
            raise TensorcError("--zero shards the optimizer over --mesh dp=N ranks; give one")
        if args.micro_batches > 1:
            raise TensorcError("--micro-batches splits the batch over pipeline stages: give "
                               "--mesh pp=N")
        return fit(run, cfg, args.resume, on_step, on_data)
    from tensorc.parallel import strategy_for

    def rank(groups):
        par = strategy_for(groups, args.zero, args.bucket_mb, args.micro_batches, args.schedule)
        return fit(run, cfg, args.resume, on_step if par.writer else None,
                   on_data if par.writer else None, parallel=par)
    return launch.run_ranks(mesh, rank).get(0)


def cmd_prune(args) -> int:
    """Prune heads, FFN neurons or layers; print what it saved and cost, before and
    after recovery."""
    from tensorc import pruning
    from tensorc.artifact import save_artifact
    from tensorc.passes import run_pipeline
    src = pruning.load(args.model, args.preset, parse_overrides(args.set), args.task)
    seq = args.seq or 128
    spec = f"prune:heads={args.heads}:ffn={args.ffn}:layers={args.layers}:by={args.by}"
    data = pruning.calibration(src.task, seq=seq, data_bytes=args.data_bytes) \
        if args.by != "magnitude" else None
    pruned = run_pipeline(src.graph, spec, options={"prune": {"data": data}})
    rows = {"unpruned": src.graph, "pruned": pruned}
    if args.recover:
        rows["recovered"], _ = pruning.recover(
            pruned, src.graph, src.task, args.steps, distill=args.recover == "distill",
            batch=args.batch or 16, seq=seq, lr=args.lr, data_bytes=args.data_bytes,
            backend=args.backend)
    report = []
    for label, g in rows.items():
        metrics = pruning.evaluate(g, src.task, seq, args.data_bytes, args.backend)
        report.append({"model": label, **pruning.size(g, 1, seq), **metrics})
    if args.output:
        inputs = pruning.calibration(src.task, 1, 1, seq, args.data_bytes)[0]
        save_artifact(args.output, rows.get("recovered", pruned), inputs,
                      {"name": f"{src.name} pruned", "pruned": spec})
    if args.format == "json":
        print(json.dumps({"model": src.name, "task": src.task, "passes": spec,
                          "rows": report}, indent=2))
        return 0
    keys = [k for k in report[0] if k != "model"]
    print(_table([["model", *keys]] + [[r["model"], *(f"{r[k]:.4g}" if isinstance(r[k], float)
                                                     else str(r[k]) for k in keys)]
                                       for r in report]), end="")
    if args.output:
        print(f"wrote {args.output}")
    return 0
