"""Starting the ranks of a mesh: processes under `mpiexec` (MPI), else threads.

`run_ranks(mesh, fn)` runs fn(groups) on every rank. Under mpiexec each process is one
rank and gets only its own result (`groups.rank` says which; rank 0 prints); without
mpiexec every rank is a thread of this process and the caller gets them all.
`relaunch(n, argv)` runs `python -m tensorc argv` under `mpiexec -n n`: how the CLI's
`--mesh` starts its ranks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TensorcError
from ..mesh import Mesh
from ..ops.collective import use_groups
from .comm import MeshGroups, run_threads

# The world size a launcher gives its processes: MPICH's hydra (and Slurm's PMI) set
# PMI_SIZE, Open MPI OMPI_COMM_WORLD_SIZE, PMIx launchers PMIX_SIZE.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def mpiexec_size() -> int | None:
    """The number of processes mpiexec started, read from its environment variables
    (so mpi4py, which initialises MPI on import, is imported only under mpiexec); None
    when not started by mpiexec."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def mpiexec_rank() -> int:
    """This process's rank under mpiexec (0 when not under it), from the environment."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def under_mpiexec() -> bool:
    return mpiexec_size() is not None


def run_ranks(mesh: Mesh, fn: Callable[[MeshGroups], Any]) -> dict[int, Any]:
    """fn(groups) on every rank of the mesh, with the rank's collectives installed;
    returns {rank: result}: every rank's (threads, in rank order) or, under mpiexec,
    this process's only. Under mpiexec a rank that fails prints its error and aborts
    the job: its peers would otherwise wait for it forever."""
    n = mpiexec_size()
    if n is None:
        return dict(enumerate(run_threads(mesh, fn)))
    if n != mesh.size:
        raise TensorcError(f"mpiexec started {n} processes, the mesh {mesh} has {mesh.size} "
                           f"ranks: run mpiexec -n {mesh.size}")
    from .mpi import MPICommunicator
    world = MPICommunicator()
    try:
        groups = MeshGroups(world, mesh)
        with use_groups(groups):
            result = fn(groups)
        world.finish()
    except BaseException as e:   # noqa: BLE001
        if world.size == 1:
            raise
        print(f"tensorc: error: rank {world.rank}: {e}", file=sys.stderr, flush=True)
        world.comm.Abort(2)
        raise SystemExit(2) from None   # Abort returns where another rank aborted first
    return {world.rank: result}


def mpiexec_path() -> str:
    """The mpiexec beside this Python (the mpich wheel puts it in the venv's bin), else
    the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("mpiexec")
    if found is None:
        raise TensorcError("no mpiexec found beside Python or on PATH: pip install mpi4py "
                           "mpich (or run the mesh in threads: --mesh-threads)")
    return found


def relaunch(n: int, argv: list[str]) -> int:
    """Run `python -m tensorc argv` as n MPI processes on this machine; their exit code
    (non-zero if any rank failed). Unless TENSORC_NUM_THREADS says otherwise, each rank's
    thread pool gets its share of the cores: n pools of every core would spin against
    each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    env = {"TENSORC_NUM_THREADS": str(max(1, cores // n)), **os.environ}
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, "-m", "tensorc", *argv]
    return subprocess.call(cmd, env=env)


def start(mesh: Mesh, argv: list[str], threads: bool = False) -> int | None:
    """What a command's `--mesh` does first. Outside mpiexec, unless threads are asked
    for (`threads`: the CLI's --mesh-threads, or TENSORC_MESH=threads) or the mesh has
    one rank: run this very command (`argv`, as typed after `tensorc`) as mesh.size MPI
    processes and return their exit code. Otherwise None: run the ranks here
    (`run_ranks`), and let rank 0 print."""
    threads = threads or os.environ.get("TENSORC_MESH", "") == "threads"
    if threads or mesh.size == 1 or under_mpiexec():
        return None
    return relaunch(mesh.size, argv)
