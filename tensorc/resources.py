"""How much memory this machine has, and the one check that refuses work past it.

A hostile or mistaken size (`--batch 100000000000`, `--set d_model=1000000000`, an
npy header claiming a terabyte) must end in one line with the figure, not in a
MemoryError traceback or a machine swapping itself to death, so sizes are estimated
and checked here before anything that large is allocated.
"""

from __future__ import annotations

import os

from .errors import TensorcError


def physical_memory() -> int:
    """Bytes of physical memory (16 GiB where the platform cannot say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def check_fits(nbytes: int, what: str) -> None:
    """Refuse `what` if it needs more bytes than this machine has."""
    limit = physical_memory()
    if nbytes > limit:
        raise TensorcError(f"{what} needs {gib(nbytes)}, more than this machine's "
                           f"{gib(limit)} of memory")
