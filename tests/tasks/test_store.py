"""The artifact store: one suite on a FileStore and on an S3Store against a real S3-protocol server."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from stitchtime_core import artifacts
from stitchtime_core.errors import StitchtimeError, StoreError
from tasks.store import (
    DEFAULT_STORE_DIR,
    ArtifactNotFound,
    ArtifactStore,
    FileStore,
    S3Store,
    default_store_uri,
    open_store,
)

BAD_KEYS = ["", "../x", "/abs", "a/../../b", "a/..", "a//b", "a\\b", "a\x00b"]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """An empty store of each backend; S3 stores get a prefix of their own in the shared bucket."""
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    s3 = request.getfixturevalue("s3_env")
    return open_store(f"s3://{s3.bucket}/{uuid.uuid4().hex}")


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- the same behaviour on both backends ----------------------------------------------------------


def test_bytes_round_trip(store):
    data = bytes(range(256)) * 100
    uri = store.put_bytes("runs/abc/blob.bin", data)
    assert uri == store.url_for("runs/abc/blob.bin")
    assert uri.startswith(store.uri + "/")
    assert store.get_bytes("runs/abc/blob.bin") == data
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_json_round_trip(store):
    doc = {"fps": 29.97, "frames": 120, "name": "clip é", "edits": [["age", -4.0]], "audio": None}
    store.put_json("probe.json", doc)
    assert store.get_json("probe.json") == doc
    assert store.get_bytes("probe.json") == artifacts.json_to_bytes(doc)


def test_table_round_trip_preserves_shapes_and_dtypes(store):
    rng = np.random.default_rng(0)
    columns = {
        "frame": np.arange(6),
        "landmarks": rng.normal(size=(6, 68, 2)).astype(np.float32),
        "quads": rng.normal(size=(6, 4, 2)),
        "found": rng.random(6) > 0.5,
        "face": [f"f{i}" for i in range(6)],
    }
    store.put_table("landmarks/abc.parquet", columns)
    out = store.get_table("landmarks/abc.parquet")
    for name, values in columns.items():
        expected = np.asarray(values)
        assert out[name].shape == expected.shape and out[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(out[name], expected)


def test_tensors_round_trip(store):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "pivots": torch.randn(4, 18, 32, generator=g),
        "w_avg": torch.randn(32, generator=g).half(),
    }
    store.put_tensors("pivots/abc.safetensors", tensors, metadata={"frames": "4"})
    out = store.get_tensors("pivots/abc.safetensors")
    for name, t in tensors.items():
        torch.testing.assert_close(out[name], t, rtol=0, atol=0)
    assert artifacts.tensors_metadata(store.get_bytes("pivots/abc.safetensors")) == {"frames": "4"}


def test_file_round_trip_is_streamed_and_whole(store, tmp_path):
    # Over boto3's 8 MiB multipart threshold, so S3 uploads and downloads in parts.
    src = tmp_path / "in.mp4"
    src.write_bytes(np.random.default_rng(0).bytes(9 * 1024 * 1024))
    uri = store.put_file("videos/in.mp4", src)
    assert uri == store.url_for("videos/in.mp4")
    dst = tmp_path / "out" / "deeper" / "copy.mp4"
    assert store.get_file("videos/in.mp4", dst) == dst
    assert artifacts.file_hash(dst) == artifacts.file_hash(src)
    assert _files_under(tmp_path / "out") == ["deeper/copy.mp4"]


def test_put_file_of_a_missing_local_file(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        store.put_file("x", tmp_path / "nope.mp4")
    assert store.list() == []


def test_exists_list_delete(store):
    for key in ["b/1", "a/2", "a/1", "ab", "a/sub/3"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/1", "a/2", "a/sub/3", "ab", "b/1"]
    assert store.list("a/") == ["a/1", "a/2", "a/sub/3"]
    assert store.list("a") == ["a/1", "a/2", "a/sub/3", "ab"]
    assert store.list("a/sub") == ["a/sub/3"]
    assert store.list("zz/") == []
    assert store.exists("a/1") and not store.exists("a") and not store.exists("a/9")
    store.delete("a/1")
    assert not store.exists("a/1")
    store.delete("a/1")  # deleting a missing object does nothing, as on S3
    assert store.list("a/") == ["a/2", "a/sub/3"]


def test_empty_store_lists_nothing(store):
    assert store.list() == []
    assert not store.exists("anything")


def test_missing_key_raises_artifact_not_found(store, tmp_path):
    for read in (store.get_bytes, store.get_json, store.get_table, store.get_tensors):
        with pytest.raises(ArtifactNotFound) as info:
            read("missing/key")
        assert isinstance(info.value, KeyError) and isinstance(info.value, StitchtimeError)
        assert info.value.key == "missing/key"
        assert "missing/key" in str(info.value)
    with pytest.raises(ArtifactNotFound):
        store.get_file("missing/key", tmp_path / "dl" / "x")
    assert _files_under(tmp_path / "dl") == []


def test_a_folder_is_not_an_artifact(store):
    store.put_bytes("dir/file", b"x")
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("dir")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected(store, tmp_path, key):
    src = tmp_path / "src"
    src.write_bytes(b"x")
    calls = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.url_for(key),
        lambda: store.put_file(key, src),
        lambda: store.get_file(key, tmp_path / "dst"),
        lambda: store.put_json(key, {}),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="artifact key") as info:
            call()
        assert repr(key) in str(info.value)
    assert store.list() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a/../b/", "a//"])
def test_bad_list_prefixes_are_rejected(store, prefix):
    with pytest.raises(ValueError):
        store.list(prefix)


def test_overwrite_replaces_the_whole_object_and_leaves_no_temp_files(store):
    store.put_bytes("k", b"L" * 1_000_000)
    store.put_bytes("k", b"short")
    assert store.get_bytes("k") == b"short"
    assert store.list() == ["k"]
    if isinstance(store, FileStore):
        assert _files_under(store.root) == ["k"]


def test_readers_see_whole_objects_while_a_writer_replaces_them(store):
    versions = [b"a" * 300_000, b"b" * 100_000]
    store.put_bytes("k", versions[0])
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(store.get_bytes("k"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            store.put_bytes("k", versions[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and all(data in versions for data in seen)
    assert store.list() == ["k"]


def test_stores_under_different_roots_are_apart(store):
    other = open_store(store.uri + "-other")
    store.put_bytes("k", b"mine")
    assert not other.exists("k")
    assert other.list() == []


def test_uri_reopens_the_same_store(store):
    store.put_bytes("a/b", b"x")
    again = open_store(store.uri)
    assert type(again) is type(store) and again.uri == store.uri
    assert again.get_bytes("a/b") == b"x"


# --- FileStore ------------------------------------------------------------------------------------


def test_failed_rename_keeps_the_old_content_and_no_temp_file(tmp_path, monkeypatch):
    store = FileStore(tmp_path / "store")
    store.put_bytes("a/k", b"old")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(StoreError, match="No space left on device") as info:
        store.put_bytes("a/k", b"new")
    assert store.url_for("a/k") in str(info.value)
    with pytest.raises(StoreError):
        store.put_file("a/k", Path(__file__))
    monkeypatch.undo()
    assert store.get_bytes("a/k") == b"old"
    assert _files_under(tmp_path / "store") == ["a/k"]


def test_failed_write_keeps_the_old_content_and_no_temp_file(tmp_path, monkeypatch):
    store = FileStore(tmp_path / "store")
    store.put_bytes("k", b"old")

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreError, match="Input/output error"):
        store.put_bytes("k", b"new")
    monkeypatch.undo()
    assert store.get_bytes("k") == b"old"
    assert _files_under(tmp_path / "store") == ["k"]


def test_listing_skips_writes_in_progress(tmp_path):
    store = FileStore(tmp_path)
    store.put_bytes("a/k", b"x")
    (tmp_path / "a" / f".k.tmp-{uuid.uuid4().hex}").write_bytes(b"partial")
    assert store.list() == ["a/k"]


def test_file_store_creates_nothing_until_written(tmp_path):
    store = open_store(str(tmp_path / "later"))
    assert store.list() == [] and not store.exists("x")
    assert not (tmp_path / "later").exists()


def test_open_store_file_uris_and_plain_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_store("file:///srv/data"), FileStore)
    assert open_store("file:///srv/data").root == Path("/srv/data")
    assert open_store("file:///srv/my%20data").root == Path("/srv/my data")
    assert open_store("rel/data").root == tmp_path / "rel" / "data"
    assert open_store(str(tmp_path / "abs")).root == tmp_path / "abs"


def test_default_store_is_a_folder_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert DEFAULT_STORE_DIR == "stitchtime-data"
    assert default_store_uri() == (tmp_path / "stitchtime-data").as_uri()
    store = open_store(default_store_uri())
    assert isinstance(store, FileStore) and store.root == tmp_path / "stitchtime-data"


@pytest.mark.parametrize("uri", ["", "gs://bucket/x", "file://host/x", "s3://", "s3:///prefix"])
def test_open_store_rejects_unusable_uris(uri):
    with pytest.raises(ValueError):
        open_store(uri)


@pytest.mark.parametrize("uri", ["file://", "file://localhost", "file:"])
def test_a_file_uri_without_a_path_names_no_folder(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what such a URI used to fill with stage folders
    with pytest.raises(ValueError) as error:
        open_store(uri)
    assert str(error.value) == f"store URI {uri!r} names no folder (expected file:///absolute/path)"


@pytest.mark.parametrize("as_uri", [False, True])
def test_a_store_folder_that_is_a_file_is_refused_when_opened(as_uri, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    uri = (tmp_path / "afile").as_uri() if as_uri else str(tmp_path / "afile")
    with pytest.raises(ValueError) as error:
        open_store(uri)
    assert str(error.value) == f"{tmp_path / 'afile'}: a file, not a folder"
    assert (tmp_path / "afile").read_text() == "not a folder"


def _write_error(store: FileStore, key: str = "probe/k/probe.json") -> StoreError:
    with pytest.raises(StoreError) as error:
        store.put_json(key, {"frames": 1})
    with pytest.raises(StoreError) as streamed:
        store.put_file(key, Path(__file__))
    assert str(streamed.value) == str(error.value) and streamed.value.transient == error.value.transient
    return error.value


def test_a_store_folder_that_became_a_file_fails_every_write_for_good(tmp_path):
    store = open_store(str(tmp_path / "store"))  # opened while nothing was there
    (tmp_path / "store").write_text("not a folder")
    error = _write_error(store)
    assert str(error) == f"{tmp_path / 'store'}: the store folder is a file, not a folder"
    assert not error.transient  # a stage task does not retry it (tasks.stages.base._retry_unless_bad_input)
    assert (tmp_path / "store").read_text() == "not a folder"


def test_a_store_folder_that_became_a_file_is_named_by_reads_not_taken_for_an_empty_store(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_json("probe/k/probe.json", {"frames": 1})
    shutil.rmtree(tmp_path / "store")
    (tmp_path / "store").write_text("not a folder")
    for read in (lambda: store.get_json("probe/k/probe.json"), lambda: store.exists("probe/k/probe.json"),
                 lambda: store.list("probe/"), lambda: store.get_file("probe/k/probe.json", tmp_path / "copy")):
        with pytest.raises(StoreError) as error:
            read()
        assert str(error.value) == f"{tmp_path / 'store'}: the store folder is a file, not a folder"
        assert not error.value.transient
    assert not (tmp_path / "copy").exists()


def test_a_store_folder_under_a_file_fails_every_write_for_good(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    store = open_store(str(tmp_path / "afile" / "store"))
    error = _write_error(store)
    assert str(error) == f"{tmp_path / 'afile' / 'store'}: cannot create the store folder: {tmp_path / 'afile'} is " \
                         "a file, not a folder"
    assert not error.transient


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_store_folder_that_cannot_be_made_fails_every_write_for_good():
    store = open_store("/proc/stitchtime-store")
    error = _write_error(store)
    assert str(error).startswith("/proc/stitchtime-store: cannot create the store folder (")
    assert not error.transient


def test_an_object_whose_folder_is_a_file_fails_for_good_naming_the_object(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("probe", b"an object where a folder of objects should be")
    error = _write_error(store, "probe/k/probe.json")
    assert str(error) == f"{store.url_for('probe/k/probe.json')}: cannot write: Not a directory"
    assert not error.transient
    assert store.get_bytes("probe") == b"an object where a folder of objects should be"


@pytest.mark.parametrize("code, transient", [
    (errno.ENOSPC, False), (errno.EROFS, False), (errno.EACCES, False), (errno.EIO, True),
])
def test_only_write_errors_that_may_pass_are_transient(code, transient, tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("k", b"old")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreError) as error:
        store.put_bytes("k", b"new")
    monkeypatch.undo()
    assert str(error.value) == f"{store.url_for('k')}: cannot write: {os.strerror(code)}"
    assert error.value.transient is transient
    assert store.get_bytes("k") == b"old"


# --- S3Store --------------------------------------------------------------------------------------


def test_open_store_s3_uri_names_bucket_and_prefix(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    store = open_store("s3://bucket/some/prefix/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("bucket", "some/prefix/")
    assert store.uri == "s3://bucket/some/prefix"
    assert store.url_for("a/b") == "s3://bucket/some/prefix/a/b"
    assert open_store("s3://bucket").url_for("a") == "s3://bucket/a"
    assert store._client.meta.region_name == "eu-west-1"
    with pytest.raises(ValueError):
        open_store("s3://bucket/../up")


def test_s3_store_uses_the_endpoint_from_the_environment(s3_env):
    store = S3Store(s3_env.bucket)
    assert store._client.meta.endpoint_url == s3_env.endpoint_url


def test_s3_missing_bucket_is_a_store_error_naming_it(s3_env, tmp_path):
    store = open_store("s3://no-such-bucket-here/p")
    src = tmp_path / "src"
    src.write_bytes(b"x")
    calls = [
        lambda: store.put_bytes("k", b"x"),
        lambda: store.get_bytes("k"),
        lambda: store.exists("k"),
        lambda: store.list(),
        lambda: store.delete("k"),
        lambda: store.put_file("k", src),
        lambda: store.get_file("k", tmp_path / "dst"),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="no-such-bucket-here") as info:
            call()
        assert not isinstance(info.value, ArtifactNotFound)
        assert "does not exist" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("wrong", ["secret", "key id"])
def test_s3_wrong_credentials_are_a_store_error_without_them(s3_env, monkeypatch, tmp_path, wrong):
    fake_secret = "FAKE/secret+DoNotLeak0123456789abcdefghij"
    fake_key_id = "AKIAFAKEKEYIDDONOTLEAK"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fake_secret)
    if wrong == "key id":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", fake_key_id)
    store = S3Store(s3_env.bucket)
    src = tmp_path / "src"
    src.write_bytes(b"x")
    calls = [
        lambda: store.put_bytes("k", b"x"),
        lambda: store.get_bytes("k"),
        lambda: store.exists("k"),
        lambda: store.list(),
        lambda: store.put_file("k", src),
        lambda: store.get_file("k", tmp_path / "dst"),
    ]
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        message = str(info.value)
        assert s3_env.bucket in message and "\n" not in message
        for secret in (fake_secret, fake_key_id, s3_env.access_key_id, s3_env.secret_access_key):
            assert secret not in message
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_s3_unreachable_endpoint_is_a_store_error(s3_env, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    store = S3Store(s3_env.bucket, max_attempts=1)
    with pytest.raises(StoreError, match=f"cannot connect to http://127.0.0.1:{port}"):
        store.get_bytes("k")


def test_refusals_are_permanent_and_outages_transient(s3_env, monkeypatch):
    import pickle

    with pytest.raises(StoreError) as missing:
        open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x").put_bytes("k", b"1")
    assert not missing.value.transient and "does not exist" in str(missing.value)
    restored = pickle.loads(pickle.dumps(missing.value))
    assert isinstance(restored, StoreError) and not restored.transient and str(restored) == str(missing.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StoreError) as down:
        open_store(f"s3://{s3_env.bucket}/x").put_bytes("k", b"1")
    assert down.value.transient


class CuttingProxy:
    """A proxy on loopback in front of the S3 server that resets the first ``cuts`` connections once
    ``after`` bytes of the response have gone through: a body cut off on the way, as when the server
    or the network dies in the middle of a download."""

    def __init__(self, upstream: str, cuts: int, after: int = 1 << 16):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.cuts, self.after = (host, int(port)), cuts, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.upstream)
            cut = self.cuts > 0
            self.cuts -= cut
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.after if cut else None),
                             daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, dest: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while (data := source.recv(1 << 14)) and (limit is None or sent < limit):
                dest.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for conn in (source, dest):  # a reset (SO_LINGER 0), which also wakes the other direction
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def test_s3_reads_cut_off_midway_are_made_again(s3_env, monkeypatch, tmp_path):
    data = np.random.default_rng(0).bytes(3 << 20)
    prefix = uuid.uuid4().hex
    S3Store(s3_env.bucket, prefix).put_bytes("big", data)
    proxy = CuttingProxy(s3_env.endpoint_url, cuts=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    store = S3Store(s3_env.bucket, prefix)
    assert store.get_bytes("big") == data and proxy.cuts == 0
    proxy.cuts = 2
    assert store.get_file("big", tmp_path / "big").read_bytes() == data and proxy.cuts == 0
    # Cut off every time: a transient StoreError naming the object, after the attempts are spent.
    proxy.cuts = 10**6
    with pytest.raises(StoreError, match=f"s3://{s3_env.bucket}/{prefix}/big: ResponseStreamingError") as info:
        S3Store(s3_env.bucket, prefix, max_attempts=2).get_bytes("big")
    assert info.value.transient
