"""Writing output files without clobbering what is not ours.

Every file tensorc writes (artifacts, outputs, weights, ONNX, DOT) goes to a new path
or replaces a regular file. A symlink, FIFO, device node or directory at the path is
refused with one line: `tensorc compile -o /dev/null` as root must not replace the
device. Whole files are written to a fresh temporary file in the same folder
(O_EXCL: a planted link cannot redirect it) and renamed into place, so a failed
write leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

from .errors import TensorcError

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_output_path(path: str) -> None:
    """Refuse, in one line, to write over anything but a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise TensorcError(f"cannot write {path}: {e.strerror}") from None
    for test, kind in _KINDS:
        if test(mode):
            raise TensorcError(f"refusing to write {path}: it is {kind}, not a regular file")


@contextlib.contextmanager
def output_file(path: str, mode: str = "wb"):
    """A file object whose contents replace `path` when the block ends without error."""
    path = os.fspath(path)
    check_output_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tensorc-", suffix=".tmp")
    except OSError as e:
        raise TensorcError(f"cannot write {path}: {e.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)   # what open() would have given, not mkstemp's 0600
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
