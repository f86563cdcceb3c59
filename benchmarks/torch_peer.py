"""PyTorch as a benchmark peer: run a tensorc graph with torch ops, on CPU or GPU.

Every peer runs the same traced graph (same weights, same ops); for PyTorch that
means this small interpreter, whose `attention` is `scaled_dot_product_attention`.
It is what a PyTorch user's model issues, op for op, and `torch.compile` can
compile it. Used by benchmarks/models.py (CPU) and benchmarks/gpu.py (CUDA).

`hf_gpt2(model)`: Hugging Face's GPT2LMHeadModel holding a tensorc GPT's config and
weights (benchmarks/train.py and tests/test_torch_parity.py train both side by side).
"""

from __future__ import annotations

import math

import numpy as np


def _torch_ops(torch, device: str):
    F = torch.nn.functional
    dt = {"f32": torch.float32, "f16": torch.float16, "f64": torch.float64,
          "i64": torch.int64, "i32": torch.int32, "bool": torch.bool, "i8": torch.int8,
          "u8": torch.uint8}

    def slice_(x, starts, ends, axes=None, steps=None):
        index = [slice(None)] * x.dim()
        axes = range(len(starts)) if axes is None else axes
        for s, e, a, st in zip(starts, ends, axes, steps or [1] * len(starts), strict=True):
            index[a] = slice(s, e, st)
        return x[tuple(index)]

    def layer_norm(x, w=None, b=None, axis=-1, eps=1e-5):
        return F.layer_norm(x, x.shape[axis % x.dim():], w, b, eps)

    def attention(q, k, v, mask=None, scale=1.0, causal=False, mask_value=-math.inf):
        if mask is not None and causal:   # SDPA takes one of them: fold causal into mask
            t, s = q.shape[-2], k.shape[-2]
            keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
            mask = mask & keep if mask.dtype == torch.bool else \
                mask.masked_fill(~keep, mask_value)
            causal = False
        gqa = k.shape[1] not in (1, q.shape[1])   # grouped kv heads (llama)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=gqa)

    def reduce(fn):
        return lambda x, axes=None, keepdims=False: fn(
            x, dim=tuple(range(x.dim())) if axes is None else tuple(axes), keepdim=keepdims)

    return {
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
        "pow": torch.pow, "maximum": torch.maximum, "minimum": torch.minimum,
        "equal": torch.eq, "less": torch.lt, "less_equal": torch.le, "greater": torch.gt,
        "greater_equal": torch.ge, "logical_and": torch.logical_and,
        "logical_or": torch.logical_or, "logical_not": torch.logical_not,
        "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log,
        "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal,
        "tanh": torch.tanh, "erf": torch.erf, "sigmoid": torch.sigmoid, "relu": torch.relu,
        "sin": torch.sin, "cos": torch.cos, "floor": torch.floor,
        "gelu": lambda x, approximate="none": F.gelu(x, approximate=approximate),
        "where": torch.where, "cast": lambda x, dtype: x.to(dt[dtype]),
        "clip": lambda x, min=None, max=None: torch.clamp(x, min, max),
        "matmul": torch.matmul, "softmax": lambda x, axis=-1: torch.softmax(x, axis),
        "log_softmax": lambda x, axis=-1: torch.log_softmax(x, axis),
        "layer_norm": layer_norm, "attention": attention,
        "reduce_sum": reduce(torch.sum), "reduce_mean": reduce(torch.mean),
        "reduce_max": reduce(torch.amax), "reduce_min": reduce(torch.amin),
        "argmax": lambda x, axis=-1, keepdims=False: torch.argmax(x, axis, keepdims),
        "reshape": lambda x, shape: x.reshape(shape),
        "transpose": lambda x, perm=None: x.permute(
            *(perm if perm is not None else reversed(range(x.dim())))),
        "concat": lambda *xs, axis: torch.cat(xs, axis),
        "split": lambda x, axis, sizes: torch.split(x, list(sizes), axis),
        "slice": slice_, "expand": lambda x, shape: x.expand(
            *torch.broadcast_shapes(x.shape, tuple(shape))),
        "squeeze": lambda x, axes: x.squeeze(tuple(axes)),
        "unsqueeze": lambda x, axes: _unsqueeze(x, axes),
        "gather": lambda x, idx, axis=0: torch.index_select(
            x, axis, idx.reshape(-1)).reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:]),
        "full": lambda shape, value, dtype: torch.full(tuple(shape), value, dtype=dt[dtype],
                                                       device=device),
        "trilu": lambda x, upper=False, k=0: torch.triu(x, k) if upper else torch.tril(x, k),
        "conv2d": lambda x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
        group=1: F.conv2d(F.pad(x, (pads[1], pads[3], pads[0], pads[2])), w, b, strides, 0,
                          dilations, group),
    }


def _unsqueeze(x, axes):
    for a in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(a)
    return x


def torch_runner(graph, torch, device: str = "cpu"):
    """A function of the graph's inputs (torch tensors on `device`) running the graph
    with torch ops; fused regions run their body graphs."""
    ops = _torch_ops(torch, device)
    consts = {v: torch.as_tensor(np.ascontiguousarray(v.data)).to(device)
              for v in graph.constants.values()}

    def run(g, args):
        vals = dict(consts)
        vals.update({v: torch.as_tensor(np.ascontiguousarray(v.data)).to(device)
                     for v in g.constants.values() if v not in vals})
        vals.update(zip(g.inputs, args, strict=True))
        for node in g.nodes:
            ins = [vals[v] for v in node.inputs]
            if node.op == "fused":
                outs = run(node.attrs["body"], ins)
            elif node.op in ops:
                outs = ops[node.op](*ins, **node.attrs)
            else:
                raise SystemExit(f"benchmarks: no torch mapping for op {node.op!r}")
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            vals.update(zip(node.outputs, outs, strict=True))
        return [vals[v] for v in g.outputs]

    return lambda *args: run(graph, args)


def hf_gpt2(model):
    """GPT2LMHeadModel with tensorc GPT `model`'s config and weights (copies)."""
    import torch
    import transformers
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
        n_layer=c.n_layer, n_head=c.n_head, n_inner=c.d_ff, activation_function="gelu_new",
        layer_norm_epsilon=c.eps, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        tie_word_embeddings=True, attn_implementation="sdpa", bos_token_id=None,
        eos_token_id=None))
    w = {n: p.data for n, p in model.named_parameters()}
    sd = {"transformer.wte.weight": w["wte.weight"], "transformer.wpe.weight": w["wpe.weight"],
          "transformer.ln_f.weight": w["ln_f.weight"], "transformer.ln_f.bias": w["ln_f.bias"]}
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            sd[h + f"ln_1.{kind}"] = w[p + f"ln1.{kind}"]
            sd[h + f"ln_2.{kind}"] = w[p + f"ln2.{kind}"]
            sd[h + f"attn.c_attn.{kind}"] = np.concatenate(
                [w[p + f"attn.{x}.{kind}"] for x in "qkv"], -1)
            sd[h + f"attn.c_proj.{kind}"] = w[p + f"attn.o.{kind}"]
            sd[h + f"mlp.c_fc.{kind}"] = w[p + f"ff.up.{kind}"]
            sd[h + f"mlp.c_proj.{kind}"] = w[p + f"ff.down.{kind}"]
    missing, unexpected = hf.load_state_dict(
        {k: torch.tensor(np.array(v, np.float32)) for k, v in sd.items()}, strict=False)
    if unexpected or any(k != "lm_head.weight" and "attn.bias" not in k for k in missing):
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("the output embedding is not tied")
    return hf.train()
