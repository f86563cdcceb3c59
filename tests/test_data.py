"""tensorc.data: the training datasets are deterministic, cleaned as reported, split
without leaks, and batched in the shapes and label conventions the zoo models take."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest

from tensorc import data
from tensorc.errors import TensorcError

SKLEARN = "scikit-learn (in the test extra) bundles the digits images"
SACREBLEU = "sacrebleu (in the test extra) computes BLEU"


def _long_text(seed: int, words: int = 400) -> str:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(300)]
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), words))


@pytest.fixture(scope="module")
def corpus():
    return data.stdlib_corpus(max_bytes=400_000, val_fraction=0.2, seed=0)


# ----------------------------------------------------------------------------- cleaning


def test_cleaning_drops_planted_duplicates_and_keeps_a_different_text():
    base = _long_text(1)
    words = base.split()
    words[200] = "changed"   # one token in 400: Jaccard of 5-gram sets ~0.98
    texts = [("a", base), ("b", _long_text(2)), ("a_copy", base), ("a_edit", " ".join(words)),
             ("tiny", "x = 1\n"), ("huge", "y" * 5000)]
    kept, report = data.clean_texts(texts, min_bytes=50, max_bytes=4000)
    assert [n for n, _ in kept] == ["a", "b"]
    assert (report.kept, report.exact_duplicate, report.near_duplicate,
            report.too_short, report.too_long) == (2, 1, 1, 1, 1)
    assert report.too_long_bytes == 5000 and report.too_short_bytes == 6
    assert report.exact_duplicate_bytes == len(base.encode())
    assert report.kept_bytes == sum(len(t.encode()) for _, t in kept)
    assert ("a_copy", "exact_duplicate", "a") in report.dropped
    assert ("a_edit", "near_duplicate", "a") in report.dropped
    lines = report.lines()
    assert lines[0].startswith("cleaning: 6 texts")
    assert any("near duplicate" in line and " 1 texts" in line for line in lines)


def test_near_duplicate_threshold_is_a_jaccard_threshold():
    base = _long_text(3, 200).split()
    half = " ".join(base[:100] + _long_text(4, 100).split())   # ~1/3 of 5-grams shared
    texts = [("a", " ".join(base)), ("b", half)]
    assert len(data.clean_texts(texts, min_bytes=1)[0]) == 2
    assert len(data.clean_texts(texts, min_bytes=1, near_dup_threshold=0.2)[0]) == 1


def test_cleaning_is_deterministic_and_rejects_a_bad_threshold():
    texts = [(str(i), _long_text(i % 5)) for i in range(12)]
    a, ra = data.clean_texts(texts, min_bytes=1)
    b, rb = data.clean_texts(texts, min_bytes=1)
    assert a == b and ra == rb and ra.kept == 5
    with pytest.raises(TensorcError, match="near_dup_threshold"):
        data.clean_texts(texts, near_dup_threshold=0)


def test_minhash_estimates_jaccard():
    mh = data.MinHash(num_perm=256, seed=0)
    a, b = mh.shingles(_long_text(5, 2000)), mh.shingles(_long_text(6, 2000))
    half = np.union1d(a[: len(a) // 2], b[: len(b) // 2])
    exact = len(np.intersect1d(a, half)) / len(np.union1d(a, half))
    estimate = np.mean(mh.signature(a) == mh.signature(half))
    assert abs(estimate - exact) < 0.1
    assert np.array_equal(mh.signature(a), data.MinHash(num_perm=256, seed=0).signature(a))


# ----------------------------------------------------------------------------- stdlib text


def test_stdlib_texts_are_sorted_relative_and_without_tests():
    texts = data.stdlib_texts(limit_files=60)
    names = [n for n, _ in texts]
    assert len(texts) == 60 and names == sorted(names)
    assert all(not n.startswith("/") and n.endswith(".py") for n in names)
    every = [n for n, _ in data.stdlib_texts()]
    assert "os.py" in every and "json/decoder.py" in every
    parts = {p for n in every for p in n.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}


def test_stdlib_corpus_is_deterministic_capped_and_split_by_file(corpus):
    again = data.stdlib_corpus(max_bytes=400_000, val_fraction=0.2, seed=0)
    assert np.array_equal(corpus.train, again.train) and np.array_equal(corpus.val, again.val)
    assert len(corpus.train) + len(corpus.val) <= 400_000
    assert corpus.train_files and corpus.val_files
    assert not set(corpus.train_files) & set(corpus.val_files)
    texts = dict(data.stdlib_texts())
    for stream, files in ((corpus.train, corpus.train_files), (corpus.val, corpus.val_files)):
        assert stream.dtype == np.uint16 and stream[-1] == data.EOS_ID
        ends = np.flatnonzero(stream == data.EOS_ID)
        pieces = np.split(stream, ends + 1)[:-1]
        assert [bytes(p[:-1].astype(np.uint8)).decode() for p in pieces] == \
               [texts[f] for f in files]   # whole files, in order, each followed by EOS
    assert corpus.report.kept == len(corpus.train_files) + len(corpus.val_files)
    other = data.stdlib_corpus(max_bytes=400_000, val_fraction=0.2, seed=1)
    assert other.val_files != corpus.val_files


def test_stdlib_corpus_rejects_unknown_options():
    with pytest.raises(TensorcError, match="colour"):
        data.stdlib_corpus(max_bytes=10_000, colour="red")


# ----------------------------------------------------------------------------- LM batches


def test_clm_labels_are_the_next_tokens(corpus):
    b = data.clm_batch(corpus.train, 8, 64, np.random.default_rng(0))
    assert b["input_ids"].shape == b["labels"].shape == (8, 64)
    assert b["input_ids"].dtype == b["labels"].dtype == np.int64
    assert np.array_equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    stream = corpus.train.astype(np.int64)
    for row_in, row_lab in zip(b["input_ids"], b["labels"], strict=True):
        start = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
            stream, 65) == np.append(row_in, row_lab[-1]), axis=1))
        assert len(start) >= 1
    again = data.clm_batch(corpus.train, 8, 64, np.random.default_rng(0))
    assert np.array_equal(b["input_ids"], again["input_ids"])
    with pytest.raises(TensorcError, match="fewer than one window"):
        data.clm_batch(corpus.train[:10], 1, 64, np.random.default_rng(0))


def test_clm_eval_batches_cover_the_stream_once():
    tokens = np.arange(1000) % 257
    batches = list(data.clm_eval_batches(tokens, batch=4, seq=32))
    assert all(b["input_ids"].shape == b["labels"].shape == (4, 32) for b in batches)
    inputs = np.concatenate([b["input_ids"].ravel() for b in batches])
    labels = np.concatenate([b["labels"].ravel() for b in batches])
    real = labels != data.IGNORE_INDEX
    assert np.array_equal(labels[real], tokens[1:]) and np.array_equal(inputs[real], tokens[:-1])
    assert real.sum() == len(tokens) - 1 and len(batches) == 8   # ceil(999 / 32 / 4)


def test_mlm_masks_80_10_10():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, 100_000).astype(np.uint16)
    b = data.mlm_batch(tokens, 512, 128, rng)
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape == b["attention_mask"].shape == (512, 128)
    assert ids.dtype == labels.dtype == b["attention_mask"].dtype == np.int64
    assert np.all(b["attention_mask"] == 1)
    chosen = labels != data.IGNORE_INDEX
    assert np.all(chosen.sum(axis=1) == round(0.15 * 128))
    n = chosen.sum()
    masked = np.mean(ids[chosen] == data.MASK_ID)
    same = np.mean(ids[chosen] == labels[chosen])
    other = np.mean((ids[chosen] != labels[chosen]) & (ids[chosen] != data.MASK_ID))
    assert n > 9000   # standard errors below 0.005: the tolerances are over 4 of them
    assert abs(masked - 0.8) < 0.02
    assert abs(same - (0.1 + 0.1 / 256)) < 0.015   # a random byte may be the same one
    assert abs(other - 0.1 * 255 / 256) < 0.015
    assert np.all(ids[chosen & (ids != data.MASK_ID)] < 256)
    assert ids.max() < data.MLM_VOCAB
    # unchosen positions are the window itself: the labels' originals fill them back
    originals = np.where(chosen, labels, ids)
    assert all(np.any(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 128) == row,
                              axis=1)) for row in originals[:4])


def test_mlm_chooses_at_least_one_per_row_and_is_deterministic():
    tokens = np.arange(50) % 256
    a = data.mlm_batch(tokens, 16, 3, np.random.default_rng(7))
    b = data.mlm_batch(tokens, 16, 3, np.random.default_rng(7))
    assert np.all((a["labels"] != data.IGNORE_INDEX).sum(axis=1) == 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_stratified_split():
    pytest.importorskip("sklearn", reason=SKLEARN)
    d = data.digits(val_fraction=0.2, seed=0)
    n_train, n_val = len(d["train_labels"]), len(d["val_labels"])
    assert n_train + n_val == 1797
    for part, n in (("train", n_train), ("val", n_val)):
        images = d[f"{part}_images"]
        assert images.shape == (n, 1, 8, 8) and images.dtype == np.float32
        assert images.min() == 0.0 and images.max() == 1.0
        assert d[f"{part}_labels"].dtype == np.int64
    all_counts = np.bincount(np.concatenate([d["train_labels"], d["val_labels"]]))
    val_counts = np.bincount(d["val_labels"], minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * all_counts) <= 1)   # stratified per class
    again = data.digits(val_fraction=0.2, seed=0)
    assert all(np.array_equal(d[k], again[k]) for k in d)
    other = data.digits(val_fraction=0.2, seed=1)
    assert not np.array_equal(d["val_images"], other["val_images"])
    # no image is in both halves (the digits set has no exact duplicate images)
    train_rows = {r.tobytes() for r in d["train_images"]}
    assert not any(r.tobytes() in train_rows for r in d["val_images"])
    b = data.image_batch(d["train_images"], d["train_labels"], 32, np.random.default_rng(0))
    assert b["pixel_values"].shape == (32, 1, 8, 8) and b["pixel_values"].dtype == np.float32
    assert b["labels"].shape == (32,) and b["labels"].dtype == np.int64


def test_missing_optional_packages_name_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)       # import now fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(TensorcError, match="pip install scikit-learn"):
        data.digits()
    with pytest.raises(TensorcError, match="pip install sacrebleu"):
        data.bleu(["a"], ["a"])


# ----------------------------------------------------------------------------- translation


def test_translation_pairs_are_dates_and_deterministic():
    pairs = data.translation_pairs(200, seed=0)
    assert pairs == data.translation_pairs(200, seed=0) != data.translation_pairs(200, seed=1)
    assert all(len(s) == 10 and t.startswith("the ") for s, t in pairs)
    assert data.date_to_english("2024-03-07") == "the 7th of March, 2024"
    suffixes = {d: data.date_to_english(f"2001-01-{d:02d}").split()[1] for d in
                (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)}
    assert suffixes == {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th",
                        13: "13th", 21: "21st", 22: "22nd", 23: "23rd", 31: "31st"}


def test_translation_batch_round_trips():
    pairs = data.translation_pairs(50, seed=0)
    b = data.translation_batch(pairs, 16, 12, 28, np.random.default_rng(0))
    assert b["src_ids"].shape == (16, 12) and b["tgt_ids"].shape == b["labels"].shape == (16, 28)
    assert all(v.dtype == np.int64 for v in b.values())
    targets = dict(pairs)
    for src, tgt, lab in zip(b["src_ids"], b["tgt_ids"], b["labels"], strict=True):
        source = data.decode_target(src)
        target = data.decode_target(np.where(lab == data.IGNORE_INDEX, data.PAD_ID, lab))
        assert targets[source] == target
        n = len(target)
        assert tgt[0] == data.BOS_ID and np.array_equal(tgt[1:n + 1], lab[:n])  # teacher forcing
        assert lab[n] == data.EOS_ID and np.all(lab[n + 1:] == data.IGNORE_INDEX)
        assert np.all(tgt[n + 1:] == data.PAD_ID) and src[10] == data.EOS_ID
    assert max(v.max() for v in b.values()) < data.TRANSLATION_VOCAB
    with pytest.raises(TensorcError, match="needs"):
        data.translation_batch(pairs, 2, 12, 10, np.random.default_rng(0))


def test_bleu_of_identical_is_100_and_of_garbage_is_low():
    pytest.importorskip("sacrebleu", reason=SACREBLEU)
    refs = [t for _, t in data.translation_pairs(20, seed=0)]
    assert data.bleu(refs, refs) == pytest.approx(100.0)
    assert data.bleu(["zz qq xx yy ww vv"] * 20, refs) < 5
    with pytest.raises(TensorcError, match="hypotheses"):
        data.bleu(refs[:3], refs)


# ----------------------------------------------------------------------------- the models


def test_batches_fit_the_zoo_models_forward(corpus):
    """The batch keys are the forward's parameter names, and a tiny model runs them."""
    import tensorc.models

    rng = np.random.default_rng(0)
    cases = [
        ("gpt", {"vocab_size": data.EOS_ID + 1}, data.clm_batch(corpus.train, 2, 16, rng)),
        ("bert", {"vocab_size": data.MLM_VOCAB}, data.mlm_batch(corpus.train, 2, 16, rng)),
        ("transformer", {"vocab_size": data.TRANSLATION_VOCAB},
         data.translation_batch(data.translation_pairs(8), 2, 12, 28, rng)),
        ("vit", {"vocab_size": 10, "channels": 1, "image_size": 8, "patch_size": 4},
         {"pixel_values": rng.random((2, 1, 8, 8), dtype=np.float32), "labels": None}),
    ]
    for name, overrides, batch in cases:
        model = tensorc.models.get(name, "tiny", **overrides)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        params = list(inspect.signature(model.forward).parameters)
        assert set(inputs) <= set(params), name
        logits = model(**inputs).numpy()
        assert logits.shape[0] == 2 and np.all(np.isfinite(logits)), name
        if batch["labels"] is not None:
            assert logits.shape[:-1] == batch["labels"].shape
            assert logits.shape[-1] == overrides["vocab_size"]
