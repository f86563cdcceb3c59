"""Text generation: a prompt in, new tokens out, one step at a time.

Two ways to run a step:

- **cached** (zoo models that define `cache_layout`, e.g. gpt and llama): the model's
  cached step (`frontend/cache.py`) is compiled once; the prompt runs as one call
  (prefill), then each new token is one call that reads and appends the key/value
  cache, so a token costs one pass over the weights.
  An ONNX file of such a step (`tensorc export MODEL --kv-cache`) runs the same way.
- **full** (any other graph with token ids in and logits [batch, seq, vocab] out, such
  as an imported ONNX decoder): every step runs the whole sequence again. Correct, and
  quadratic in the length.

Batch rows may have prompts of different lengths: rows are right-padded and each row
reads its own last position. Sampling is greedy (temperature 0) or draws from the
softmax at a temperature, optionally cut to the top k tokens and to the smallest set
whose probability reaches top_p, from a seeded generator.

Models of the zoo have no tokenizer: `ByteTokenizer` maps text to its UTF-8 bytes
(ids 0-255) and keeps 256 as end-of-text, so any model with a vocabulary of at least
257 takes text prompts.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, TensorcError
from .ir import DTYPES, Graph
from .resources import check_fits


class ByteTokenizer:
    """Text <-> UTF-8 byte ids; id 256 is end-of-text."""

    eos = 256
    vocab_size = 257

    def check(self, vocab_size: int) -> None:
        if vocab_size < self.vocab_size:
            raise InputError(f"the byte tokenizer needs a vocabulary of at least "
                             f"{self.vocab_size} ids, the model has {vocab_size}: give token "
                             "ids instead of text")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        stream = self.stream()
        return stream(ids) + stream.flush()

    def stream(self) -> _TextStream:
        """A decoder fed ids a few at a time (a multi-byte character may be split)."""
        return _TextStream(self.eos)


class _TextStream:
    def __init__(self, eos: int):
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eos = eos

    def __call__(self, ids) -> str:
        out = []
        for i in map(int, ids):
            if i < 256:
                out.append(self.utf8.decode(bytes([i])))
            else:
                out.append(self.flush() + ("<|endoftext|>" if i == self.eos else f"<{i}>"))
        return "".join(out)

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """One token per row of `logits` [batch, vocab]."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p >= top_p   # the first token always stays
        np.put_along_axis(p, order, np.where(drop, 0.0, sorted_p), -1)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


@dataclass
class Generation:
    """What `Generator.generate` returns: per row, the prompt and new ids."""
    ids: list[list[int]]
    new_tokens: list[list[int]]
    prefill_ms: float
    ms_per_token: float          # a decode step (the whole batch)
    tokens_per_s: float          # new tokens of all rows / (prefill + decode time)
    compile_ms: float = 0.0      # compiling and a first run of each step shape
    cached: bool = True
    timings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"ids": self.ids, "new_tokens": self.new_tokens,
                "tokens_per_s": self.tokens_per_s, "prefill_ms": self.prefill_ms,
                "ms_per_token": self.ms_per_token, "compile_ms": self.compile_ms,
                "kv_cache": self.cached}


class Generator:
    """Generates with `model`: a zoo `Module` that defines `cache_layout`, or a `Graph`:
    a cached step (`frontend.cache.is_decoder_step`, e.g. imported from an ONNX file
    `tensorc export --kv-cache` wrote) or any graph from token ids to logits (full
    steps)."""

    def __init__(self, model, backend: str = "llvm", passes: str = "O2",
                 max_seq_len: int | None = None):
        from .api import compile
        from .frontend.cache import decoder_step, is_decoder_step
        self.backend = backend
        if isinstance(model, Graph):
            graph, self.cached = model, is_decoder_step(model)
            self.vocab_size = _logits_vocab(graph)
        else:
            graph, self.cached = decoder_step(model), True
            self.vocab_size = model.config.vocab_size
            max_seq_len = max_seq_len or model.config.max_seq_len
        self.max_seq_len = max_seq_len
        self.exe = compile(graph, backend, passes)
        if self.cached:
            self.cache_inputs = [v for v in graph.inputs if v.name.startswith("past.")]
        else:
            self.ids_name, *others = self.exe.input_names
            self.mask = {v.name: v.type.dtype for v in graph.inputs[1:]}
            if others != ["attention_mask"][:len(others)]:
                raise TensorcError(f"{graph.name} takes inputs {others} besides the token ids; "
                                   "a graph that generates takes token ids and, optionally, "
                                   "an attention_mask")

    # -- steps --
    def _full(self, seq: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits of a whole-sequence step; padding masked where the graph takes a mask."""
        feeds = {self.ids_name: seq}
        for name, dtype in self.mask.items():
            keep = np.arange(seq.shape[1]) < lengths[:, None]
            feeds[name] = keep.astype(DTYPES[dtype])
        return _host(self.exe.run(feeds)[self.exe.output_names[0]])

    def _prefill(self, padded: np.ndarray, length: int, lengths: np.ndarray):
        if not self.cached:
            return self._full(padded, lengths), None
        b = padded.shape[0]
        feeds = {"input_ids": padded, "start": np.zeros(b, np.int64)}
        for v in self.cache_inputs:
            _, heads, _, d = v.type.shape
            feeds[v.name] = np.zeros((b, heads, length, d), np.float32)
        return self._step(feeds)

    def _decode(self, tokens: np.ndarray, seq: np.ndarray, lengths: np.ndarray, caches):
        if not self.cached:
            return self._full(seq, lengths)[np.arange(len(lengths)), lengths - 1], None
        logits, caches = self._step({"input_ids": tokens[:, None], "start": lengths - 1,
                                     **caches})
        return logits[:, -1], caches

    def _step(self, feeds: dict):
        """A cached step. The caches are donated: each comes back as its updated self's
        `out`, so on llvm a step writes only its new rows (on cupy they stay on the
        device, returned as new arrays)."""
        donate = None if self.backend == "cupy" else {
            n.replace("past.", "present.", 1): a for n, a in feeds.items()
            if n.startswith("past.")}
        out = self.exe.run(feeds, out=donate)
        return out[self.exe.output_names[0]], _next_caches(out)

    # -- the loop --
    def stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids=(),
               timings: dict | None = None) -> Iterator[np.ndarray]:
        """Yields, per step, the new token of every row ([batch] i64; -1 for a row that
        has stopped). `timings` (a dict) receives prefill_s, decode_s (the steps and
        their sampling) and steps."""
        prompts = self._check(prompts, max_new_tokens, temperature, top_k, top_p)
        b = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int64)
        total = int(lengths.max()) + max_new_tokens
        seq = np.zeros((b, total if not self.cached else int(lengths.max())), np.int64)
        for r, p in enumerate(prompts):
            seq[r, :len(p)] = p
        rng = np.random.default_rng(seed)
        done = np.zeros(b, bool)
        stop = np.array(sorted(set(stop_ids)), np.int64)
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        # a full step always runs the whole padded width: one shape, compiled once
        logits, caches = self._prefill(seq[:, :int(lengths.max())] if self.cached else seq,
                                       total, lengths)
        logits = _host(logits)[np.arange(b), lengths - 1]
        timings.update(prefill_s=time.perf_counter() - t0, decode_s=0.0, steps=0)
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            tokens = sample(logits, rng, temperature, top_k, top_p).astype(np.int64)
            timings["decode_s" if step else "prefill_s"] += time.perf_counter() - t0
            tokens[done] = -1
            done |= np.isin(tokens, stop)
            yield tokens
            if done.all() or step == max_new_tokens - 1:
                return
            tokens = np.where(tokens < 0, 0, tokens)   # stopped rows run on, unread
            if not self.cached:
                seq[np.arange(b), lengths] = tokens
            lengths = lengths + 1
            t0 = time.perf_counter()
            logits, caches = self._decode(tokens, seq, lengths, caches)
            logits = _host(logits)
            timings["decode_s"] += time.perf_counter() - t0
            timings["steps"] += 1

    def generate(self, prompts: list[list[int]], max_new_tokens: int, warmup: bool = True,
                 on_step=None, **options) -> Generation:
        """Runs `stream` to the end, calling `on_step(tokens)` at each step. `warmup` first
        runs a prefill and a decode step of the same shapes so the timings leave out
        compiling."""
        compile_s = 0.0
        if warmup:
            t0 = time.perf_counter()
            steps = self.stream(prompts, max_new_tokens, **options)
            for _ in zip(range(2), steps, strict=False):
                pass   # the same cache length: the shapes timed below
            compile_s = time.perf_counter() - t0
        timings: dict = {}
        new = [[] for _ in prompts]
        for tokens in self.stream(prompts, max_new_tokens, timings=timings, **options):
            if on_step is not None:
                on_step(tokens)
            for row, tok in zip(new, tokens.tolist(), strict=True):
                if tok >= 0:
                    row.append(tok)
        n = sum(len(r) for r in new)
        spent = timings["prefill_s"] + timings["decode_s"]
        return Generation(
            ids=[list(map(int, p)) + r for p, r in zip(prompts, new, strict=True)],
            new_tokens=new, prefill_ms=1e3 * timings["prefill_s"],
            ms_per_token=1e3 * timings["decode_s"] / max(timings["steps"], 1),
            tokens_per_s=n / spent if spent > 0 else float("inf"),
            compile_ms=1e3 * compile_s, cached=self.cached, timings=timings)

    def _check(self, prompts, max_new_tokens, temperature, top_k, top_p):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not 0 <= temperature < np.inf or top_k < 0 or not 0 < top_p <= 1:
            raise InputError(f"sampling needs a finite temperature >= 0, top_k >= 0 and "
                             f"0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        out = []
        for r, p in enumerate(prompts):
            p = np.asarray(p)
            if p.ndim != 1 or p.dtype.kind not in "iu":
                raise InputError(f"prompt {r} must be a list of integer token ids")
            bad = p[(p < 0) | (p >= self.vocab_size)]
            if bad.size:
                raise InputError(f"prompt {r}: token id {int(bad[0])} is outside the "
                                 f"vocabulary of {self.vocab_size}")
            out.append(p.astype(np.int64))
        longest = max(len(p) for p in out) + max_new_tokens
        per_token = 8 + sum(4 * v.type.shape[1] * v.type.shape[3] for v in self.cache_inputs) \
            if self.cached else 8   # an id, and each cache's row
        check_fits(per_token * len(out) * longest,
                   f"generating {max_new_tokens} tokens for {len(out)} prompt(s)")
        if self.max_seq_len is not None and longest > self.max_seq_len:
            raise InputError(f"prompt of {longest - max_new_tokens} tokens + {max_new_tokens} "
                             f"new tokens = {longest} exceeds the model's max_seq_len "
                             f"{self.max_seq_len}")
        return out


def _host(a):
    """A cupy array's numpy copy (sampling runs on the host); numpy arrays as they are."""
    return a.get() if hasattr(a, "get") else a


def _next_caches(out: dict) -> dict:
    return {n.replace("present.", "past.", 1): a for n, a in out.items()
            if n.startswith("present.")}


def _logits_vocab(graph: Graph) -> int:
    if not graph.inputs or graph.inputs[0].type.dtype not in ("i32", "i64") \
            or graph.inputs[0].type.rank != 2:
        raise TensorcError(f"{graph.name} does not take token ids [batch, seq] as its first "
                           "input, so it cannot generate text")
    out = graph.outputs[0].type
    if out.rank != 3 or not isinstance(out.shape[2], int):
        raise TensorcError(f"{graph.name}'s first output {out} is not logits "
                           "[batch, seq, vocab]")
    return out.shape[2]


def generate(model, prompt, max_new_tokens: int = 32, backend: str = "llvm",
             passes: str = "O2", **options) -> Generation:
    """Generate from a zoo model (or a token-ids -> logits Graph). `prompt`: a string
    (byte tokenizer), a list of ids, or a list of such lists for a batch."""
    gen = Generator(model, backend, passes)
    prompts = _prompts(prompt, gen.vocab_size)
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        options.setdefault("stop_ids", (ByteTokenizer.eos,))
    return gen.generate(prompts, max_new_tokens, **options)


def _prompts(prompt, vocab_size: int) -> list[list[int]]:
    items = prompt if isinstance(prompt, list) and prompt and \
        isinstance(prompt[0], (str, list, tuple, np.ndarray)) else [prompt]
    out = []
    for p in items:
        if isinstance(p, str):
            ByteTokenizer().check(vocab_size)
            p = ByteTokenizer().encode(p)
        out.append(list(p))
    return out
