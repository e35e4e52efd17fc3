"""The model registry: fetching from a real HTTP server on 127.0.0.1, resuming, and checking files."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stitchtime_core.models import registry
from stitchtime_core.models.registry import (
    REGISTRY, ChecksumError, DownloadByHandError, ModelFetchError, ModelFile, describe, fetch, verify,
)

PAYLOAD = random.Random(2022).randbytes(3 * 2**20 + 12345)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with single-range support, recording every request.

    Knobs a test sets: ``ignore_range`` (answer 200 with the whole file), ``cut_after`` (the next
    response sends this many body bytes, then closes the connection), ``delay`` (seconds before answering).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {"/ffhq.pkl": PAYLOAD}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.cut_after: int | None = None
        self.delay = 0.0

    def url(self, path: str = "/ffhq.pkl") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out and left is part of some tests


class RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FileServer

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        byte_range = self.headers.get("Range")
        srv.requests.append((self.path, byte_range))
        if srv.delay:
            time.sleep(srv.delay)
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if byte_range and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if srv.cut_after is not None:
            cut, srv.cut_after = srv.cut_after, None
            self.wfile.write(body[:cut])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def entry_for(url: str, *, sha256: str | None = PAYLOAD_SHA256, size: int | None = len(PAYLOAD),
              name: str = "ffhq.pkl", required: bool = True, sha256_prefix: str | None = None) -> ModelFile:
    return ModelFile(name=name, role="generator", description="a test generator", url=url, size=size,
                     sha256=sha256, profile="test", required=required, source_note="test server",
                     sha256_prefix=sha256_prefix)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fetch ---------------------------------------------------------------------------------------------------------


def test_fetch_downloads_checks_and_renames(server: FileServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    path = fetch(entry_for(server.url()), tmp_path / "models", progress=lambda done, total: seen.append((done, total)))

    assert path == tmp_path / "models" / "ffhq.pkl"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "models" / "ffhq.pkl.part").exists()
    assert server.requests == [("/ffhq.pkl", None)]
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_fetch_resumes_a_download_cut_off_by_the_server(server: FileServer, tmp_path: Path) -> None:
    server.cut_after = 1_000_000
    entry = entry_for(server.url())

    with pytest.raises(ModelFetchError, match="fetch again to resume") as cut:
        fetch(entry, tmp_path)
    assert server.url() in str(cut.value)
    assert (tmp_path / "ffhq.pkl.part").stat().st_size == 1_000_000
    assert not (tmp_path / "ffhq.pkl").exists()

    path = fetch(entry, tmp_path)
    assert server.requests == [("/ffhq.pkl", None), ("/ffhq.pkl", "bytes=1000000-")]
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "ffhq.pkl.part").exists()


def test_fetch_resumes_a_part_left_on_disk(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "ffhq.pkl.part").write_bytes(PAYLOAD[:HALF])
    seen: list[tuple[int, int | None]] = []

    path = fetch(entry_for(server.url()), tmp_path, progress=lambda done, total: seen.append((done, total)))

    assert server.requests == [("/ffhq.pkl", f"bytes={HALF}-")]
    assert path.read_bytes() == PAYLOAD
    assert seen[0][0] > HALF and seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_fetch_restarts_from_zero_when_the_server_ignores_range(server: FileServer, tmp_path: Path) -> None:
    server.ignore_range = True
    (tmp_path / "ffhq.pkl.part").write_bytes(PAYLOAD[:HALF])

    path = fetch(entry_for(server.url()), tmp_path)

    assert server.requests == [("/ffhq.pkl", f"bytes={HALF}-")]  # asked for a range, got the whole file
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "ffhq.pkl.part").exists()


def test_fetch_restarts_when_the_part_is_already_too_long(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "ffhq.pkl.part").write_bytes(PAYLOAD + b"junk")

    path = fetch(entry_for(server.url()), tmp_path)

    assert server.requests == [("/ffhq.pkl", f"bytes={len(PAYLOAD) + 4}-"), ("/ffhq.pkl", None)]
    assert path.read_bytes() == PAYLOAD


def test_fetch_deletes_a_download_with_the_wrong_sha256(server: FileServer, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as error:
        fetch(entry_for(server.url(), sha256=wrong), tmp_path)

    message = str(error.value)
    assert "ffhq.pkl" in message and wrong in message and PAYLOAD_SHA256 in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_fetch_checks_a_published_sha256_prefix(server: FileServer, tmp_path: Path) -> None:
    path = fetch(entry_for(server.url(), sha256=None, size=None, sha256_prefix=PAYLOAD_SHA256[:8]), tmp_path)
    assert path.read_bytes() == PAYLOAD

    path.unlink()
    with pytest.raises(ChecksumError, match="expected 7be5be79"):
        fetch(entry_for(server.url(), sha256=None, size=None, sha256_prefix="7be5be79"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_keeps_a_good_file_without_asking_the_server(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "ffhq.pkl").write_bytes(PAYLOAD)

    path = fetch(entry_for(server.url()), tmp_path)

    assert path == tmp_path / "ffhq.pkl"
    assert server.requests == []


def test_fetch_replaces_a_file_with_the_wrong_sha256(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "ffhq.pkl").write_bytes(b"x" * len(PAYLOAD))

    path = fetch(entry_for(server.url()), tmp_path)

    assert server.requests == [("/ffhq.pkl", None)]
    assert path.read_bytes() == PAYLOAD


def test_fetch_reports_a_refused_connection_in_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/ffhq.pkl"
    with pytest.raises(ModelFetchError) as error:
        fetch(entry_for(url), tmp_path, timeout=5)

    assert str(error.value) == f"cannot download {url}: connection refused"
    assert error.value.url == url
    assert not (tmp_path / "ffhq.pkl").exists()


def test_fetch_reports_http_errors_in_one_line(server: FileServer, tmp_path: Path) -> None:
    url = server.url("/nothing-here.pkl")
    with pytest.raises(ModelFetchError) as error:
        fetch(entry_for(url), tmp_path)

    assert str(error.value) == f"cannot download {url}: HTTP 404 Not Found"


def test_fetch_reports_a_timeout_in_one_line(server: FileServer, tmp_path: Path) -> None:
    server.delay = 1.0
    with pytest.raises(ModelFetchError) as error:
        fetch(entry_for(server.url()), tmp_path, timeout=0.2)

    assert str(error.value) == f"cannot download {server.url()}: timed out after 0.2 s"


def test_fetch_sends_share_pages_to_a_person(tmp_path: Path) -> None:
    url = "https://drive.google.com/file/d/1cUv_reLE6k3604or78EranS7XzuVMWeO/view?usp=sharing"
    entry = entry_for(url, sha256=None, size=None, name="e4e_ffhq_encode.pt")

    with pytest.raises(DownloadByHandError) as error:
        fetch(entry, tmp_path)

    assert str(error.value) == (f"e4e_ffhq_encode.pt (a test generator) is on a share page: download it by hand "
                                f"from {url} into {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_fetch_creates_subfolders(server: FileServer, tmp_path: Path) -> None:
    path = fetch(entry_for(server.url(), name="directions/age.npy"), tmp_path)
    assert path == tmp_path / "directions" / "age.npy"
    assert path.read_bytes() == PAYLOAD


# verify and describe -------------------------------------------------------------------------------------------


def test_verify_reports_each_state(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/model.bin"
    entries = [
        entry_for(url, name="good.bin"),
        entry_for(url, name="absent.bin"),
        entry_for(url, name="short.bin"),
        entry_for(url, name="changed.bin"),
        entry_for(url, name="unhashed.bin", sha256=None, size=None),
        entry_for(url, name="optional.bin", required=False),
    ]
    (tmp_path / "good.bin").write_bytes(PAYLOAD)
    (tmp_path / "short.bin").write_bytes(PAYLOAD[:HALF])
    (tmp_path / "changed.bin").write_bytes(bytes(len(PAYLOAD)))
    (tmp_path / "unhashed.bin").write_bytes(b"whatever")

    statuses = {s.entry.name: s for s in verify(tmp_path, profile="test", entries=entries)}

    assert {name: s.status for name, s in statuses.items()} == {
        "good.bin": "ok", "absent.bin": "missing", "short.bin": "wrong size", "changed.bin": "wrong sha256",
        "unhashed.bin": "unverified", "optional.bin": "missing",
    }
    assert statuses["absent.bin"].message == (
        f"missing: absent.bin (a test generator) — run `stitchtime models fetch` or download {url} into {tmp_path}")
    assert statuses["optional.bin"].message.startswith("missing (optional): optional.bin")
    assert f"is {HALF} bytes, expected {len(PAYLOAD)}" in statuses["short.bin"].message
    changed = statuses["changed.bin"]
    assert changed.sha256 == hashlib.sha256(bytes(len(PAYLOAD))).hexdigest()
    assert changed.sha256 in changed.message and PAYLOAD_SHA256 in changed.message
    assert "publishes no checksum" in statuses["unhashed.bin"].message
    assert statuses["good.bin"].sha256 == PAYLOAD_SHA256 and statuses["good.bin"].size == len(PAYLOAD)
    assert [name for name, s in statuses.items() if s.blocking] == ["absent.bin", "short.bin", "changed.bin"]
    assert all("\n" not in s.message for s in statuses.values())


def test_verify_without_hashes_checks_presence_and_size(tmp_path: Path) -> None:
    entries = [entry_for("http://127.0.0.1:9/a", name="sized.bin"),
               entry_for("http://127.0.0.1:9/b", name="unsized.bin", size=None)]
    (tmp_path / "sized.bin").write_bytes(bytes(len(PAYLOAD)))  # wrong content, right size
    (tmp_path / "unsized.bin").write_bytes(bytes(10))

    statuses = verify(tmp_path, profile="test", check_hashes=False, entries=entries)

    assert [(s.status, s.sha256) for s in statuses] == [("ok", None), ("unverified", None)]


def test_verify_checks_a_published_sha256_prefix(tmp_path: Path) -> None:
    entries = [entry_for("http://127.0.0.1:9/a", name="a.pth", sha256=None, size=None,
                         sha256_prefix=PAYLOAD_SHA256[:8]),
               entry_for("http://127.0.0.1:9/b", name="b.pth", sha256=None, size=None, sha256_prefix="7be5be79")]
    (tmp_path / "a.pth").write_bytes(PAYLOAD)
    (tmp_path / "b.pth").write_bytes(PAYLOAD)

    assert [s.status for s in verify(tmp_path, profile="test", entries=entries)] == ["ok", "wrong sha256"]


def test_verify_of_the_real_registry_names_how_to_get_each_file(tmp_path: Path) -> None:
    statuses = verify(tmp_path)

    assert {s.status for s in statuses} == {"missing"}
    by_name = {s.entry.name: s.message for s in statuses}
    assert "run `stitchtime models fetch` or download https://nvlabs-fi-cdn.nvidia.com/" in by_name["ffhq.pkl"]
    assert "download it by hand from https://drive.google.com/" in by_name["e4e_ffhq_encode.pt"]


def test_describe_lists_files_without_hashing(tmp_path: Path) -> None:
    (tmp_path / "ffhq.pkl").write_bytes(b"12345")

    rows = {row["name"]: row for row in describe(tmp_path)}

    assert list(rows) == [e.name for e in REGISTRY if e.profile == "ffhq"]
    assert rows["ffhq.pkl"]["present"] is True and rows["ffhq.pkl"]["size"] == 5
    assert rows["ffhq.pkl"]["required"] is True and rows["ffhq.pkl"]["by_hand"] is False
    assert rows["79999_iter.pth"]["present"] is False and rows["79999_iter.pth"]["required"] is False
    assert rows["79999_iter.pth"]["by_hand"] is True
    assert rows["e4e_ffhq_encode.pt"]["url"].startswith("https://drive.google.com/")


def test_unknown_profile_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="profile 'tiny' has no model files"):
        verify(tmp_path, profile="tiny")


# the registry itself -------------------------------------------------------------------------------------------


def test_registry_entries_are_consistent() -> None:
    names = [e.name for e in REGISTRY]
    assert len(names) == len(set(names))
    for e in REGISTRY:
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
        assert e.url.startswith("https://"), e.name
        assert e.source_note, e.name
        if e.by_hand:
            assert e.size is None and e.sha256 is None, e.name
    required = {e.role: e.name for e in REGISTRY if e.profile == "ffhq" and e.required}
    assert required == {"generator": "ffhq.pkl", "encoder": "e4e_ffhq_encode.pt",
                        "lpips_backbone": "alexnet-owt-7be5be79.pth"}


def test_alexnet_entry_matches_torchvision() -> None:
    from torchvision.models import AlexNet_Weights

    entry = next(e for e in REGISTRY if e.role == "lpips_backbone")
    assert entry.url == AlexNet_Weights.IMAGENET1K_V1.url
    assert entry.name == entry.url.rsplit("/", 1)[1]
    # torch.hub checks the hash prefix that the file name carries.
    assert entry.sha256_prefix == re.search(r"-([a-f0-9]+)\.", entry.name).group(1)


def test_chunked_hash_matches_hashlib(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert registry.sha256_file(tmp_path / "f") == PAYLOAD_SHA256
