"""Text generation: cached decode steps against whole-sequence forwards, sampling,
the byte tokenizer, `tensor_scatter`'s lowering, and `tensorc generate`."""

import json

import numpy as np
import pytest

import tensorc
from tensorc import models
from tensorc.cli import main
from tensorc.errors import InputError, TensorcError
from tensorc.frontend.cache import decoder_step, key_name
from tensorc.generation import ByteTokenizer, Generator, sample

DECODERS = ["gpt", "llama"]
PROMPTS = {1: [[5, 1, 4, 1, 5, 9]], 3: [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7, 9]]}


def full_graph(model):
    return tensorc.trace(model, tensorc.TensorSpec(("batch", "seq"), "i64"))


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request):
    return models.get(request.param, "tiny")


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_greedy_tokens_equal_whole_sequence_forwards(decoder, backend, batch):
    """Every step of cached generation picks what a whole forward of the sequence so
    far (no cache) picks, rows of different prompt lengths included."""
    prompts = PROMPTS[batch]
    cached = Generator(decoder, backend).generate(prompts, 12, warmup=False)
    forward = tensorc.compile(full_graph(decoder), "numpy", "O0")
    for prompt, new in zip(prompts, cached.new_tokens, strict=True):
        seq = list(prompt)
        for tok in new:
            logits = forward(np.array([seq]))[0, -1]
            assert tok == int(logits.argmax()), f"row {prompt}: step {len(seq)} differs"
            seq.append(tok)
    assert cached.cached and all(len(n) == 12 for n in cached.new_tokens)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_cached_step_logits_match_the_reference(decoder, backend):
    """Prefill of right-padded rows, then decode steps at per-row positions: the logits
    equal the un-optimised reference's whole-sequence logits (rel err <= 1e-4)."""
    rng = np.random.default_rng(1)
    step = tensorc.compile(decoder_step(decoder), backend, "O2")
    forward = tensorc.compile(full_graph(decoder), "numpy", "O0")
    layers, heads, d = decoder.cache_layout()
    lengths, total = np.array([4, 2, 6]), 10
    ids = rng.integers(0, decoder.config.vocab_size, (3, total))
    feeds = {"input_ids": ids[:, :6], "start": np.zeros(3, np.int64)}
    for name in step.input_names[2:]:
        feeds[name] = rng.standard_normal((3, heads, total, d)).astype(np.float32)  # unread
    before = {k: v.copy() for k, v in feeds.items()}
    out = step.run(feeds)
    for k, v in before.items():
        np.testing.assert_array_equal(feeds[k], v)   # inputs are left as they were
    for r, n in enumerate(lengths):
        ref = forward(ids[r:r + 1, :n])[0]
        np.testing.assert_allclose(out["logits"][r, :n], ref, rtol=1e-4, atol=1e-5)
    for _ in range(3):
        feeds = {"input_ids": ids[np.arange(3), lengths][:, None], "start": lengths.copy(),
                 **{k.replace("present", "past"): v for k, v in out.items()
                    if k.startswith("present")}}
        out = step.run(feeds)
        lengths = lengths + 1
        for r, n in enumerate(lengths):
            ref = forward(ids[r:r + 1, :n])[0, -1]
            np.testing.assert_allclose(out["logits"][r, 0], ref, rtol=1e-4, atol=1e-5)


def test_decode_step_lets_a_caller_donate_its_caches_on_llvm(decoder):
    """Each cache is read once, by a copy into its output that the runtime skips when
    the caller passes the cache itself as that output's `out` (Program.aliases); one
    scatter per cache writes the new rows, and `start` is checked once for all
    layers."""
    exe = tensorc.compile(decoder_step(decoder), "llvm", "O2")
    program = exe.program({"batch": 2, "seq": 1, "cache_len": 16})
    layers = decoder.cache_layout()[0]
    kinds = [getattr(getattr(s, "kernel", None), "kind", None) for s in program.steps]
    assert kinds.count("scatter") == 2 * layers and program.stats()["fallbacks"] == []
    readers = [s for s in program.steps if any(b.name.startswith("past.") for b in s.reads())]
    assert len(readers) == 2 * layers and all(s.skip_if_same for s in readers)
    names = exe.output_names
    assert {names[i]: b.name for i, b in program.aliases.items()} == {
        n: n.replace("present", "past") for n in names[1:]}
    checks = [s for s in program.steps if type(s).__name__ == "IndexCheck"]
    assert len([c for c in checks if c.lo == 0]) == 1


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_a_start_past_the_cache_is_an_error(decoder, backend):
    step = tensorc.compile(decoder_step(decoder), backend, "O2")
    layers, heads, d = decoder.cache_layout()
    feeds = {"input_ids": np.zeros((1, 2), np.int64), "start": np.array([7])}
    for name in step.input_names[2:]:
        feeds[name] = np.zeros((1, heads, 8, d), np.float32)
    with pytest.raises(TensorcError, match="(index 7 is out of range for writing 2 rows into "
                                           "an axis of 8|write index 7 .* room for 2 rows)"):
        step.run(feeds)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_tensor_scatter_lowering_with_a_shared_cache(backend):
    """A cache read by another node too is copied before the write (and the input is
    never changed)."""
    def f(cache, update, index):
        return tensorc.frontend.F.tensor_scatter(cache, update, index, axis=1) + cache * 2.0

    rng = np.random.default_rng(0)
    cache = rng.standard_normal((3, 9, 5)).astype(np.float32)
    update = rng.standard_normal((3, 2, 5)).astype(np.float32)
    index = np.array([0, 7, 3], np.int32)
    exe = tensorc.compile(tensorc.trace(f, cache, update, index), backend)
    kept = cache.copy()
    got = exe(cache, update, index)
    want = cache.copy()
    for b, i in enumerate(index):
        want[b, i:i + 2] = update[b]
    np.testing.assert_allclose(got, want + 2 * cache, rtol=1e-6)
    np.testing.assert_array_equal(cache, kept)


def test_sampling_is_seeded_and_its_cuts_work():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32)
    greedy = logits.argmax(-1)
    np.testing.assert_array_equal(sample(logits, rng), greedy)
    np.testing.assert_array_equal(sample(logits, rng, 1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample(logits, rng, 1.0, top_p=1e-6), greedy)
    a = sample(logits, np.random.default_rng(5), 0.9, top_k=10, top_p=0.8)
    b = sample(logits, np.random.default_rng(5), 0.9, top_k=10, top_p=0.8)
    np.testing.assert_array_equal(a, b)
    top3 = np.argsort(-logits, -1)[:, :3]
    for _ in range(50):   # top-k keeps only the k likeliest
        got = sample(logits, rng, 2.0, top_k=3)
        assert all(g in t for g, t in zip(got, top3, strict=True))


def test_sampling_draws_the_softmax_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([sample(logits, rng, 1.0)[0] for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # top_p 0.7: 0.5 + 0.3 reach it, so only the first two remain, renormalised
    draws = np.array([sample(logits, rng, 1.0, top_p=0.7)[0] for _ in range(5000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_sampled_cached_and_full_generation_agree(decoder, backend):
    options = dict(temperature=0.9, top_k=20, top_p=0.95, seed=7)
    cached = Generator(decoder, backend).generate(PROMPTS[3], 8, warmup=False, **options)
    full = Generator(full_graph(decoder), backend).generate(PROMPTS[3], 8, warmup=False,
                                                            **options)
    assert not full.cached and cached.new_tokens == full.new_tokens
    again = Generator(decoder, backend).generate(PROMPTS[3], 8, warmup=False, **options)
    assert again.new_tokens == cached.new_tokens


def test_stop_ids_end_each_row():
    m = models.get("gpt", "tiny")
    first = Generator(m, "numpy").generate(PROMPTS[3], 6, warmup=False)
    stop = first.new_tokens[1][2]   # row 1's third token
    got = Generator(m, "numpy").generate(PROMPTS[3], 6, warmup=False, stop_ids=(stop,))
    row = first.new_tokens[1]
    assert got.new_tokens[1] == row[:row.index(stop) + 1]
    for r in (0, 2):
        want = first.new_tokens[r]
        assert got.new_tokens[r] == (want[:want.index(stop) + 1] if stop in want else want)


@pytest.mark.parametrize("call, message", [
    (lambda g: g.generate([[1, 2]], 100), "exceeds the model's max_seq_len 64"),
    (lambda g: g.generate([[1, 200]], 3), "token id 200 is outside the vocabulary of 97"),
    (lambda g: g.generate([[]], 3), "at least one token"),
    (lambda g: g.generate([[1]], 0), "max_new_tokens must be at least 1"),
    (lambda g: g.generate([[1]], 2, top_p=0), "0 < top_p <= 1"),
    (lambda g: g.generate([[1]], 2, temperature=float("nan")), "finite temperature"),
    (lambda g: g.generate([[1]], 2, temperature=float("inf")), "finite temperature"),
])
def test_bad_generation_requests(call, message):
    with pytest.raises(InputError, match=message):
        call(Generator(models.get("gpt", "tiny"), "numpy"))


def test_a_generation_too_big_for_memory_is_refused_before_allocating():
    g = Generator(full_graph(models.get("gpt", "tiny")), "numpy")   # no max_seq_len
    with pytest.raises(TensorcError, match="generating 1000000000000 tokens for 1 prompt"):
        g.generate([[1, 2]], 10**12)


def test_a_graph_without_token_ids_cannot_generate():
    g = tensorc.trace(lambda x: x * 2.0, np.zeros((2, 3), np.float32))
    with pytest.raises(TensorcError, match="does not take token ids"):
        Generator(g, "numpy")


def test_byte_tokenizer_round_trip_and_streaming():
    tok = ByteTokenizer()
    text = "naïve café — 日本"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    stream = tok.stream()
    pieces = [stream([i]) for i in ids]    # one byte at a time: characters stay whole
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces                    # a multi-byte character waited for its bytes
    assert tok.decode([104, 105, tok.eos]) == "hi<|endoftext|>"
    with pytest.raises(InputError, match="at least 257"):
        tok.check(97)


def test_python_api_takes_text_ids_and_batches():
    m = models.get("gpt", "tiny", vocab_size=300)
    r = tensorc.generate(m, "hi", max_new_tokens=3, backend="numpy")
    assert r.ids[0][:2] == [104, 105] and len(r.ids[0]) <= 5
    r = tensorc.generate(m, [[1, 2], [3]], max_new_tokens=2, backend="numpy")
    assert [len(n) for n in r.new_tokens] == [2, 2]
    assert set(r.as_dict()) >= {"ids", "new_tokens", "tokens_per_s", "prefill_ms",
                                "ms_per_token"}


def test_cli_generate_streams_ids(capsys):
    assert main(["generate", "gpt", "--ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    ids = [int(t) for t in out.split()]
    want = Generator(models.get("gpt", "tiny"), "numpy").generate([[1, 2, 3]], 5)
    assert ids == want.ids[0]
    assert "tokens/s" in err and "KV cache" in err


def test_cli_generate_json_batch_and_text(capsys):
    assert main(["generate", "gpt", "--set", "vocab_size=300", "--prompt", "ab", "--prompt",
                 "c", "--max-new-tokens", "3", "--format", "json", "--backend", "numpy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"][0][:2] == [97, 98] and out["ids"][1][0] == 99
    assert out["text"][0].startswith("ab") and out["kv_cache"] is True
    assert out["tokens_per_s"] > 0 and out["ms_per_token"] > 0


@pytest.mark.parametrize("argv, message", [
    (["generate", "bert", "--ids", "1"], "bert is not a built-in decoder language model"),
    (["generate", "gpt", "--prompt", "hi"], "at least 257 ids, the model has 97"),
    (["generate", "gpt"], "give the prompt as --prompt TEXT or as --ids"),
    (["generate", "gpt", "--ids", "1,x"], "expected comma-separated token ids"),
    (["generate", "gpt", "--ids", "1", "--max-new-tokens", "100"], "max_seq_len 64"),
])
def test_cli_generate_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_generates_from_an_onnx_decoder_without_a_cache(tmp_path, capsys):
    """An imported graph from ids to logits runs whole-sequence steps, and picks the
    same tokens as the cached zoo model it was exported from."""
    from tensorc.frontend import onnx as onnx_io
    m = models.get("gpt", "tiny")
    path = str(tmp_path / "gpt.onnx")
    onnx_io.save(full_graph(m), path)
    assert main(["generate", path, "--ids", "1,2,3", "--ids", "4", "--max-new-tokens", "4",
                 "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache"] is False
    want = Generator(m, "numpy").generate([[1, 2, 3], [4]], 4)
    assert out["new_tokens"] == want.new_tokens


def test_cache_names_follow_the_exporters():
    g = decoder_step(models.get("gpt", "tiny"))
    assert [v.name for v in g.inputs][:3] == ["input_ids", "start", key_name(0)]
    assert g.outputs[1].name == "present.key.0" and g.outputs[2].name == "present.value.0"


def test_cupy_emulator_decode_step_leaves_device_caches_alone():
    """The cupy backend reads contiguous device inputs where they lie, the caches too:
    no step writes an input (the new rows go to the updated copies it returns)."""
    from tensorc.backends.cupy import CupyBackend
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    m = models.get("gpt", "tiny")
    g = tensorc.passes.run_pipeline(decoder_step(m), "O2")
    layers, heads, d = m.cache_layout()
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 97, (2, 3)), "start": np.array([0, 2])}
    for name in [v.name for v in g.inputs][2:]:
        feeds[name] = rng.standard_normal((2, heads, 8, d)).astype(np.float32)
    want = tensorc.compile(g, "numpy").run(feeds)
    exe = CupyBackend(cuda_graph=False).compile(g, runtime=EmulatedRuntime(device_inputs=True))
    kept = {k: v.copy() for k, v in feeds.items()}
    got = exe.run(feeds)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-5)
    for k, v in kept.items():
        np.testing.assert_array_equal(feeds[k], v)
    assert exe.stats["inputs_in_place"] == len(feeds)


@pytest.mark.parametrize("passes", ["O0", "O2"])
def test_decode_step_exports_to_onnx_runtime(tmp_path, passes):
    """The cached step exports (TensorScatter, opset 24) and ONNX Runtime runs a prefill
    and a decode step to the reference's numbers."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra")
    from tensorc.frontend import onnx as onnx_io
    m = models.get("gpt", "tiny")
    g = tensorc.passes.run_pipeline(decoder_step(m), passes)
    path = str(tmp_path / "step.onnx")
    onnx_io.save(g, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ref = tensorc.compile(g, "numpy")
    layers, heads, d = m.cache_layout()
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 97, (2, 4)), "start": np.zeros(2, np.int64)}
    for name in [v.name for v in g.inputs][2:]:
        feeds[name] = np.zeros((2, heads, 6, d), np.float32)
    for _ in range(2):
        want = ref.run(feeds)
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds),
                       strict=True))
        for k, w in want.items():
            np.testing.assert_allclose(got[k], w, rtol=1e-4, atol=1e-5)
        feeds = {"input_ids": want["logits"][:, -1:].argmax(-1), "start": np.array([4, 3]),
                 **{k.replace("present", "past"): v for k, v in want.items()
                    if k.startswith("present")}}
    assert onnx_io.load(path).nodes   # and it imports back


def test_cli_exports_a_cached_step_that_generates_with_its_cache(tmp_path, capsys):
    path = str(tmp_path / "step.onnx")
    assert main(["export", "gpt", "--kv-cache", "--passes", "O2", "-o", path]) == 0
    assert "cached step" in capsys.readouterr().out
    assert main(["generate", path, "--ids", "1,2,3", "--ids", "4", "--max-new-tokens", "4",
                 "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = Generator(models.get("gpt", "tiny"), "numpy").generate([[1, 2, 3], [4]], 4)
    assert out["kv_cache"] is True and out["new_tokens"] == want.new_tokens
    assert main(["export", "bert", "--kv-cache", "-o", path]) == 2


@pytest.mark.parametrize("name", ["gpt2_sdpa_dynamo", "gpt2_eager_legacy"])
def test_a_real_gpt2_export_generates_like_onnx_runtime(name):
    """Hugging Face GPT-2 exported by PyTorch (tests/data/hf): ids and an attention mask
    in, logits out. Whole-sequence steps with padding masked pick, for rows of unequal
    prompts, what ONNX Runtime's forward of each row alone picks."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra")
    from tensorc.frontend import onnx as onnx_io
    path = f"tests/data/hf/{name}.onnx"
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    prompts = [[5, 17, 3, 99, 42], [7, 8], [60, 61, 62]]
    got = Generator(onnx_io.load(path), "llvm").generate(prompts, 6, warmup=False)
    assert not got.cached
    for prompt, new in zip(prompts, got.new_tokens, strict=True):
        seq = list(prompt)
        for tok in new:
            ids = np.array([seq])
            logits = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
            assert tok == int(logits[0, -1].argmax())
            seq.append(tok)


@pytest.mark.parametrize("name", DECODERS)
def test_generation_on_a_gpu(name):
    """Cached generation on the cupy backend (CUDA graphs, device caches fed back)
    picks the numpy reference's tokens."""
    from tensorc.backends.cupy import unavailable_reason
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"GPU tests: {reason}")
    m = models.get(name, "tiny")
    got = Generator(m, "cupy").generate(PROMPTS[3], 10, warmup=False)
    want = Generator(m, "numpy").generate(PROMPTS[3], 10, warmup=False)
    assert got.new_tokens == want.new_tokens


def test_donated_caches_are_updated_in_place_on_llvm():
    """A cache passed back as its own output's `out` is written where it lies: only the
    new rows change, the returned array is the caller's, and the numbers are the
    reference's. Without donation the input is left alone."""
    m = models.get("gpt", "tiny")
    step = tensorc.compile(decoder_step(m), "llvm", "O2")
    ref = tensorc.compile(decoder_step(m), "numpy")
    layers, heads, d = m.cache_layout()
    rng = np.random.default_rng(3)
    feeds = {"input_ids": rng.integers(0, 97, (2, 1)), "start": np.array([3, 5])}
    for name in step.input_names[2:]:
        feeds[name] = rng.standard_normal((2, heads, 8, d)).astype(np.float32)
    want = ref.run({k: v.copy() for k, v in feeds.items()})
    kept = {k: v.copy() for k, v in feeds.items()}
    plain = step.run(feeds)
    for k, v in kept.items():
        np.testing.assert_array_equal(feeds[k], v)
    donate = {n.replace("past", "present"): feeds[n] for n in step.input_names[2:]}
    got = step.run(feeds, out=donate)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(plain[name], w, rtol=1e-5, atol=1e-6)
    for name, a in donate.items():
        assert got[name] is a   # the caller's array, updated in place
        past = kept[name.replace("present", "past")]
        changed = np.argwhere((a != past).any(axis=(1, 3)))   # (batch row, position)
        assert sorted(map(tuple, changed)) == [(0, 3), (1, 5)]
    runner = step.specialise({"batch": 2, "seq": 1, "cache_len": 8})
    for i, buf in runner.program.aliases.items():   # computed there, not aside and copied
        a = donate[step.output_names[i]]
        assert runner.pointer(runner.program.outputs[i].buf) == a.ctypes.data
        assert runner.pointer(buf) == a.ctypes.data
