"""Export tiny random Hugging Face models with both PyTorch ONNX exporters.

Writes `tests/data/hf/<model>_<attn>_<exporter>.onnx` plus a `.npz` beside each with the
example inputs (`in:<name>`), ONNX Runtime's outputs for them (`out:<name>`) and inputs at
a second shape (`in2:<name>`), which `tests/test_hf_exports.py` uses without torch.

Needs torch, transformers, onnx, onnxscript and onnxruntime (never part of tensorc's own
environment; see tests/data/hf/README.md):

    /work/torchenv/bin/python tools/make_hf_exports.py [--out tests/data/hf] [--models llama]

Models are built from small config objects (no hub download) with fixed seeds, so a
rerun with the same versions writes the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

SEED = 0
BATCH, SEQ = 2, 7          # example shapes; dims above 1 so exporters keep them dynamic
VOCAB, MAX_POS = 101, 64
LEGACY_OPSET, DYNAMO_OPSET = 17, 18


def _gpt2(attn: str):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=32,
                                  n_layer=2, n_head=4, use_cache=False, bos_token_id=0,
                                  eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg)


def _bert(attn: str):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=MAX_POS, attn_implementation=attn)
    return transformers.BertForMaskedLM(cfg)


def _vit(attn: str):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, num_labels=10,
                                 attn_implementation=attn)
    return transformers.ViTForImageClassification(cfg)


def _llama(attn: str):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=MAX_POS,
                                   use_cache=False, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg)


@torch.no_grad()
def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random and of order 0.1 (norm scales about 1), so no bias is a zero
    that would hide a wrong add and no two weights are equal by accident."""
    for p in model.parameters():
        p.normal_(0.0, 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            m.weight.add_(1.0)
    return model


class LogitsOnly(torch.nn.Module):
    """The model's `logits` alone, with the inputs as named positional arguments."""

    def __init__(self, model, input_names):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *args):
        return self.model(**dict(zip(self.input_names, args, strict=True))).logits


def _tokens(gen: torch.Generator, batch: int = BATCH, seq: int = SEQ) -> dict:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[-1, seq - 2:] = 0      # the last row is padded at the end
    return {"input_ids": ids, "attention_mask": attention_mask}


def _sentence_pair(gen: torch.Generator, batch: int = BATCH, seq: int = SEQ) -> dict:
    """BERT's inputs as its tokenizer gives them: the second half is segment 1."""
    inputs = _tokens(gen, batch, seq)
    inputs["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    return inputs


def _image(gen: torch.Generator, batch: int = BATCH) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}


TOKEN_DIMS = {name: {0: "batch", 1: "seq"} for name in ("input_ids", "attention_mask",
                                                        "token_type_ids")}
# name -> (builder, example inputs, the dims of each input that vary: {input: {axis: name}})
MODELS = {
    "gpt2": (_gpt2, _tokens, TOKEN_DIMS),
    "bert": (_bert, _sentence_pair, TOKEN_DIMS),
    # BERT called without token types reads them from a buffer (GatherElements).
    "bert-no-types": (_bert, _tokens, TOKEN_DIMS),
    "vit": (_vit, _image, {"pixel_values": {0: "batch"}}),
    # grouped-query attention (2 kv heads for 4 query heads), rotary positions, RMSNorm
    "llama": (_llama, _tokens, TOKEN_DIMS),
}
# The second shape each export is checked at (what a dynamic export must also get right).
TOKENS2 = {"batch": 3, "seq": 12}
OTHER_SHAPE = {"gpt2": TOKENS2, "bert": TOKENS2, "bert-no-types": TOKENS2,
               "vit": {"batch": 3}, "llama": TOKENS2}
ATTENTIONS_OF = {"bert-no-types": ("eager",)}   # the rest of its graph is bert's
EXPORTERS = ("legacy", "dynamo")
# The TorchScript exporter stops at transformers 5's mask code for Llama ("Exporting
# the operator 'aten::diff' to ONNX opset version 17 is not supported").
EXPORTERS_OF = {"llama": ("dynamo",)}


def export(model: torch.nn.Module, inputs: dict, dyn: dict, exporter: str, path: Path):
    names = list(inputs)
    dyn = {name: dyn[name] for name in names}
    args = tuple(inputs.values())
    if exporter == "legacy":
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes={**dyn, "logits": {0: "batch"}},
                          opset_version=LEGACY_OPSET, dynamo=False)
        return
    dims = {}  # one torch.export.Dim per name, shared across inputs
    shapes = tuple({ax: dims.setdefault(n, torch.export.Dim(n, max=MAX_POS if n == "seq"
                                                             else 1024))
                    for ax, n in dyn[name].items()} for name in names)
    prog = torch.onnx.export(model, args, input_names=names, output_names=["logits"],
                             dynamic_shapes=(shapes,), opset_version=DYNAMO_OPSET, dynamo=True,
                             verbose=False)
    prog.save(str(path), external_data=False)
    # Drop the per-node stack traces and module paths the dynamo exporter records: they
    # name this machine's files and make the file change when this script's lines move.
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, str(path))


def ort_run(path: Path, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=Path(__file__).resolve().parents[1] / "tests/data/hf",
                    type=Path)
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated subset of " + ", ".join(MODELS))
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    print("| export | size | ORT vs torch, example shape | ORT vs torch, second shape |")
    print("| --- | --- | --- | --- |")
    for name in args.models.split(","):
        build, make_inputs, dyn = MODELS[name]
        for attn in ATTENTIONS_OF.get(name, ("sdpa", "eager")):
            for exporter in EXPORTERS_OF.get(name, EXPORTERS):
                gen = torch.Generator().manual_seed(SEED + 1)
                inputs = make_inputs(gen)
                other = make_inputs(gen, **OTHER_SHAPE[name])
                torch.manual_seed(SEED)
                model = LogitsOnly(randomize(build(attn)), list(inputs)).eval()
                stem = f"{name}_{attn}_{exporter}"
                path = out / f"{stem}.onnx"
                with torch.no_grad():
                    want = [model(*x.values()).numpy() for x in (inputs, other)]
                    export(model, inputs, dyn, exporter, path)
                onnx.checker.check_model(onnx.load(str(path)), full_check=True)
                feeds, feeds2 = ({k: v.numpy() for k, v in x.items()} for x in (inputs, other))
                got = [ort_run(path, f)[0] for f in (feeds, feeds2)]
                errs = [_rel(a, b) for a, b in zip(got, want, strict=True)]
                np.savez(out / f"{stem}.npz", **{f"in:{k}": v for k, v in feeds.items()},
                         **{f"in2:{k}": v for k, v in feeds2.items()}, **{"out:logits": got[0]})
                print(f"| {stem} | {os.path.getsize(path) / 1024:.0f} KiB | {errs[0]:.1e} | "
                      f"{errs[1]:.1e} |")

if __name__ == "__main__":
    main()
