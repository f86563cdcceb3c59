"""python -m tests.fuzz [--cases N] [--seed S] [--timeout SECONDS]: run the fuzzer and
print one line per failure and a summary; exit 1 if any case failed."""

import argparse
import sys

from .harness import run


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds per case (a cold JIT compile on a busy machine is slow)")
    ap.add_argument("--progress", metavar="FILE",
                    help="write each case's number and kind here before it runs (what was "
                         "running when a crash killed the process)")
    ap.add_argument("--keep", metavar="DIR", help="copy each failing case's file here")
    args = ap.parse_args()
    report = run(args.cases, args.seed, args.timeout, log=sys.stdout, progress=args.progress,
                 keep=args.keep)
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
