"""Artifact formats and keys: round-trips, exact bytes where they are specified, key derivation."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stitchtime_core import artifacts
from stitchtime_core.config import PTIConfig, StitchingConfig


def _frames_table(n: int = 5) -> dict[str, np.ndarray | list]:
    rng = np.random.default_rng(0)
    return {
        "frame": np.arange(n, dtype=np.int64),
        "landmarks": rng.normal(size=(n, 68, 2)).astype(np.float32),
        "quads": rng.normal(size=(n, 4, 2)),
        "found": np.array([True, False, True, True, False][:n]),
        "score": rng.random(n).astype(np.float16),
        "label": [f"face{i}" for i in range(n)],
        "mask": rng.random((n, 3, 2, 2)) > 0.5,
        "bbox": rng.integers(0, 100, size=(n, 4), dtype=np.int32),
    }


# --- tables ---------------------------------------------------------------------------------------


def test_table_round_trip_preserves_values_shapes_and_dtypes():
    columns = _frames_table()
    out = artifacts.table_from_bytes(artifacts.table_to_bytes(columns))
    assert list(out) == list(columns)
    for name, values in columns.items():
        expected = np.asarray(values)
        assert isinstance(out[name], np.ndarray)
        assert out[name].shape == expected.shape, name
        assert out[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(out[name], expected)


def test_table_stores_per_frame_arrays_as_fixed_size_lists():
    data = artifacts.table_to_bytes(_frames_table())
    schema = pq.read_schema(pa.BufferReader(data))
    assert schema.field("landmarks").type == pa.list_(pa.float32(), 136)
    assert schema.field("quads").type == pa.list_(pa.float64(), 8)
    assert schema.field("frame").type == pa.int64()
    assert schema.field("label").type == pa.string()


def test_table_with_zero_rows_keeps_row_shape():
    data = artifacts.table_to_bytes({"quads": np.zeros((0, 4, 2), np.float32)})
    out = artifacts.table_from_bytes(data)
    assert out["quads"].shape == (0, 4, 2)
    assert out["quads"].dtype == np.float32


def test_table_rejects_columns_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        artifacts.table_to_bytes({"a": np.zeros(3), "b": np.zeros((4, 2))})


@pytest.mark.parametrize(
    "values",
    [
        np.float32(1.0),
        np.zeros((2, 2), dtype=np.complex64),
        np.array([["a", "b"]]),
        np.array([1.0, "x"], dtype=object),
    ],
    ids=["scalar", "complex", "2d-strings", "mixed"],
)
def test_table_rejects_unsupported_columns(values):
    with pytest.raises(ValueError, match="column 'c'"):
        artifacts.table_to_bytes({"c": values})


def test_table_reads_foreign_parquet():
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1, 2, 3]}), sink)
    out = artifacts.table_from_bytes(sink.getvalue().to_pybytes())
    np.testing.assert_array_equal(out["x"], [1, 2, 3])


# --- tensors --------------------------------------------------------------------------------------


def test_tensors_round_trip_with_metadata():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "pivots": torch.randn(3, 18, 512, generator=g),
        "half": torch.randn(4, 4, generator=g).half(),
        "bf16": torch.randn(2, generator=g).bfloat16(),
        "steps": torch.arange(5),
        "transposed": torch.randn(3, 4, generator=g).t(),  # not contiguous
    }
    metadata = {"arch": json.dumps({"resolution": 64}), "note": "pivots"}
    data = artifacts.tensors_to_bytes(tensors, metadata)
    out = artifacts.tensors_from_bytes(data)
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert out[name].device.type == "cpu"
        torch.testing.assert_close(out[name], t, rtol=0, atol=0)
    assert artifacts.tensors_metadata(data) == metadata


def test_tensors_metadata_is_empty_when_none_was_given():
    assert artifacts.tensors_metadata(artifacts.tensors_to_bytes({"x": torch.zeros(1)})) == {}


def test_tensors_metadata_must_be_strings():
    with pytest.raises(TypeError):
        artifacts.tensors_to_bytes({"x": torch.zeros(1)}, {"n": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("data", [b"", b"\x00" * 4, b"\xff" * 16, (4).to_bytes(8, "little") + b"nope"])
def test_tensors_metadata_rejects_garbage(data):
    with pytest.raises(ValueError, match="not a safetensors file"):
        artifacts.tensors_metadata(data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_load_onto_a_device():
    out = artifacts.tensors_from_bytes(artifacts.tensors_to_bytes({"x": torch.ones(2)}), device="cuda")
    assert out["x"].device.type == "cuda"


# --- JSON and hashes ------------------------------------------------------------------------------


def test_json_bytes_are_sorted_indented_utf8_with_trailing_newline():
    data = artifacts.json_to_bytes({"b": 1, "a": {"z": [1, 2], "y": "é"}})
    expected = '{\n  "a": {\n    "y": "é",\n    "z": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n'
    assert data == expected.encode()
    assert artifacts.json_from_bytes(data) == {"b": 1, "a": {"z": [1, 2], "y": "é"}}


def test_json_refuses_nan():
    with pytest.raises(ValueError):
        artifacts.json_to_bytes({"x": float("nan")})


def test_content_and_file_hash_are_sha256(tmp_path):
    data = np.random.default_rng(0).bytes(3 * 1024 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert artifacts.content_hash(data) == expected
    assert artifacts.file_hash(path, chunk=1024) == expected
    assert artifacts.file_hash(str(path)) == expected


# --- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "a/b", "landmarks/3f1c.parquet", "a/.b", "a..b/c", "ü/x y"])
def test_check_key_accepts_relative_keys(key):
    assert artifacts.check_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "/abs", "../x", "a/../../b", "a/..", "..", "a//b", "a/", "./a", "a\\b", "a\x00b", None]
)
def test_check_key_rejects_keys_that_could_escape(key):
    with pytest.raises(ValueError, match="artifact key"):
        artifacts.check_key(key)  # type: ignore[arg-type]


_BASE = dict(stage="pti", inputs=["aaa", "bbb"], config=PTIConfig(), code_version="1")


def test_derive_key_is_stable():
    key = artifacts.derive_key(**_BASE)
    assert key == artifacts.derive_key(**_BASE)
    assert key == artifacts.derive_key(**{**_BASE, "inputs": ("aaa", "bbb"), "config": PTIConfig()})
    stage, digest = key.split("/")
    assert stage == "pti" and len(digest) == 32 and int(digest, 16) >= 0
    artifacts.check_key(key)


@pytest.mark.parametrize(
    "change",
    [
        {"stage": "stitch"},
        {"inputs": ["aaa"]},
        {"inputs": ["bbb", "aaa"]},
        {"inputs": ["aa", "abbb"]},
        {"inputs": ["aaa", "bbc"]},
        {"config": PTIConfig(lr=1e-4)},
        {"config": dataclasses.replace(PTIConfig(), seed=1)},
        {"config": StitchingConfig()},
        {"config": None},
        {"code_version": "2"},
    ],
)
def test_derive_key_changes_with_each_ingredient(change):
    assert artifacts.derive_key(**{**_BASE, **change}) != artifacts.derive_key(**_BASE)


def test_derive_key_checks_its_arguments():
    with pytest.raises(TypeError, match="sequence of strings"):
        artifacts.derive_key(**{**_BASE, "inputs": "aaa"})
    with pytest.raises(ValueError, match="artifact key"):
        artifacts.derive_key(**{**_BASE, "stage": "../pti"})
