"""Artifact formats and keys: bytes in, bytes out, no storage I/O.

Per-frame tables (landmarks, quads, metrics) are Parquet, one row per frame; tensors (pivots,
generator weights) are safetensors; small documents (probe metadata, configs, reports) are JSON.
The store in ``tasks/store.py`` moves these bytes; this module only says what they look like.

Keys are relative, '/'-separated paths such as ``landmarks/3f1c...``. A stage's key is derived from
everything that determines its output (:func:`derive_key`), so the key doubles as a cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch

from stitchtime_core.config import config_hash

_TABLE_METADATA_KEY = b"stitchtime.columns"
_NUMERIC_KINDS = "biuf"


# --- keys -----------------------------------------------------------------------------------------


def check_key(key: str) -> str:
    """Check that a key is a relative '/'-separated path that cannot leave the store's root.

    Args:
        key: e.g. ``"landmarks/3f1c9a.parquet"``.

    Returns:
        The key, unchanged.

    Raises:
        ValueError: the key is empty, absolute, has an empty, ``.`` or ``..`` segment, or
            contains a backslash or NUL.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key {key!r} is empty or not a string")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"artifact key {key!r} contains a backslash or NUL")
    if key.startswith("/"):
        raise ValueError(f"artifact key {key!r} is absolute; keys are relative to the store")
    # Empty and '.' segments are refused too, so that one object has exactly one key on every backend.
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"artifact key {key!r} has an empty, '.' or '..' segment")
    return key


def content_hash(data: bytes) -> str:
    """The sha256 hex digest of some bytes."""
    return hashlib.sha256(data).hexdigest()


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks so that videos need not fit in memory.

    Args:
        path: the file.
        chunk: bytes read at a time.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def derive_key(stage: str, *, inputs: Sequence[str], config: object | None, code_version: str) -> str:
    """The key of a stage's output, derived from everything that determines it.

    The same stage, inputs (in order), config values and code version always give the same key;
    a change to any of them gives a different key. Flows use the key as the Prefect cache key, so a
    re-run skips finished stages and re-runs exactly those whose ingredients changed.

    Args:
        stage: the stage name, itself a valid key (e.g. ``"landmarks"``); it becomes the key's folder.
        inputs: content hashes or keys of the stage's inputs, in a fixed order.
        config: the stage's frozen config dataclass, or None for a stage without settings.
        code_version: the stage's code version; bump it when the stage's output changes.

    Returns:
        ``f"{stage}/{digest[:32]}"``, where digest is a sha256 hex digest.

    Raises:
        ValueError: ``stage`` is not a valid key.
        TypeError: ``inputs`` is a single string rather than a sequence of strings.
    """
    check_key(stage)
    # A bare string is a Sequence[str] of its characters: almost certainly a caller's mistake.
    if isinstance(inputs, str) or not all(isinstance(i, str) for i in inputs):
        raise TypeError("derive_key: inputs must be a sequence of strings, not a string")
    # JSON encoding keeps the ingredients apart: ("ab", "c") and ("a", "bc") hash differently.
    ingredients = [
        stage,
        list(inputs),
        None if config is None else config_hash(config),
        code_version,
    ]
    digest = content_hash(json.dumps(ingredients, separators=(",", ":")).encode())
    return f"{stage}/{digest[:32]}"


# --- JSON -----------------------------------------------------------------------------------------


def json_to_bytes(obj: Any) -> bytes:
    """JSON with sorted keys, indent 2, UTF-8 and a trailing newline.

    Raises:
        ValueError: ``obj`` holds NaN or infinity, which JSON cannot represent.
        TypeError: ``obj`` holds something that is not JSON data.
    """
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def json_from_bytes(data: bytes) -> Any:
    """Parse bytes written by :func:`json_to_bytes` (or any UTF-8 JSON)."""
    return json.loads(data.decode("utf-8"))


# --- tables (Parquet) -----------------------------------------------------------------------------


def _column_to_arrow(name: str, values: np.ndarray | list) -> tuple[pa.Array, dict[str, Any]]:
    """One column as an Arrow array, and the numpy dtype and per-row shape that restore it."""
    arr = np.asarray(values)
    if arr.ndim == 0:
        raise ValueError(f"table column {name!r} is a scalar; columns hold one value per row")
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    info = {"dtype": arr.dtype.str, "shape": list(arr.shape[1:])}
    if arr.ndim == 1:
        if arr.dtype.kind in _NUMERIC_KINDS:
            return pa.array(arr), info
        if arr.dtype.kind == "U" or (arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr)):
            return pa.array(arr.tolist(), type=pa.string()), info
        raise ValueError(f"table column {name!r} has unsupported dtype {arr.dtype}")
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(
            f"table column {name!r} of shape {arr.shape} has dtype {arr.dtype}; "
            "multi-dimensional columns must be bool, int or float"
        )
    row_size = int(np.prod(arr.shape[1:]))
    flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, row_size), info


def table_to_bytes(columns: Mapping[str, np.ndarray | list]) -> bytes:
    """A table with one row per frame, as Parquet.

    A column is a 1-D array or list (bool, int, float or str), or an array of shape
    ``[N, *row_shape]`` (bool, int or float) such as landmarks ``[N, 68, 2]`` or quads ``[N, 4, 2]``,
    stored as a fixed-size list column. Each column's dtype and row shape are recorded in the
    Parquet schema metadata so :func:`table_from_bytes` gives back identical arrays.

    Args:
        columns: column name -> values, every column with the same number of rows N.

    Returns:
        The Parquet file's bytes.

    Raises:
        ValueError: columns differ in length, a column is a scalar, or a dtype is unsupported.

    Example:
        >>> data = table_to_bytes({"frame": np.arange(3), "quads": np.zeros((3, 4, 2), np.float32)})
        >>> table_from_bytes(data)["quads"].shape
        (3, 4, 2)
    """
    arrays, infos = {}, {}
    for name, values in columns.items():
        arrays[name], infos[name] = _column_to_arrow(name, values)
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"table columns differ in length: {lengths}")
    table = pa.table(arrays).replace_schema_metadata({_TABLE_METADATA_KEY: json.dumps(infos).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Read a Parquet table written by :func:`table_to_bytes`.

    Columns come back as numpy arrays with the dtype and shape they were written with; columns of
    a foreign Parquet file (without stitchtime's metadata) come back as Arrow converts them.

    Args:
        data: the Parquet file's bytes.

    Returns:
        Column name -> array of shape ``[N, *row_shape]``.
    """
    table = pq.read_table(pa.BufferReader(data))
    metadata = table.schema.metadata or {}
    infos = json.loads(metadata[_TABLE_METADATA_KEY]) if _TABLE_METADATA_KEY in metadata else {}
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        info = infos.get(name)
        if info is None:
            out[name] = column.to_numpy(zero_copy_only=False)
            continue
        if info["shape"]:
            values = column.flatten().to_numpy(zero_copy_only=False)
            values = values.reshape(len(column), *info["shape"])
        else:
            values = column.to_numpy(zero_copy_only=False)
        out[name] = values.astype(np.dtype(info["dtype"]), copy=False)
    return out


# --- tensors (safetensors) ------------------------------------------------------------------------


def tensors_to_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Tensors as a safetensors file.

    Args:
        tensors: name -> tensor, on any device; tensors must not share memory.
        metadata: optional string -> string header entries (e.g. the architecture's JSON config).

    Returns:
        The safetensors file's bytes.

    Raises:
        TypeError: a metadata key or value is not a string.
    """
    if metadata is not None:
        metadata = dict(metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
    plain = {name: t.detach().contiguous() for name, t in tensors.items()}
    return safetensors.torch.save(plain, metadata=metadata)


def tensors_from_bytes(data: bytes, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read tensors written by :func:`tensors_to_bytes`.

    Args:
        data: the safetensors file's bytes.
        device: where to put the tensors.

    Returns:
        Name -> tensor on ``device``.
    """
    tensors = safetensors.torch.load(data)
    if torch.device(device) != torch.device("cpu"):
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors


def tensors_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header alone.

    Raises:
        ValueError: ``data`` is not a safetensors file.
    """
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError("not a safetensors file: header length exceeds the data")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a safetensors file: unreadable header ({exc})") from None
    return dict(header.get("__metadata__") or {})
