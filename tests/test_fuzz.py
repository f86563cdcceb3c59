"""The fuzzer (tests/fuzz) on a fixed-seed sample, in a child process so that a crash
is caught too: 2,000 hostile inputs, each ending in success or one `tensorc: error:`
line, none differing from the numpy reference. `python -m tests.fuzz --cases N
--seed S` runs more."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fuzz_sample(tmp_path):
    progress = tmp_path / "progress"
    out = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--cases", "2000", "--seed", "0",
         "--progress", str(progress)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TENSORC_CACHE_DIR": str(tmp_path / "cache")})
    last = progress.read_text().strip() if progress.exists() else "before the first case"
    print(out.stdout[-3000:])   # the summary line (pytest -s or -rP shows it)
    assert out.returncode in (0, 1), f"the fuzzer died (status {out.returncode}) at {last}:\n" \
                                     f"{out.stderr[-3000:]}"
    assert out.returncode == 0, out.stdout[-5000:]
    assert "2000 cases" in out.stdout and " 0 failures" in out.stdout, out.stdout[-2000:]
