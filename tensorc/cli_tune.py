"""`tensorc tune`: time the kernel schedules a model uses on this host and keep the best in
the per-host cache every later llvm compile reads (`backends/llvm/tuning.py`;
docs/tuning.md). `cli.build_parser` adds it with its `command` maker."""

from __future__ import annotations

import json
import math
import sys

from .cli_args import _Parser, _positive_int, _seed, _table, parse_dims, parse_overrides
from .errors import TensorcError


def add_command(command, common) -> None:
    """The subcommand, made with `cli.build_parser`'s `command` and parent parser."""
    model = _Parser(add_help=False)
    model.add_argument("model", metavar="MODEL", nargs="?",
                       help="the model to tune (as for run; not with --show/--clear)")
    g = model.add_argument_group("model")
    g.add_argument("--preset", help="preset of a built-in model (default: tiny)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of a built-in model (repeatable)")
    g.add_argument("--batch", type=_positive_int, help="batch size of the example inputs")
    g.add_argument("--seq", type=_positive_int, help="sequence length of the example inputs")
    g.add_argument("--seed", type=_seed, help="seed of the weights and inputs (default: 0)")
    g.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a symbolic input dim of a graph, by name (repeatable)")
    sp = command("tune", cmd_tune, "time kernel schedules for a model's shapes on this host "
                 "and keep the best for every later llvm compile", parents=(common, model))
    sp.add_argument("--budget", type=float, default=60.0, metavar="SECONDS",
                    help="time for the search (default: 60)")
    sp.add_argument("--passes", default="O2", metavar="P", help="pipeline (default: O2)")
    sp.add_argument("--backend", default="llvm", help="only llvm has tunable kernels")
    sp.add_argument("--repeat", type=_positive_int, default=5,
                    help="end-to-end runs each, untuned and tuned, at least (default: 5; "
                         "they run for a second at least)")
    sp.add_argument("--format", choices=("text", "json"), default="text")
    what = sp.add_mutually_exclusive_group()
    what.add_argument("--show", action="store_true",
                      help="print what this host's cache holds instead")
    what.add_argument("--clear", action="store_true", help="forget this host's cache")


def cmd_tune(args) -> int:
    if args.backend != "llvm":
        raise TensorcError(f"tune times the llvm backend's kernels; got --backend "
                           f"{args.backend}")
    from tensorc.backends.llvm import tuning
    if args.show or args.clear:
        if args.model:
            raise TensorcError(f"--{'show' if args.show else 'clear'} takes no MODEL")
        return _show(args, tuning) if args.show else _clear(args, tuning)
    if not args.model:
        raise TensorcError("tune needs a MODEL (or --show, --clear)")
    if not (args.budget > 0 and math.isfinite(args.budget)):
        raise TensorcError(f"--budget must be a positive number of seconds, got {args.budget}")
    from .api import tune
    from .loading import load_model
    loaded = load_model(args.model, preset=args.preset, overrides=parse_overrides(args.set),
                        batch=args.batch, seq=args.seq, seed=args.seed,
                        dims=parse_dims(args.dim))
    progress = None
    if args.format == "text":
        def progress(r):
            print(f"  {r.kernel} {_key(r.key)}: {r.tried} of {r.candidates} candidates timed",
                  file=sys.stderr)
    report = tune(loaded.graph, loaded.inputs, budget=args.budget, passes=args.passes,
                  repeat=args.repeat, report=progress)
    report["model"] = loaded.name
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return 0
    print(f"tuned {loaded.name} on {report['host']['cpu']}: search {report['search_s']:.1f} s "
          f"(budget {args.budget:g} s), {report['total_s']:.1f} s with compiling; "
          f"{report['changed']} of {len(report['kernels'])} schedules changed; "
          f"cache: {report['cache']}")
    if report["kernels"]:
        rows = [["kernel", "key", "default ms", "tuned ms", "gain", "schedule"]]
        for k in report["kernels"]:
            chosen = "default" if k["chosen"] == k["default"] else _schedule(k["chosen"])
            rows.append([k["kernel"], _key(k["key"]), _ms(k["default_ms"]),
                         _ms(k["tuned_ms"]), f"{k['gain']:.2f}x", chosen + (
                             f"  ({k['note']})" if k["note"] else "")])
            rows.extend(["", "", "", "", "", f"dropped {d}"] for d in k["dropped"])
        sys.stdout.write(_table(rows))
    else:
        known = ", ".join(sorted(tuning.SPACES)) or "none registered"
        print(f"no tunable kernel runs in this model (tunable: {known})")
    lat = report["latency_ms"]
    print(f"end to end: untuned {lat['untuned']:.3f} ms, tuned {lat['tuned']:.3f} ms "
          f"({lat['untuned'] / lat['tuned']:.2f}x; median of {lat['runs']} runs each"
          + ("; the same schedules: the difference is noise)" if not report["changed"]
             else ")"))
    return 0


def _show(args, tuning) -> int:
    entries = tuning.entries()
    if args.format == "json":
        print(json.dumps({"host": tuning.host(), "cache": str(tuning.cache_path()),
                          "entries": entries}, indent=2))
        return 0
    host = tuning.host()
    print(f"{tuning.cache_path()}: {len(entries)} schedules for {host['cpu']} "
          f"({host['triple']}, llvmlite {host['llvmlite']})")
    if entries:
        rows = [["kernel", "key", "default ms", "tuned ms", "schedule"]]
        rows += [[e["kernel"], _key(e["key"]), _ms(e["default_seconds"] * 1e3),
                  _ms(e["seconds"] * 1e3),
                  "default" if e["schedule"] is None else _schedule(e["schedule"])]
                 for e in entries]
        sys.stdout.write(_table(rows))
    return 0


def _clear(args, tuning) -> int:
    n = len(tuning.entries())
    path = tuning.clear()
    print(f"forgot {n} schedules" + (f" ({path} removed)" if path else " (no cache file)"))
    return 0


def _key(key) -> str:
    return "(" + ", ".join(str(x) for x in key) + ")"


def _schedule(s: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in s.items())


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"   # None: never timed
