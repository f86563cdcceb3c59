"""`tensorc train` / `distill` end to end: checkpoints other commands accept, resume that
continues bit for bit, metrics, the loss plot, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensorc.cli import main
from tensorc.optim import load_checkpoint
from tensorc.training import Run, TrainConfig, fit

pytest.importorskip("tqdm", reason="the train extra (tqdm) is in the test extra")


def _tiny_run(tmp_path, **kw):
    return Run("gpt", "tiny", {"d_model": 16, "d_ff": 32}, "clm", batch=2, seq=16,
               data_bytes=60_000, backend="llvm", out=str(tmp_path / "ck"), **kw)


def test_resume_continues_bit_for_bit(tmp_path):
    cfg = TrainConfig(steps=8, lr=3e-3, warmup=2)
    straight = []
    fit(_tiny_run(tmp_path / "a"), cfg, on_step=lambda r: straight.append(r["loss"]))

    class Stop(Exception):
        pass

    def stop_at_4(r):
        if r["step"] == 4:
            raise Stop
    run = _tiny_run(tmp_path / "b", eval_every=4)
    with pytest.raises(Stop):
        fit(run, cfg, on_step=stop_at_4)      # the checkpoint at step 4 is written first
    assert load_checkpoint(run.out).step == 4
    resumed = []
    fit(run, cfg, resume=run.out, on_step=lambda r: resumed.append(r["loss"]))
    assert resumed == straight[4:]            # exactly: same data, masks, updates
    a = load_checkpoint(tmp_path / "a" / "ck").params
    b = load_checkpoint(run.out).params
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_train_cli_writes_what_run_generate_and_export_read(tmp_path, capsys):
    ck, metrics, png = tmp_path / "ck", tmp_path / "m.jsonl", tmp_path / "loss.png"
    assert main(["train", "gpt", "--set", "d_model=16", "--set", "d_ff=32", "--steps", "6",
                 "--batch", "2", "--seq", "16", "--data-bytes", "60000", "--quiet",
                 "-o", str(ck), "--metrics", str(metrics), "--plot", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["bits_per_byte"] > 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"step", "loss", "lr", "step_ms", "tokens_per_s"} <= set(rows[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["run", str(ck), "--backend", "llvm"]) == 0
    assert main(["generate", str(ck), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert main(["export", str(ck), "-o", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    # distil a narrower student from it
    assert main(["distill", "gpt", "--set", "d_model=8", "--set", "d_ff=16", "--steps", "3",
                 "--batch", "2", "--seq", "16", "--data-bytes", "60000", "--quiet",
                 "--teacher", str(ck), "--temperature", "2", "--alpha", "0.7"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["train", "bert", "--task", "clm"], "task clm feeds input_ids, but Bert takes "
                                         "input_ids, attention_mask"),
    (["train", "gpt", "--resume", "/nonexistent"], "checkpoint /nonexistent: no such"),
    (["train", "x.onnx"], "train takes a built-in model"),
    (["train", "gpt", "--init", "a", "--resume", "b"], "give one of them"),
    (["train", "vit", "--init", "tests/data/trained/gpt-tiny"], "holds a gpt model, not vit"),
])
def test_train_errors_are_one_line(argv, message, capsys):
    assert main(argv + ["--steps", "1", "--data-bytes", "60000", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("model,task,sets,metric", [
    ("bert", "mlm", {"d_model": 16, "d_ff": 32}, "val_loss"),
    ("vit", "classify", {"d_model": 16, "d_ff": 32}, "val_accuracy"),
    ("transformer", "translate", {"d_model": 16, "d_ff": 32}, "bleu"),
    ("llama", "clm", {"d_model": 16, "d_ff": 32}, "bits_per_byte"),
])
def test_every_task_trains_and_evaluates(model, task, sets, metric, tmp_path):
    lines = []
    run = Run(model, "tiny", sets, task, batch=4, seq=16, data_bytes=60_000,
              out=str(tmp_path / "ck"), eval_every=2)
    records = []
    last = fit(run, TrainConfig(steps=4, lr=1e-3, warmup=1), on_step=records.append,
               on_data=lines.extend)
    assert [r["step"] for r in records if metric in r] == [2, 4]
    assert np.isfinite(last[metric]) and records[-1]["loss"] < records[0]["loss"] + 0.5
    assert bool(lines) == (task in ("mlm", "clm"))     # the text cleaning report


def test_init_fine_tunes_from_a_checkpoints_weights(tmp_path):
    """--init: the checkpoint's model and weights, a new optimizer and schedule (here
    quantization-aware): the first loss is the trained model's, far below a fresh one's."""
    from pathlib import Path
    ck = str(Path(__file__).parent / "data" / "trained" / "gpt-tiny")
    records = []
    run = Run("gpt", "tiny", {}, "clm", batch=4, seq=64, data_bytes=200_000,
              out=str(tmp_path / "ft"), init=ck)
    fit(run, TrainConfig(steps=3, lr=1e-4, warmup=1, qat=True), on_step=records.append)
    fresh = []
    fit(Run("gpt", "tiny", {"vocab_size": 257}, "clm", batch=4, seq=64, data_bytes=200_000),
        TrainConfig(steps=1, lr=1e-4, warmup=1), on_step=fresh.append)
    assert records[0]["loss"] < 3.0 < 5.0 < fresh[0]["loss"]   # trained ~2.6; fresh ~5.6
    assert load_checkpoint(str(tmp_path / "ft")).extra["config"]["qat"] is True


def test_shipped_tiny_checkpoints_still_reach_their_quality():
    """tests/data/trained: what tests/data/trained/README.md says they reach."""
    from pathlib import Path

    from tensorc.training import TaskData, load_checkpoint_model
    root = Path(__file__).parent / "data" / "trained"
    gpt = load_checkpoint_model(str(root / "gpt-tiny"))
    bpb = TaskData("clm", 16, 64, 4_000_000).evaluate(gpt, "llvm")["bits_per_byte"]
    assert bpb < 3.9     # untrained: 8
    pytest.importorskip("sklearn", reason="the digits come with scikit-learn")
    vit = load_checkpoint_model(str(root / "vit-tiny"))
    assert TaskData("classify", 64, 0, None).evaluate(vit, "llvm")["val_accuracy"] > 0.93


def test_train_on_a_folder_of_your_own_text(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):   # distinct texts, long enough to pass the cleaning
        (docs / f"f{i}.md").write_text(" ".join(f"word{i}_{j}" for j in range(300)))
    (docs / "copy.md").write_text((docs / "f0.md").read_text())   # an exact duplicate
    assert main(["train", "gpt", "--data", str(docs), "--steps", "2", "--batch", "2",
                 "--seq", "16", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "exact duplicate      1 texts" in err
    assert main(["train", "vit", "--data", str(docs), "--steps", "1", "--quiet"]) == 2
    assert "--data takes text, for clm and mlm" in capsys.readouterr().err
    assert main(["train", "gpt", "--data", str(tmp_path / "none"), "--quiet"]) == 2
    assert "file not found" in capsys.readouterr().err
