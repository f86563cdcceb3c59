"""Text generation speed: tensorc (llvm, numpy) vs Hugging Face `generate` (PyTorch CPU).

    python benchmarks/generate.py [--preset small] [--batch 1] [--prompt 16]
        [--new-tokens 128] [--rounds 5] [--threads N]

GPT small, greedy, a KV cache everywhere, the same weights: tensorc's `Generator`
(the model's cached step compiled once: prefill, then one call per token) and
`transformers.GPT2LMHeadModel.generate` with tensorc's weights copied in (the same
GPT-2 arrangement: pre-norm, tanh gelu, tied embeddings; install the bench extras:
`pip install -e ".[bench]"`). Each engine runs in its own process and the
engines take turns, one generation each per round, every engine on `--threads`
threads (TENSORC_NUM_THREADS, OMP/OPENBLAS_NUM_THREADS, torch.set_num_threads).
Prints medians: tokens/s (new tokens / (prefill + decode)), prefill ms and ms per
decode step, whether each engine's tokens equal llvm's, and the floor a decode step
cannot beat: reading every weight once, at the read bandwidth this machine measures
for an array of the weights' size (hot in cache when they fit) and for 1 GiB (DRAM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from bandwidth import read_bandwidth  # beside this script
from engines import has, start_engines, take_turns  # beside this script

from models import _threads  # beside this script


def build(args):
    import tensorc.models
    model = tensorc.models.get("gpt", args.preset)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.config.vocab_size, (args.batch, args.prompt))
    return model, prompts


def tensorc_engine(backend: str, args):
    from tensorc.generation import Generator
    model, prompts = build(args)
    gen = Generator(model, backend)
    gen.generate(prompts.tolist(), args.new_tokens)   # compiles both step shapes

    def run():
        timings: dict = {}
        out = [t for t in gen.stream(prompts.tolist(), args.new_tokens, timings=timings)]
        return np.stack(out, 1), timings
    return run


def hf_engine(args):
    if not (has("torch") and has("transformers")):
        return "torch or transformers not installed"
    import torch
    import transformers
    torch.set_num_threads(_threads())
    model, prompts = build(args)
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
        n_layer=c.n_layer, n_head=c.n_head, n_inner=c.d_ff, activation_function="gelu_new",
        layer_norm_epsilon=c.eps, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        tie_word_embeddings=True, attn_implementation="sdpa")).eval()
    hf.load_state_dict(hf_weights(model), strict=False)
    ids = torch.as_tensor(prompts)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            t = time.perf_counter()
            hf(ids, attention_mask=mask, use_cache=True)   # the prefill alone, for its time
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=0)
            total = time.perf_counter() - t
        return out[:, ids.shape[1]:].numpy(), {
            "prefill_s": prefill, "decode_s": total - prefill,
            "steps": args.new_tokens - 1}
    return run


def hf_weights(model) -> dict:
    """tensorc GPT weights under GPT-2's names (its Conv1D weights are [in, out] too)."""
    import torch
    w = model.state_dict()
    out = {"transformer.wte.weight": w["wte.weight"], "transformer.wpe.weight": w["wpe.weight"],
           "transformer.ln_f.weight": w["ln_f.weight"], "transformer.ln_f.bias": w["ln_f.bias"],
           "lm_head.weight": w["wte.weight"]}
    for i in range(model.config.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + b + ".weight"], out[h + b + ".bias"] = w[p + a + ".weight"], w[p + a + ".bias"]
        for kind in ("weight", "bias"):
            out[h + f"attn.c_attn.{kind}"] = np.concatenate(
                [w[p + f"attn.{x}.{kind}"] for x in "qkv"], -1)
            out[h + f"attn.c_proj.{kind}"] = w[p + f"attn.o.{kind}"]
            out[h + f"mlp.c_fc.{kind}"] = w[p + f"ff.up.{kind}"]
            out[h + f"mlp.c_proj.{kind}"] = w[p + f"ff.down.{kind}"]
    return {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in out.items()}


def worker(peer: str, args) -> None:
    run = hf_engine(args) if peer == "hf" else tensorc_engine(peer, args)
    if isinstance(run, str):
        print(json.dumps(run), flush=True)
        return
    run()   # warm up
    print(json.dumps("ready"), flush=True)
    for _ in sys.stdin:
        tokens, t = run()
        print(json.dumps({**t, "tokens": tokens.tolist()}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", default="llvm,hf,numpy")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--worker", metavar="PEER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    for key in ("TENSORC_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[key] = str(args.threads)
    flags = ["--preset", args.preset, "--batch", str(args.batch), "--prompt", str(args.prompt),
             "--new-tokens", str(args.new_tokens)]
    def starter(peer):
        return lambda: subprocess.Popen([sys.executable, __file__, "--worker", peer, *flags],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
    procs, result = start_engines({peer: starter(peer) for peer in args.engines.split(",")})
    runs = take_turns(procs, args.rounds, lambda peer: "run", pause=1.0)

    model, _ = build(args)
    weight_bytes = 4 * (model.num_parameters() - model.wpe.weight.data.size)
    hot = read_bandwidth(max(weight_bytes >> 20, 1), args.threads)   # GB/s
    dram = read_bandwidth(1024, args.threads)
    new = args.batch * args.new_tokens
    print(f"gpt {args.preset}, batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new "
          f"tokens, greedy, {args.threads} threads, medians of {args.rounds} rounds; weights "
          f"{weight_bytes / 1e6:.0f} MB read per step: floor {weight_bytes / hot / 1e6:.2f} ms "
          f"at {hot:.0f} GB/s (a weights-sized read), {weight_bytes / dram / 1e6:.2f} ms "
          f"at {dram:.0f} GB/s (1 GiB, DRAM)\n")
    print("| engine | tokens/s | prefill ms | ms per decode step | tokens equal llvm's |")
    print("| --- | ---: | ---: | ---: | --- |")
    base = runs.get("llvm", [{}])[0].get("tokens")
    for peer, rs in runs.items():
        tps = np.median([new / (r["prefill_s"] + r["decode_s"]) for r in rs])
        step = np.median([1e3 * r["decode_s"] / max(r["steps"], 1) for r in rs])
        prefill = np.median([1e3 * r["prefill_s"] for r in rs])
        same = "-" if base is None else ("yes" if rs[0]["tokens"] == base else "no")
        print(f"| {peer} | {tps:.1f} | {prefill:.2f} | {step:.2f} | {same} |")
    for peer, why in result.items():
        print(f"| {peer} | {why} | | | |")


if __name__ == "__main__":
    main()
