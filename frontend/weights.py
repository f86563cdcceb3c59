"""Weight and input files, `.npz` and `.safetensors`, read as untrusted data.

Nothing is ever unpickled, and a file cannot make the reader run past the memory it
declares. `.safetensors` goes through the `safetensors` library, whose reader checks
offsets, overlaps, shapes and trailing bytes (a hand-written reader accepted files it
rejects). `.npz` members are read one at a time from the zip: encrypted members,
unknown compression, npy headers that do not parse, object dtypes and arrays larger
than this machine's memory are refused before any data is inflated, and a member
never inflates past the size its header declares.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from tensorc.errors import TensorcError
from tensorc.files import check_output_path
from tensorc.resources import physical_memory


def save(path: str, tensors: dict[str, np.ndarray]) -> None:
    check_output_path(path)
    if path.endswith(".safetensors"):
        import safetensors.numpy
        try:
            safetensors.numpy.save_file({k: np.ascontiguousarray(v) if np.ndim(v) else
                                         np.asarray(v) for k, v in tensors.items()}, path)
        except Exception as e:  # SafetensorError, unsupported dtype
            raise TensorcError(f"cannot write {path}: {_first_line(e)}") from None
    elif path.endswith(".npz"):
        np.savez(path, **tensors)
    else:
        raise TensorcError(f"weights file {path!r} should end in .npz or .safetensors")


def load(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    return read_npz(path, "an .npz weights file")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise TensorcError(f"weights file not found: {path}")
    import safetensors.numpy
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:  # SafetensorError, or a dtype numpy has no type for
        raise TensorcError(f"{path} is not a readable .safetensors file "
                           f"({_first_line(e)})") from None


def read_npz(path: str, what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, read without pickle; `what` says what the file should
    be, for errors ("a tensorc artifact")."""
    if not os.path.isfile(path):
        raise TensorcError(f"file not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            budget = physical_memory()
            out = {}
            for info in zf.infolist():
                out[info.filename.removesuffix(".npy")] = arr = _read_member(zf, info, budget)
                budget -= arr.nbytes
            return out
    except _NpzError as e:
        raise TensorcError(f"{path} is not {what} ({e})") from None
    except MemoryError:
        raise TensorcError(f"{path}: not enough free memory to read it") from None
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError,
            ValueError) as e:
        raise TensorcError(f"{path} is not {what} (not a readable .npz zip of arrays: "
                           f"{_first_line(e)})") from None


class _NpzError(Exception):
    """A member that is not plain array data."""


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> np.ndarray:
    name = info.filename
    if not name.endswith(".npy"):
        raise _NpzError(f"member {name!r} is not an .npy array")
    if info.flag_bits & 0x1:
        raise _NpzError(f"member {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _NpzError(f"member {name!r} uses zip compression method {info.compress_type}")
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran_order, dtype = read_header(f)
        except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError):
            raise _NpzError(f"member {name!r} has no valid npy header") from None
        if any(d < 0 for d in shape):
            raise _NpzError(f"member {name!r} declares a negative shape {list(shape)}")
        if dtype.hasobject:
            raise _NpzError(f"member {name!r} holds pickled objects, which tensorc never "
                            "loads")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        if nbytes > budget:
            raise _NpzError(f"member {name!r} declares {list(shape)} {dtype} "
                            f"({nbytes / 2**30:.3g} GiB), more than the "
                            f"{max(budget, 0) / 2**30:.3g} GiB of memory left for it")
        arr = np.empty(count, dtype)
        view = memoryview(arr.view(np.uint8))
        filled = 0
        while filled < nbytes:
            n = f.readinto(view[filled:])
            if not n:
                raise _NpzError(f"member {name!r} is truncated: {filled} of {nbytes} bytes")
            filled += n
        if f.read(1):   # a deflate bomb stops here, one read past the declared size
            raise _NpzError(f"member {name!r} holds more data than its header declares")
    arr = arr.reshape(shape, order="F" if fortran_order else "C")
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
