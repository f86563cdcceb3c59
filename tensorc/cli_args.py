"""What the CLI's commands share to parse their arguments and print tables: a parser
whose errors are one line, the argument types, `--set` and `--dim` values."""

from __future__ import annotations

import argparse

from .errors import TensorcError
from .text import parse_scalar


class _UsageError(TensorcError):
    """A command line argparse rejects."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _seed(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63-1, got {text!r}")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise TensorcError(f"--set {item!r} should be key=value")
        out[key.strip()] = parse_scalar(text.strip())
    return out


def parse_dims(items: list[str]) -> dict[str, int]:
    """--dim NAME=SIZE flags as {name: size}; one-line errors for bad ones."""
    dims = {}
    for item in items:
        name, eq, size = item.partition("=")
        if not eq or not name or not size.isdigit() or int(size) < 1:
            raise TensorcError(f"--dim {item!r} should be NAME=SIZE with a positive SIZE")
        dims[name] = int(size)
    return dims


def _table(rows: list[list[str]]) -> str:
    """Left-aligned columns; a short row's last cell (a note) may run past them."""
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() + "\n"
                   for r in rows)


def add_mesh_arguments(group, help: str) -> None:
    """--mesh and --mesh-threads, for the commands that run ranks (run, train)."""
    group.add_argument("--mesh", metavar="tp=2,dp=2,pp=2", help=help + "; the ranks are "
                       "MPI processes (mpiexec, started for you unless already under it)")
    group.add_argument("--mesh-threads", action="store_true",
                       help="with --mesh: the ranks are threads of this process instead "
                            "(same as TENSORC_MESH=threads)")
    group.add_argument("--micro-batches", type=_positive_int, default=1, metavar="M",
                       help="with pp > 1: micro-batches the batch is split into (default 1)")
    group.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b",
                       help="with pp > 1: pipeline schedule (default 1f1b)")


def start_mesh(args):
    """(the mesh, None) to run the ranks here, or (the mesh, an exit code) when this
    command ran as MPI processes under mpiexec (`parallel.launch.start`)."""
    from .mesh import Mesh
    from .parallel import launch
    mesh = Mesh.parse(args.mesh) if args.mesh else Mesh()
    return mesh, launch.start(mesh, args.argv, args.mesh_threads)
