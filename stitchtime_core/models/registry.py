"""The official model files a profile uses: where each is published, and fetching and checking them.

Behind ``stitchtime models list | fetch | verify``. Each :class:`ModelFile` says where its project
publishes the file and, only where that project publishes one, its size and sha256: no checksum here
is computed by us or guessed. Files published only on Google Drive (or another share page) cannot be
fetched by a script reliably; they are reported as "download by hand from <url>".

Downloads go to ``<name>.part`` beside the target, resume with an HTTP Range request, are checked
against the published size and hash, and only then renamed to the final name (atomic on one disk).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stitchtime_core.errors import StitchtimeError

CHUNK_BYTES = 1 << 20
"""Read and hash files in chunks of this many bytes (1 MiB)."""

ProgressCallback = Callable[[int, "int | None"], None]
"""Called as ``progress(bytes_done, bytes_total)`` while a file downloads; the total may be unknown."""

# Hosts whose links are share pages (an HTML page, a virus-scan interstitial for large files, quotas),
# not the file itself.
_SHARE_PAGE_HOSTS = ("drive.google.com", "docs.google.com", "1drv.ms", "onedrive.live.com", "pan.baidu.com")


@dataclass(frozen=True)
class ModelFile:
    """One published model file.

    Attributes:
        name: path of the file inside the models folder ('/'-separated), e.g. ``ffhq.pkl``.
        role: what the file is for: generator, encoder, face_parsing, identity, lpips_backbone, direction.
        description: a short phrase naming the file for people, e.g. "the StyleGAN2-ada FFHQ generator".
        url: where its project publishes it: a direct download or a share page to open by hand.
        size: the size in bytes, only where the project publishes it.
        sha256: the hex sha256, only where the project publishes it.
        profile: the model profile that uses the file.
        required: whether the profile runs without it (optional files have a fallback or only serve metrics).
        source_note: where the URL (and hash, if any) was found, and anything else a person fetching it should know.
        sha256_prefix: a published prefix of the sha256 (torchvision names its files ``<name>-<prefix>.pth``
            and checks only that prefix), used where no full hash is published.
    """

    name: str
    role: str
    description: str
    url: str
    size: int | None
    sha256: str | None
    profile: str = "ffhq"
    required: bool = True
    source_note: str = ""
    sha256_prefix: str | None = None

    @property
    def by_hand(self) -> bool:
        """True when ``url`` is a share page (Google Drive and the like) rather than the file itself."""
        host = urllib.parse.urlsplit(self.url).hostname or ""
        return host in _SHARE_PAGE_HOSTS

    @property
    def published_hash(self) -> str | None:
        """The published sha256, or else its published prefix, or None."""
        return self.sha256 or self.sha256_prefix


_STIT_DIRECTIONS = "https://raw.githubusercontent.com/rotemtzaban/STIT/main/editings/w_directions/"

REGISTRY: tuple[ModelFile, ...] = (
    # PTI's README, "Auxiliary Models" table (danielroich/PTI), links "FFHQ StyleGAN" here; PTI and STIT
    # load it as pretrained_models/ffhq.pkl (configs/paths_config.py). The same URL is the example
    # network of NVlabs/stylegan2-ada-pytorch's projector.py. NVIDIA publishes no checksum for it.
    ModelFile(
        name="ffhq.pkl", role="generator", description="the StyleGAN2-ada FFHQ 1024 px generator",
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl",
        size=None, sha256=None,
        source_note="danielroich/PTI README (FFHQ StyleGAN); NVlabs/stylegan2-ada-pytorch; no checksum published",
    ),
    # omertov/encoder4editing README, "Pretrained Models": "FFHQ Inversion" is a Google Drive share.
    # PTI's README links its own Drive copy (id 1ALC5CLA89Ouw40TwvxcwebhzWXM5YSCm); STIT ships the file in
    # pretrained_models.zip on Drive (id 1cDvUHPTZQAEWvfiK9C0nDuI9C3Qdgbbp, README and download_models.sh).
    ModelFile(
        name="e4e_ffhq_encode.pt", role="encoder", description="the e4e FFHQ encoder",
        url="https://drive.google.com/file/d/1cUv_reLE6k3604or78EranS7XzuVMWeO/view?usp=sharing",
        size=None, sha256=None,
        source_note="omertov/encoder4editing README (FFHQ Inversion), Google Drive only; no checksum published; "
                    "also inside STIT's pretrained_models.zip",
    ),
    # zllrunning/face-parsing.PyTorch README: "our pre-trained model" (a Google Drive share); STIT loads it as
    # pretrained_models/79999_iter.pth (configs/paths_config.py) and ships it in pretrained_models.zip.
    ModelFile(
        name="79999_iter.pth", role="face_parsing",
        description="the BiSeNet face-parsing network; without it masks come from landmarks",
        url="https://drive.google.com/open?id=154JgKpzCPW82qINcVieuPH3fZ2e0P812",
        size=None, sha256=None, required=False,
        source_note="zllrunning/face-parsing.PyTorch README, Google Drive only; no checksum published; "
                    "also inside STIT's pretrained_models.zip",
    ),
    # omertov/encoder4editing README, auxiliary models: "IR-SE50 Model ... taken from TreB1eN" (Google Drive).
    # TreB1eN/InsightFace_Pytorch's README publishes the original on OneDrive and BaiduNetdisk only.
    ModelFile(
        name="model_ir_se50.pth", role="identity",
        description="the ArcFace IR-SE50 identity network, used only for identity metrics",
        url="https://drive.google.com/file/d/1KW7bjndL3QG3sxBbZxreGHigcCCpsDgn/view?usp=sharing",
        size=None, sha256=None, required=False,
        source_note="omertov/encoder4editing README (IR-SE50 Model), Google Drive only; original from "
                    "TreB1eN/InsightFace_Pytorch (OneDrive https://1drv.ms/u/s!AhMqVPD44cDOhkPsOU2S_HFpY9dC); "
                    "no checksum published",
    ),
    # torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url (torchvision 0.29). torch.hub checks downloads
    # against the hash prefix in the file name; torchvision gives the size only rounded (233.087 MB).
    ModelFile(
        name="alexnet-owt-7be5be79.pth", role="lpips_backbone",
        description="the torchvision AlexNet weights LPIPS measures with",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        size=None, sha256=None, sha256_prefix="7be5be79",
        source_note="torchvision AlexNet_Weights.IMAGENET1K_V1; sha256 prefix from the file name, as torch.hub "
                    "checks it; about 233 MB",
    ),
    # STIT's InterFaceGAN directions, in the repository itself (editings/w_directions/*.npy, read by
    # editings/latent_editor.py); the paper's age, gender and smile edits, and yaw for pose. GitHub gives
    # no sha256 for them.
    *(
        ModelFile(
            name=f"directions/{edit}.npy", role="direction", description=f"STIT's {what} edit direction",
            url=f"{_STIT_DIRECTIONS}{edit}.npy", size=None, sha256=None, required=False,
            source_note="rotemtzaban/STIT editings/w_directions; no checksum published",
        )
        for edit, what in (("age", "age"), ("gender", "gender"), ("smile", "smile"), ("yaw", "pose (yaw)"))
    ),
)
"""Every file of every profile that has official files (only ``ffhq`` does)."""


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


@dataclass(frozen=True)
class FileStatus:
    """The state of one model file in a models folder.

    Attributes:
        entry: the registry entry.
        path: where the file belongs.
        status: "ok", "missing", "wrong size", "wrong sha256" or "unverified" (present; no published hash
            to check it against, or hashes not checked).
        message: one line for people: what is wrong and how to fix it.
        size: the size on disk, or None when missing.
        sha256: the sha256 computed, or None when not computed.
    """

    entry: ModelFile
    path: Path
    status: str
    message: str
    size: int | None = None
    sha256: str | None = None

    @property
    def usable(self) -> bool:
        """True when the file is present and nothing says it is the wrong one."""
        return self.status in ("ok", "unverified")

    @property
    def blocking(self) -> bool:
        """True when a required file is missing or wrong, so the profile cannot run."""
        return self.entry.required and not self.usable


def default_models_dir() -> Path:
    """The models folder when none is given: ``$STITCHTIME_MODELS``, else ``./models``."""
    return Path(os.environ.get("STITCHTIME_MODELS", "models"))


def entries_for(profile: str, entries: Sequence[ModelFile] = REGISTRY) -> list[ModelFile]:
    """The entries of one profile, in registry order.

    Raises:
        ValueError: no entry belongs to ``profile``.
    """
    chosen = [e for e in entries if e.profile == profile]
    if not chosen:
        profiles = sorted({e.profile for e in entries})
        raise ValueError(f"profile {profile!r} has no model files to manage (profiles with files: "
                         f"{', '.join(profiles) or 'none'})")
    return chosen


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def how_to_get(entry: ModelFile, models_dir: str | os.PathLike) -> str:
    """The remedy for a missing or wrong file, as a sentence fragment."""
    folder = Path(models_dir)
    if entry.by_hand:
        return f"download it by hand from {entry.url} into {(folder / entry.name).parent}"
    return f"run `stitchtime models fetch` or download {entry.url} into {(folder / entry.name).parent}"


def check_file(entry: ModelFile, models_dir: str | os.PathLike, *, check_hashes: bool = True) -> FileStatus:
    """The status of one file (see :class:`FileStatus`). Hashing reads the whole file."""
    path = Path(models_dir) / entry.name
    label = f"{entry.name} ({entry.description})"
    optional = "" if entry.required else " (optional)"
    if not path.is_file():
        return FileStatus(entry, path, "missing", f"missing{optional}: {label} — {how_to_get(entry, models_dir)}")
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return FileStatus(entry, path, "wrong size",
                          f"wrong size{optional}: {label} is {size} bytes, expected {entry.size} — "
                          f"{how_to_get(entry, models_dir)}", size=size)
    expected = entry.published_hash
    if expected is None:
        return FileStatus(entry, path, "unverified",
                          f"unverified: {label} is present ({size} bytes); its project publishes no checksum",
                          size=size)
    if not check_hashes:
        if entry.size is not None:
            return FileStatus(entry, path, "ok", f"ok: {label} (size matches; sha256 not checked)", size=size)
        return FileStatus(entry, path, "unverified", f"unverified: {label} is present ({size} bytes); "
                                                     f"sha256 not checked", size=size)
    actual = sha256_file(path)
    if not actual.startswith(expected):
        what = "sha256" if entry.sha256 else "sha256 prefix"
        return FileStatus(entry, path, "wrong sha256",
                          f"wrong sha256{optional}: {label} has sha256 {actual}, expected {what} {expected} — "
                          f"{how_to_get(entry, models_dir)}", size=size, sha256=actual)
    if entry.sha256:
        return FileStatus(entry, path, "ok", f"ok: {label}", size=size, sha256=actual)
    return FileStatus(entry, path, "ok", f"ok: {label} (sha256 matches the published prefix {expected})",
                      size=size, sha256=actual)


def verify(models_dir: str | os.PathLike, *, profile: str = "ffhq", check_hashes: bool = True,
           entries: Sequence[ModelFile] = REGISTRY) -> list[FileStatus]:
    """Check every file of a profile in a models folder.

    Args:
        models_dir: the models folder.
        profile: the profile whose files to check.
        check_hashes: hash files that have a published sha256 (slow for large files); without it only
            presence and published sizes are checked.
        entries: the registry to check against (tests pass their own).

    Returns:
        one :class:`FileStatus` per file, in registry order.
    """
    return [check_file(e, models_dir, check_hashes=check_hashes) for e in entries_for(profile, entries)]


def describe(models_dir: str | os.PathLike, *, profile: str = "ffhq",
             entries: Sequence[ModelFile] = REGISTRY) -> list[dict[str, Any]]:
    """What ``stitchtime models list`` shows: one JSON-ready row per file, without hashing anything.

    Keys: name, role, description, required, present, size (on disk, else None), expected_size,
    sha256 (published), url, by_hand (the URL is a share page), path, source_note.
    """
    rows = []
    for entry in entries_for(profile, entries):
        path = Path(models_dir) / entry.name
        present = path.is_file()
        rows.append(dict(
            name=entry.name, role=entry.role, description=entry.description, required=entry.required,
            present=present, size=path.stat().st_size if present else None, expected_size=entry.size,
            sha256=entry.sha256, url=entry.url, by_hand=entry.by_hand, path=str(path),
            source_note=entry.source_note,
        ))
    return rows


def fetch(entry: ModelFile, models_dir: str | os.PathLike, *, progress: ProgressCallback | None = None,
          timeout: float = 60) -> Path:
    """Download one file into the models folder, resuming a partial download, and check it.

    An existing file that matches what is published (or that nothing published can check) is kept and
    not downloaded again. Otherwise the file downloads to ``<name>.part``, resuming an existing part with
    a Range request (from zero when the server ignores Range), is checked against the published size and
    sha256, and is then renamed to its final name.

    Args:
        entry: the file to fetch.
        models_dir: the models folder (created when missing).
        progress: called as ``progress(bytes_done, bytes_total_or_None)`` as data arrives.
        timeout: seconds to wait to connect and for each read.

    Returns:
        the path of the file.

    Raises:
        DownloadByHandError: the URL is a share page; the message says where to get the file by hand.
        ChecksumError: the download is not the published file (the part was deleted).
        ModelFetchError: HTTP errors, refused connections, timeouts and cut downloads (the part is kept,
            so fetching again resumes).
    """
    target = Path(models_dir) / entry.name
    if target.is_file() and check_file(entry, models_dir).usable:
        return target
    if entry.by_hand:
        raise DownloadByHandError(entry, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    # Two tries: the second starts from zero when the first finds the part unusable for resuming.
    for _ in range(2):
        if _download(entry.url, part, progress=progress, timeout=timeout):
            break
    else:
        raise ModelFetchError(entry.url, "the server does not answer range requests consistently")
    _check_download(entry, part)
    os.replace(part, target)
    return target


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
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(have + received, total)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as exc:
            raise ModelFetchError(url, f"{_reason(exc, timeout)} after {have + received} bytes; fetch again to "
                                       f"resume") from None
    # http.client does not flag a body cut short when it is read in chunks.
    if expected_body is not None and received < expected_body:
        raise ModelFetchError(url, f"connection closed after {have + received} of {have + expected_body} bytes; "
                                   f"fetch again to resume")
    return True


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
