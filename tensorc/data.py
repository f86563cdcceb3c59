"""Training data for tensorc's examples: small, local, deterministic datasets.

Nothing here downloads anything or unpickles anything; every dataset is built from the
Python install and the optional `train` extra (scikit-learn, sacrebleu), and the same
`seed` gives the same arrays everywhere.

- Text (causal and masked language modelling): the standard library's own `.py` files
  (`stdlib_texts`), cleaned (`clean_texts`: length filters, exact and MinHash near
  duplicates, with a `CleanReport`), split train/val by file and concatenated as
  byte ids with 256 (`ByteTokenizer.eos`) after each file (`stdlib_corpus`).
  `clm_batch` samples next-token windows; `clm_eval_batches` walks the val stream
  once for bits per byte; `mlm_batch` masks BERT-style (80/10/10, `MASK_ID` 257,
  vocabulary 258, `IGNORE_INDEX` -100 on unchosen labels).
- Images: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  scaled to [0, 1] as [n, 1, 8, 8] float32, split stratified by class (`digits`,
  `image_batch`).
- Translation: ISO dates to English ("2024-03-07" -> "the 7th of March, 2024"), byte
  ids plus EOS 256, BOS 257, PAD 258 (vocabulary 259), scored with sacrebleu's BLEU
  (`translation_pairs`, `translation_batch`, `bleu`). The target has six BLEU tokens
  on purpose: a sentence under four tokens has no 4-grams and scores 0 even when exact.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tensorc.errors import TensorcError

EOS_ID = 256            # ByteTokenizer.eos: the separator after every file
MASK_ID = 257
MLM_VOCAB = 258
IGNORE_INDEX = -100     # labels the loss skips (the PyTorch / Hugging Face convention)
BOS_ID = 257            # translation only: the decoder's start token
PAD_ID = 258
TRANSLATION_VOCAB = 259

REASONS = ("kept", "exact_duplicate", "near_duplicate", "too_short", "too_long")

# ----------------------------------------------------------------------------- cleaning


@dataclasses.dataclass
class CleanReport:
    """What cleaning kept and dropped: texts and UTF-8 bytes per reason."""

    kept: int = 0
    kept_bytes: int = 0
    exact_duplicate: int = 0
    exact_duplicate_bytes: int = 0
    near_duplicate: int = 0
    near_duplicate_bytes: int = 0
    too_short: int = 0
    too_short_bytes: int = 0
    too_long: int = 0
    too_long_bytes: int = 0
    undecodable: int = 0            # files skipped before cleaning (not UTF-8)
    undecodable_bytes: int = 0
    # (name, reason, the kept text it duplicates or "") per dropped text, in input order
    dropped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def count(self, reason: str, size: int, name: str = "", of: str = "") -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        setattr(self, reason + "_bytes", getattr(self, reason + "_bytes") + size)
        if reason != "kept":
            self.dropped.append((name, reason, of))

    def lines(self) -> list[str]:
        reasons = REASONS + (("undecodable",) if self.undecodable else ())
        total = sum(getattr(self, r) for r in reasons)
        total_bytes = sum(getattr(self, r + "_bytes") for r in reasons)
        out = [f"cleaning: {total} texts, {total_bytes:,} bytes in"]
        for r in reasons:
            out.append(f"  {r.replace('_', ' '):<16}{getattr(self, r):>6} texts "
                       f"{getattr(self, r + '_bytes'):>13,} bytes")
        return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of a linear shingle combination, so the
    linear hash family below acts like independent permutations."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MinHash:
    """MinHash signatures of word n-gram shingles, deterministic given `seed`."""

    def __init__(self, num_perm: int = 64, ngram: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        # h_k(s) = (a_k s + b_k) mod 2^64 >> 32: multiply-shift hashing, a_k odd
        self.a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.weights = rng.integers(0, 2**63, ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.ngram = ngram
        self._words: dict[str, int] = {}   # word -> 64-bit hash, shared across texts

    def _word_hashes(self, text: str) -> np.ndarray:
        cache = self._words
        out = []
        for w in text.split():
            h = cache.get(w)
            if h is None:   # blake2b, not hash(): str hashes change per process
                h = cache[w] = int.from_bytes(
                    hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                    "little")
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """The set of hashed word n-grams (a shorter text is one shingle of all its words)."""
        words = self._word_hashes(text)
        n = min(self.ngram, len(words))
        if n == 0:
            return words
        with np.errstate(over="ignore"):
            s = np.zeros(len(words) - n + 1, dtype=np.uint64)
            for k in range(n):
                s += words[k:len(words) - n + 1 + k] * self.weights[k]
            return np.unique(_mix64(s))

    def signature(self, s: np.ndarray) -> np.ndarray:
        """The minimum of each of the `num_perm` hash functions over the shingles `s`."""
        sig = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(s), 16384):   # bounds the [shingles, perms] temporary
                h = (s[i:i + 16384, None] * self.a + self.b) >> np.uint64(32)
                np.minimum(sig, h.min(axis=0), out=sig)
        return sig


def _bands(num_perm: int, threshold: float) -> int:
    """Rows per LSH band: the most rows whose candidate threshold (1/b)^(1/r) sits well
    below `threshold`, so near duplicates almost always share a band (then the full
    signature decides)."""
    best = 1
    for r in range(1, num_perm + 1):
        if num_perm % r == 0 and (r / num_perm) ** (1 / r) <= 0.75 * threshold:
            best = r
    return best


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two sorted unique arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


class _Cleaner:
    """Incremental `clean_texts`: texts come one at a time, the first seen is kept."""

    def __init__(self, min_bytes: int, max_bytes: int, near_dup_threshold: float,
                 num_perm: int, seed: int):
        if not 0 < near_dup_threshold <= 1:
            raise TensorcError(f"near_dup_threshold must be in (0, 1], got {near_dup_threshold}")
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self.threshold = near_dup_threshold
        self.minhash = MinHash(num_perm, seed=seed)
        self.rows = _bands(num_perm, near_dup_threshold)
        self.seen: dict[bytes, str] = {}                 # content digest -> name
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.sigs: list[np.ndarray] = []
        self.shingles: list[np.ndarray] = []      # sorted unique, per kept text
        self.names: list[str] = []
        self.report = CleanReport()

    def add(self, name: str, text: str, budget: int | None = None) -> str:
        """The reason for `text`; "over_budget" (nothing recorded) when it would be kept
        but is longer than `budget` bytes."""
        data = text.encode("utf-8", "surrogatepass")
        size = len(data)
        if size < self.min_bytes:
            self.report.count("too_short", size, name)
            return "too_short"
        if size > self.max_bytes:
            self.report.count("too_long", size, name)
            return "too_long"
        digest = hashlib.sha256(data).digest()
        if digest in self.seen:
            self.report.count("exact_duplicate", size, name, self.seen[digest])
            return "exact_duplicate"
        shingles = self.minhash.shingles(text)
        sig = self.minhash.signature(shingles)
        keys = [(i, sig[i:i + self.rows].tobytes()) for i in range(0, len(sig), self.rows)]
        candidates = {j for k in keys for j in self.buckets.get(k, ())}
        for j in sorted(candidates):
            # 64 hashes estimate J with a standard error of ~0.05 near 0.8: the estimate
            # (with that margin) only picks pairs worth the exact count over the shingles
            if (np.mean(self.sigs[j] == sig) >= self.threshold - 0.15
                    and _jaccard(self.shingles[j], shingles) >= self.threshold):
                self.report.count("near_duplicate", size, name, self.names[j])
                return "near_duplicate"
        if budget is not None and size > budget:
            return "over_budget"
        self.seen[digest] = name
        for k in keys:
            self.buckets.setdefault(k, []).append(len(self.sigs))
        self.sigs.append(sig)
        self.shingles.append(shingles)
        self.names.append(name)
        self.report.count("kept", size, name)
        return "kept"


def clean_texts(texts: list[tuple[str, str]], min_bytes: int = 128, max_bytes: int = 512_000,
                near_dup_threshold: float = 0.8, seed: int = 0, num_perm: int = 64
                ) -> tuple[list[tuple[str, str]], CleanReport]:
    """Drop too short / too long texts (UTF-8 bytes), exact duplicates (SHA-256 of the
    content) and near duplicates: word 5-gram shingle sets with Jaccard similarity >=
    `near_dup_threshold` to a kept text, found by MinHash (`num_perm` hashes, LSH bands)
    and confirmed by the exact Jaccard of the two sets. The first seen of duplicates is
    kept. Returns (kept, report)."""
    cleaner = _Cleaner(min_bytes, max_bytes, near_dup_threshold, num_perm, seed)
    kept = [(name, text) for name, text in texts if cleaner.add(name, text) == "kept"]
    return kept, cleaner.report


# ----------------------------------------------------------------------------- stdlib text

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")   # what a --data folder contributes


def _tree_files(root: Path, suffixes=(".py",), skip=_SKIP_DIRS) -> list[tuple[str, Path]]:
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.suffix in suffixes and not skip & set(rel.parts[:-1]) and path.is_file():
            files.append((rel.as_posix(), path))
    return sorted(files)   # by relative path: the same order on every machine


def _stdlib_files() -> list[tuple[str, Path]]:
    return _tree_files(Path(sysconfig.get_paths()["stdlib"]))


def _user_files(path: str) -> list[tuple[str, Path]]:
    """A text file, or a folder's text files (TEXT_SUFFIXES), for `text_corpus`."""
    p = Path(path)
    if p.is_file():
        return [(p.name, p)]
    if not p.is_dir():
        raise TensorcError(f"file not found: {path}")
    files = _tree_files(p, TEXT_SUFFIXES, {"__pycache__", ".git"})
    if not files:
        raise TensorcError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) in it")
    return files


def _read_stdlib(limit_files: int | None, skipped: list[str] | None,
                 files: list[tuple[str, Path]] | None = None
                 ) -> Iterator[tuple[str, str, int]]:
    """(name, text, size) in order (the stdlib's, or `files`); undecodable files go to
    `skipped`, size -1."""
    for name, path in (_stdlib_files() if files is None else files)[:limit_files]:
        data = path.read_bytes()
        try:
            yield name, data.decode("utf-8"), len(data)
        except UnicodeDecodeError:
            if skipped is not None:
                skipped.append(name)
            yield name, "", -len(data) - 1


def stdlib_texts(limit_files: int | None = None, skipped: list[str] | None = None
                 ) -> list[tuple[str, str]]:
    """The standard library's own `.py` files as (relative path, text), sorted by path,
    without site-packages and test directories. Files that are not UTF-8 are left out;
    their names are appended to `skipped` when it is given."""
    return [(name, text) for name, text, size in _read_stdlib(limit_files, skipped)
            if size >= 0]


@dataclasses.dataclass
class TextCorpus:
    """Byte ids (0..255, 256 after every file) of the train and val files."""

    train: np.ndarray
    val: np.ndarray
    report: CleanReport
    train_files: list[str] = dataclasses.field(default_factory=list)
    val_files: list[str] = dataclasses.field(default_factory=list)


def _unit_hash(name: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def encode_files(texts: list[str]) -> np.ndarray:
    """Concatenated UTF-8 byte ids, each text followed by `EOS_ID` (uint16)."""
    blobs = [t.encode("utf-8", "surrogatepass") for t in texts]
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    out = np.empty(int(lengths.sum()) + len(blobs), dtype=np.uint16)
    is_eos = np.zeros(len(out), dtype=bool)
    is_eos[np.cumsum(lengths + 1) - 1] = True
    out[is_eos] = EOS_ID
    out[~is_eos] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return out


def stdlib_corpus(max_bytes: int | None = None, val_fraction: float = 0.05, seed: int = 0,
                  max_file_bytes: int = 512_000, limit_files: int | None = None,
                  **clean_kwargs) -> TextCorpus:
    """The cleaned stdlib as a train/val byte stream: `text_corpus` of the stdlib."""
    return text_corpus(None, max_bytes, val_fraction, seed, max_file_bytes, limit_files,
                       **clean_kwargs)


def text_corpus(path: str | None = None, max_bytes: int | None = None,
                val_fraction: float = 0.05, seed: int = 0, max_file_bytes: int = 512_000,
                limit_files: int | None = None, **clean_kwargs) -> TextCorpus:
    """Cleaned text (the stdlib's `.py` files, or `path`: a text file or a folder of
    them) as a train/val byte stream, split by file: a file goes wholly to val when a
    hash of (seed, name) falls under `val_fraction` (each side gets at least one file;
    a single file is split at 1 - val_fraction of its bytes instead). `max_bytes` caps
    the total ids, taking whole cleaned files in path order, and the report covers only
    the files looked at. `clean_kwargs` go to `clean_texts` (its per-file `max_bytes`
    is `max_file_bytes` here)."""
    if not 0 <= val_fraction < 1:
        raise TensorcError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cleaner = _Cleaner(clean_kwargs.pop("min_bytes", 128), max_file_bytes,
                       clean_kwargs.pop("near_dup_threshold", 0.8),
                       clean_kwargs.pop("num_perm", 64), seed)
    if clean_kwargs:
        raise TensorcError(f"stdlib_corpus got unknown options: {', '.join(clean_kwargs)}")
    kept: list[tuple[str, str]] = []
    total = 0
    files = None if path is None else _user_files(path)
    for name, text, size in _read_stdlib(limit_files, None, files):
        if size < 0:
            cleaner.report.undecodable += 1
            cleaner.report.undecodable_bytes += -size - 1
            cleaner.report.dropped.append((name, "undecodable", ""))
            continue
        budget = None if max_bytes is None else max_bytes - total - 1   # -1: its EOS
        reason = cleaner.add(name, text, budget)
        if reason == "over_budget":
            break
        if reason == "kept":
            kept.append((name, text))
            total += size + 1
    if not kept:
        raise TensorcError(f"{path or 'the standard library'}: no file is left after "
                           f"cleaning within max_bytes={max_bytes} ({cleaner.report.lines()[0]})")
    if len(kept) == 1 and val_fraction > 0:   # one file: its tail is held out
        name, text = kept[0]
        cut = int(len(text) * (1 - val_fraction))
        return TextCorpus(encode_files([text[:cut]]), encode_files([text[cut:]]),
                          cleaner.report, [name], [name])
    u = {name: _unit_hash(name, seed) for name, _ in kept}
    val_names = {n for n in u if u[n] < val_fraction}
    if len(kept) > 1 and val_fraction > 0 and not val_names:
        val_names = {min(u, key=u.get)}
    if len(val_names) == len(kept) and len(kept) > 1:
        val_names.discard(max(val_names, key=u.get))
    train = [(n, t) for n, t in kept if n not in val_names]
    val = [(n, t) for n, t in kept if n in val_names]
    return TextCorpus(encode_files([t for _, t in train]), encode_files([t for _, t in val]),
                      cleaner.report, [n for n, _ in train], [n for n, _ in val])


# ----------------------------------------------------------------------------- LM batches


def _windows(tokens: np.ndarray, batch: int, length: int, rng: np.random.Generator
             ) -> np.ndarray:
    if batch < 1 or length < 1:
        raise TensorcError(f"batch and seq must be at least 1, got batch={batch}")
    if len(tokens) < length:
        raise TensorcError(f"the token stream has {len(tokens)} ids, fewer than one window "
                           f"of {length}")
    starts = rng.integers(0, len(tokens) - length + 1, batch)
    return np.asarray(tokens)[starts[:, None] + np.arange(length)].astype(np.int64)


def clm_batch(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator
              ) -> dict[str, np.ndarray]:
    """Random windows of seq+1 ids: `input_ids` the first seq, `labels` the next ids."""
    w = _windows(tokens, batch, seq + 1, rng)
    return {"input_ids": w[:, :-1], "labels": w[:, 1:]}


def clm_eval_batches(tokens: np.ndarray, batch: int, seq: int
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Non-overlapping windows over the whole stream in order, [batch, seq] each: every id
    after the first is a label exactly once. The last window and batch are padded
    (input `EOS_ID`, label `IGNORE_INDEX`), so shapes never change; count the labels
    that are not `IGNORE_INDEX` to average (EOS separators are labels too)."""
    if batch < 1 or seq < 1:
        raise TensorcError(f"batch and seq must be at least 1, got {batch} and {seq}")
    tokens = np.asarray(tokens).astype(np.int64)
    n_windows = -(-(len(tokens) - 1) // seq)
    n_batches = -(-n_windows // batch)
    size = n_batches * batch * seq
    inputs = np.full(size, EOS_ID, dtype=np.int64)
    labels = np.full(size, IGNORE_INDEX, dtype=np.int64)
    inputs[:len(tokens) - 1] = tokens[:-1]
    labels[:len(tokens) - 1] = tokens[1:]
    inputs = inputs.reshape(n_batches, batch, seq)
    labels = labels.reshape(n_batches, batch, seq)
    for i in range(n_batches):
        yield {"input_ids": inputs[i], "labels": labels[i]}


def mlm_batch(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator,
              mask_prob: float = 0.15) -> dict[str, np.ndarray]:
    """BERT masking on random windows: round(mask_prob * seq) positions per row (at least
    one) are chosen; of those 80 % become `MASK_ID`, 10 % a random byte, 10 % stay.
    `labels` hold the original id at chosen positions, `IGNORE_INDEX` elsewhere."""
    ids = _windows(tokens, batch, seq, rng)
    k = max(1, round(mask_prob * seq))
    # the k smallest of per-position random keys: exactly k distinct positions per row
    chosen_pos = np.argsort(rng.random((batch, seq)), axis=1)[:, :k]
    chosen = np.zeros((batch, seq), dtype=bool)
    np.put_along_axis(chosen, chosen_pos, True, axis=1)
    labels = np.where(chosen, ids, IGNORE_INDEX)
    u = rng.random((batch, seq))
    random_bytes = rng.integers(0, 256, (batch, seq))
    inputs = ids.copy()
    inputs[chosen & (u < 0.8)] = MASK_ID
    swap = chosen & (u >= 0.8) & (u < 0.9)
    inputs[swap] = random_bytes[swap]
    return {"input_ids": inputs, "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "labels": labels}


# ----------------------------------------------------------------------------- digits


def digits(val_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: `train_images`/`val_images` float32 [n, 1, 8, 8]
    in [0, 1], `train_labels`/`val_labels` int64; the split is stratified by class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TensorcError("the digits dataset needs scikit-learn: pip install scikit-learn "
                           "(or pip install 'tensorc[train]')") from None
    if not 0 < val_fraction < 1:
        raise TensorcError(f"val_fraction must be in (0, 1), got {val_fraction}")
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]   # pixel values are 0..16
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):   # per class, so val has the class mix of the whole
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[:round(val_fraction * len(idx))])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[np.concatenate(val)] = True
    train_idx = rng.permutation(np.flatnonzero(~is_val))
    val_idx = np.flatnonzero(is_val)
    return {"train_images": images[train_idx], "train_labels": labels[train_idx],
            "val_images": images[val_idx], "val_labels": labels[val_idx]}


def image_batch(images: np.ndarray, labels: np.ndarray, batch: int, rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
    """`batch` distinct random images: `pixel_values` float32, `labels` int64."""
    if not 1 <= batch <= len(images):
        raise TensorcError(f"batch must be in 1..{len(images)}, got {batch}")
    idx = rng.choice(len(images), batch, replace=False)
    return {"pixel_values": np.ascontiguousarray(images[idx], dtype=np.float32),
            "labels": np.asarray(labels[idx], dtype=np.int64)}


# ----------------------------------------------------------------------------- translation

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def date_to_english(iso: str) -> str:
    """"2024-03-07" -> "the 7th of March, 2024" (the reference translation)."""
    d = datetime.date.fromisoformat(iso)
    return f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}"


def translation_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (source, target) pairs of uniformly random dates in 1900..2099."""
    rng = np.random.default_rng(seed)
    first = datetime.date(1900, 1, 1).toordinal()
    last = datetime.date(2099, 12, 31).toordinal()
    days = rng.integers(first, last + 1, n)
    pairs = []
    for o in days:
        iso = datetime.date.fromordinal(int(o)).isoformat()
        pairs.append((iso, date_to_english(iso)))
    return pairs


def _ids(text: str, length: int, what: str) -> list[int]:
    """The UTF-8 bytes of `text`, checked to fit `length` with one token added."""
    ids = list(text.encode("utf-8"))
    if len(ids) + 1 > length:
        raise TensorcError(f"{what} {text!r} needs {len(ids) + 1} ids with its end token, "
                           f"the length is {length}")
    return ids


def encode_sources(sources: list[str], src_len: int) -> np.ndarray:
    """Encoder input ids [n, src_len] int64: bytes, `EOS_ID`, then `PAD_ID`."""
    out = np.full((len(sources), src_len), PAD_ID, dtype=np.int64)
    for i, s in enumerate(sources):
        ids = _ids(s, src_len, "source") + [EOS_ID]
        out[i, :len(ids)] = ids
    return out


def translation_batch(pairs: list[tuple[str, str]], batch: int, src_len: int, tgt_len: int,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`batch` random pairs for `models.transformer.Transformer.forward(src_ids, tgt_ids)`:
    `src_ids` [batch, src_len] (source bytes, EOS, PAD), `tgt_ids` [batch, tgt_len]
    (BOS, target bytes, PAD: the decoder's input) and `labels` [batch, tgt_len] (target
    bytes, EOS, then IGNORE_INDEX: the decoder's next ids). The model has no source
    padding mask, so the encoder attends to PAD too; it learns to ignore it."""
    if batch < 1 or not pairs:
        raise TensorcError(f"translation_batch needs pairs and batch >= 1, got {batch}")
    chosen = [pairs[i] for i in rng.integers(0, len(pairs), batch)]
    src = encode_sources([s for s, _ in chosen], src_len)
    tgt = np.full((batch, tgt_len), PAD_ID, dtype=np.int64)
    labels = np.full((batch, tgt_len), IGNORE_INDEX, dtype=np.int64)
    for i, (_, t) in enumerate(chosen):
        ids = _ids(t, tgt_len, "target")
        tgt[i, :len(ids) + 1] = [BOS_ID, *ids]
        labels[i, :len(ids) + 1] = [*ids, EOS_ID]
    return {"src_ids": src, "tgt_ids": tgt, "labels": labels}


def decode_target(ids) -> str:
    """Byte ids up to the first EOS or PAD as text (BOS and ids above 255 skipped)."""
    out = bytearray()
    for i in np.asarray(ids).ravel().tolist():
        if i in (EOS_ID, PAD_ID):
            break
        if 0 <= i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0..100) of one reference per hypothesis, sacrebleu's defaults."""
    try:
        import sacrebleu
    except ImportError:
        raise TensorcError("BLEU needs sacrebleu: pip install sacrebleu "
                           "(or pip install 'tensorc[train]')") from None
    if len(hypotheses) != len(references):
        raise TensorcError(f"bleu: {len(hypotheses)} hypotheses for {len(references)} "
                           "references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
