"""Weight files: `.npz` and `.safetensors`, read and written without pickle.

safetensors is simple enough to do by hand (an 8-byte header length, a JSON header,
raw little-endian data); the tests check it against the reference library.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile

import numpy as np

from tensorc.errors import TensorcError

_ST_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "I32": "<i4",
              "I64": "<i8", "U8": "u1", "BOOL": "?"}
_ST_CODES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def save(path: str, tensors: dict[str, np.ndarray]) -> None:
    if path.endswith(".safetensors"):
        _save_safetensors(path, tensors)
    elif path.endswith(".npz"):
        np.savez(path, **tensors)
    else:
        raise TensorcError(f"weights file {path!r} should end in .npz or .safetensors")


def load(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise TensorcError(f"weights file not found: {path}")
        return _load_safetensors(path)
    return read_npz(path, "an .npz weights file")


def read_npz(path: str, what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, read without pickle; `what` says what the file should
    be, for errors ("a tensorc artifact")."""
    if not os.path.isfile(path):
        raise TensorcError(f"file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        data = None  # numpy's own message suggests unpickling: not advice to pass on
    if not isinstance(data, np.lib.npyio.NpzFile):  # e.g. a bare .npy
        raise TensorcError(f"{path} is not {what} (not an .npz zip of arrays)")
    with data:
        try:
            return {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            raise TensorcError(f"{path} is not {what} (an entry is unreadable or holds "
                               "pickled objects, which tensorc never loads)") from None


def _save_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.asarray(arr)  # not ascontiguousarray: it turns a scalar into shape [1]
        if arr.dtype not in _ST_CODES:
            raise TensorcError(f"safetensors cannot store {name!r} of dtype {arr.dtype}")
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _ST_CODES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        if 8 + n > len(raw):
            raise ValueError(f"the header length {n} runs past the end of the file")
        header = json.loads(raw[8:8 + n])
        base, out = 8 + n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if base + end > len(raw):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            arr = np.frombuffer(raw, _ST_DTYPES[info["dtype"]], offset=base + begin,
                                count=(end - begin) // np.dtype(_ST_DTYPES[info["dtype"]]).itemsize)
            out[name] = arr.reshape(info["shape"]).astype(arr.dtype.newbyteorder("="))
        return out
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TensorcError(f"{path} is not a readable .safetensors file ({e})") from None
