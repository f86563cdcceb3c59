"""Training step time: tensorc (llvm, numpy) vs PyTorch eager (Hugging Face GPT-2).

    python benchmarks/train.py [--preset small] [--batch 8] [--seq 128] [--threads 2]
        [--repeat 3] [--rounds 5] [--engines llvm,torch,numpy] [--numpy-preset PRESET]
        [--parity-steps 10] [--profile] [--baseline CHECKOUT]

One training step = forward + backward + AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 0.01 on every weight, as torch.optim.AdamW over `model.parameters()`), on
GPT `--preset` (small: 6 layers, d 512, 8 heads, d_ff 2048, vocab 8192), next-token
labels, the same weights and the same batch everywhere:

- tensorc: `TrainStep` (the loss graph with its gradient, compiled once) and
  `tensorc.optim.AdamW` (one generated in-place update, on the same backend) on the
  weight arrays.
- torch: `transformers.GPT2LMHeadModel` with the same config (sdpa attention, no dropout,
  tied embeddings, tanh gelu, layer-norm eps 1e-5) and tensorc's weights copied in
  (its Conv1D weights are [in, out] like tensorc's Linear; c_attn is q, k, v side by
  side); the loss is cross-entropy of its logits against the unshifted labels (ignore
  index -100), as tensorc's; `torch.optim.AdamW`.

Each engine runs in its own worker process (`engines.py`), every engine on `--threads`
threads (TENSORC_NUM_THREADS, OMP/OPENBLAS_NUM_THREADS, torch.set_num_threads); they
take turns, `--repeat` steps each per round after one untimed step, for `--rounds`
rounds. Prints medians per step: the whole step, forward + backward, the optimizer;
ratios against PyTorch; and each round's median step, the best of them compared
with PyTorch's best, and the median over rounds of the ratio to PyTorch's step in the
same round (the 2 cores here are shared: a burst of load in one round should not
decide a comparison). The numpy backend runs every node through its numpy reference
and is slow (seconds a step on GPT small): it takes one timed step per round and no
untimed one, on `--numpy-preset` (default: `--preset`).

Parity: `--parity-steps` AdamW steps of tensorc (llvm) and of the PyTorch model from the
same weights on the same fresh random batches, in this process; prints the largest
relative difference of the losses (tests/test_torch_parity.py checks 50 steps of a tiny
GPT). `--profile`: where tensorc's step spends its time, per kind of Program step.
`--baseline CHECKOUT` adds an "llvm_baseline" engine running tensorc from another source
checkout (e.g. `git archive main | tar -x -C /tmp/main`), in the same rounds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

import numpy as np
from engines import cpu_model, has, start_engines, take_turns  # beside this script
from torch_peer import hf_gpt2

from tensorc.optim import AdamW

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01


def _threads() -> int:
    return int(os.environ["TENSORC_NUM_THREADS"])


def build(preset: str, batch: int, seq: int, seed: int = 0):
    """The tensorc model and a next-token batch (`seed` picks the tokens)."""
    import tensorc.models
    model = tensorc.models.get("gpt", preset, seed=0)
    return model, make_batch(model.config.vocab_size, batch, seq, seed)


def make_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1))
    return {"input_ids": np.ascontiguousarray(ids[:, :-1]),
            "labels": np.ascontiguousarray(ids[:, 1:])}


def adamw(params: dict, backend: str):
    return AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                 backend=backend), f"tensorc.optim.AdamW ({backend})"


def torch_trainer(model):
    """step(batch) -> (loss, forward+backward s, optimizer s) for the PyTorch peer."""
    import torch
    hf = hf_gpt2(model)
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=WEIGHT_DECAY)

    def step(batch):
        ids, labels = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["labels"])
        t0 = time.perf_counter()
        logits = hf(ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        return loss.item(), t1 - t0, time.perf_counter() - t1
    return step


def tensorc_trainer(model, batch, backend: str):
    """(step(batch) -> (loss, forward+backward s, optimizer s), the optimizer's name,
    the TrainStep)."""
    from tensorc.training import TrainStep, get_task
    train = TrainStep(model, get_task("clm"), batch, backend=backend)
    opt, name = adamw(train.params, backend)

    def step(batch):
        t0 = time.perf_counter()
        loss, grads = train(batch)
        t1 = time.perf_counter()
        opt.step(grads)
        return loss, t1 - t0, time.perf_counter() - t1
    return step, name, train


def worker(peer: str, args) -> None:
    preset = args.numpy_preset if peer == "numpy" and args.numpy_preset else args.preset
    model, batch = build(preset, args.batch, args.seq)
    if peer == "torch":
        if not (has("torch") and has("transformers")):
            print(json.dumps("torch or transformers not installed"), flush=True)
            return
        import torch
        torch.set_num_threads(_threads())
        step, info = torch_trainer(model), f"torch {torch.__version__}, " \
            f"{torch.get_num_threads()} threads"
    else:
        import tensorc
        step, info, _ = tensorc_trainer(model, batch, peer.removesuffix("_baseline"))
        info += f", {_threads()} threads (TENSORC_NUM_THREADS)"
        if peer.endswith("_baseline"):
            info += f", tensorc from {os.path.dirname(os.path.dirname(tensorc.__file__))}"
    step(batch)   # warm up (compiles tensorc's step)
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:   # "STEPS UNTIMED"
        n, skip = map(int, line.split())
        times = [step(batch)[1:] for _ in range(n + skip)][skip:]
        print(json.dumps({"preset": preset, "info": info, "times": times}), flush=True)


def parity(args) -> tuple[float, list, list]:
    """`--parity-steps` steps of tensorc llvm and of PyTorch from the same weights on the
    same batches: the largest relative loss difference and both loss curves."""
    import torch
    torch.set_num_threads(_threads())
    model, _ = build(args.preset, args.batch, args.seq)
    data = [make_batch(model.config.vocab_size, args.batch, args.seq, 1 + i)
            for i in range(args.parity_steps)]
    ref_step = torch_trainer(model)   # copies the weights
    ref = [ref_step(b)[0] for b in data]
    step, _, _ = tensorc_trainer(model, data[0], "llvm")
    got = [step(b)[0] for b in data]
    rel = np.abs(np.array(got) - np.array(ref)) / np.abs(np.array(ref))
    return float(rel.max()), got, ref


def profile(args, runs: int = 5) -> list[tuple[str, float, float]]:
    """tensorc llvm's step, per kind of Program step: (what, ms per step, count per step),
    from the fastest of `runs` steps (a step that lost a core to another process runs
    near 2x). It wraps the runner's bound steps (and steps bound again per call: library
    calls on memory that moves between calls), so it reads the runtime's internals."""
    from tensorc.backends.lowering.program import Call, KernelStep
    model, batch = build(args.preset, args.batch, args.seq)
    _, _, train = tensorc_trainer(model, batch, "llvm")
    train(batch)
    runner = train.exe.specialise({})
    tot, cnt = collections.defaultdict(float), collections.Counter()

    def label(st):
        if isinstance(st, KernelStep):   # generated kernels are named after their first op
            return f"kernel {st.kernel.name.rsplit('_', 1)[0]} ({st.work} elements)"
        if isinstance(st, Call):
            shapes = " x ".join(f"{list(v.shape)}{'^T' if v.strides[-1] != 1 else ''}"
                                for v in st.inputs)
            epi = "+".join(k for k in st.epilogue)
            return f"{'fallback ' if st.fallback else ''}{st.op} {shapes}" + \
                (f" +{epi}" if epi else "")
        return type(st).__name__

    def timed(what, fn):
        def run():
            t = time.perf_counter()
            fn()
            tot[what] += time.perf_counter() - t
            cnt[what] += 1
        return run
    bind, depth = runner.bind, [0]

    def rebind(st, index, register=True):
        depth[0] += 1
        try:
            fn = bind(st, index, register)
        finally:
            depth[0] -= 1
        return timed(label(st), fn) if depth[0] == 0 else fn
    runner.bind = rebind
    runner.steps = [timed(label(s), f) for s, f in zip(runner.program.steps, runner.steps,
                                                       strict=True)]
    best = None
    for _ in range(runs):
        tot.clear()
        cnt.clear()
        t = time.perf_counter()
        train(batch)
        whole = time.perf_counter() - t
        if best is None or whole < best[0]:
            best = (whole, dict(tot), dict(cnt))
    whole, tot, cnt = best
    rows = sorted(((k, 1e3 * v, cnt[k]) for k, v in tot.items()), key=lambda r: -r[1])
    rows.append(("(outside the steps: inputs, outputs, rebinding)",
                 1e3 * whole - sum(r[1] for r in rows), 1))
    return rows, train.exe.stats()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per engine per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", default="llvm,torch,numpy")
    ap.add_argument("--numpy-preset", default="", help="default: --preset")
    ap.add_argument("--parity-steps", type=int, default=10, help="0: no parity run")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also time tensorc llvm from this source checkout, in the same rounds")
    ap.add_argument("--worker", metavar="PEER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for key in ("TENSORC_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[key] = str(args.threads)   # the workers inherit it
    if args.worker == "profile":   # in a process of its own: no torch threads about
        rows, stats = profile(args)
        print(json.dumps({"rows": rows, "stats": stats}))
        return
    if args.worker:
        worker(args.worker, args)
        return
    flags = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
             "--threads", str(args.threads), "--numpy-preset", args.numpy_preset]

    def starter(peer, env=None):
        return lambda: subprocess.Popen([sys.executable, __file__, "--worker", peer, *flags],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
    starters = {p: starter(p) for p in args.engines.split(",")}
    if args.baseline:
        starters["llvm_baseline"] = starter("llvm_baseline", {
            **os.environ, "PYTHONPATH": os.path.abspath(args.baseline)})
    procs, failed = start_engines(starters)
    load = os.getloadavg()[0]
    runs = take_turns(procs, args.rounds, lambda peer: "1 0" if peer == "numpy"
                      else f"{args.repeat} 1", pause=1.0)

    print(f"GPT {args.preset} training step (forward + backward + AdamW), batch {args.batch}, "
          f"seq {args.seq}; CPU: {cpu_model()}; {args.threads} threads for every engine; "
          f"medians of {args.rounds} rounds x {args.repeat} steps (numpy: 1), engines taking "
          f"turns; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| engine | preset | step ms | forward+backward ms | optimizer ms | step / PyTorch "
          "| best round: step ms | best / PyTorch's best | median of per-round ratios "
          "| per-round step ms | optimizer |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    rows = {}
    for peer, answers in runs.items():
        bad = next((a for a in answers if isinstance(a, str)), None)
        if bad:
            failed[peer] = bad
            continue
        times = np.array([t for a in answers for t in a["times"]]) * 1e3
        per_round = [1e3 * float(np.median(np.sum(a["times"], 1))) for a in answers]
        rows[peer] = (answers[0], np.median(times.sum(1)), np.median(times[:, 0]),
                      np.median(times[:, 1]), per_round)
    ref = rows.get("torch")
    for peer, (a, step, fb, opt, per_round) in rows.items():
        same = a["preset"] == args.preset and ref is not None
        ratio = f"{step / ref[1]:.2f}x" if same else "-"
        best = f"{min(per_round) / min(ref[4]):.2f}x" if same else "-"
        paired = f"{np.median(np.array(per_round) / np.array(ref[4])):.2f}x" if same else "-"
        print(f"| {peer} | {a['preset']} | {step:.1f} | {fb:.1f} | {opt:.1f} | {ratio} "
              f"| {min(per_round):.1f} | {best} | {paired} "
              f"| {', '.join(f'{x:.0f}' for x in per_round)} | {a['info']} |")
    for peer, why in failed.items():
        print(f"| {peer} | {why} | | | | | | | | | |")

    if args.parity_steps and has("torch") and has("transformers"):
        worst, got, ref = parity(args)
        print(f"\nparity, GPT {args.preset}, {args.parity_steps} AdamW steps from the same "
              f"weights on the same batches (tensorc llvm vs PyTorch): max relative loss "
              f"difference {worst:.1e}; losses tensorc {got[0]:.5f} .. {got[-1]:.5f}, "
              f"PyTorch {ref[0]:.5f} .. {ref[-1]:.5f}")
    if args.profile:
        got = json.loads(subprocess.run([sys.executable, __file__, "--worker", "profile", *flags],
                                        capture_output=True, text=True, check=True
                                        ).stdout.splitlines()[-1])
        rows, stats = got["rows"], got["stats"]
        total = sum(r[1] for r in rows)
        print(f"\ntensorc llvm step (forward + backward, no optimizer) by Program step, "
              f"{total:.0f} ms in all (the fastest of 5 steps, in a process of its own); stats(): "
              f"{json.dumps(stats)}\n")
        print("| step | ms per training step | share | count |")
        print("| --- | ---: | ---: | ---: |")
        for what, ms, n in rows:
            if ms >= 0.005 * total:
                print(f"| {what} | {ms:.1f} | {100 * ms / total:.0f}% | {n:g} |")


if __name__ == "__main__":
    main()
