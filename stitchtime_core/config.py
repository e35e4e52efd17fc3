"""One frozen, typed config per stage. Defaults are the paper's (section 3.5) and the reference code's.

A run resolves these once (profile defaults, then user overrides) and stores the result as JSON
beside its outputs; every stage's artifact key hashes its config, so a changed setting re-runs
exactly the stages it affects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from stitchtime_core.errors import DeviceError


POSITIVE = {"gt": 0}
NON_NEGATIVE = {"ge": 0}
FRACTION = {"ge": 0, "le": 1}
"""Bounds of a setting, as its field's metadata: ``field(default=..., metadata=POSITIVE)``; combine them
with ``le``: ``metadata={"ge": 0, "le": 512}``."""

MAX_STRENGTH = 100.0
"""The largest edit strength accepted, either sign: far beyond any useful edit (the reference code's examples
go to ±8), small enough that the edited codes stay finite in float32."""


class SettingError(ValueError):
    """A setting whose value is not allowed; ``setting`` names it as ``stage.name``."""

    def __init__(self, setting: str, problem: str):
        self.setting = setting
        super().__init__(f"{setting} {problem}")

    def __reduce__(self):  # pickled with both arguments (Prefect pickles errors)
        return type(self), (self.setting, str(self).removeprefix(f"{self.setting} "))


def _check_settings(config: Any, section: str) -> None:
    """Each setting of ``config`` against its declaration: a ``Literal``'s choices, a float is finite, and the
    bounds in its field's metadata (:data:`POSITIVE`, :data:`NON_NEGATIVE`, :data:`FRACTION`, ``le``).

    Raises:
        SettingError: naming the setting as ``section.name``, what it must be and what it is.
    """
    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        value, kind, name = getattr(config, spec.name), hints[spec.name], f"{section}.{spec.name}"
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            choices = ", ".join(repr(choice) for choice in typing.get_args(kind))
            raise SettingError(name, f"must be one of {choices}, got {value!r}")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SettingError(name, f"must be a number, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise SettingError(name, f"must be a finite number, got {value!r}")
        if "gt" in spec.metadata and not value > spec.metadata["gt"]:
            raise SettingError(name, f"must be > {spec.metadata['gt']}, got {value!r}")
        if "ge" in spec.metadata and not value >= spec.metadata["ge"]:
            raise SettingError(name, f"must be >= {spec.metadata['ge']}, got {value!r}")
        if "le" in spec.metadata and not value <= spec.metadata["le"]:
            raise SettingError(name, f"must be <= {spec.metadata['le']}, got {value!r}")


@dataclass(frozen=True)
class AlignmentConfig:
    """Face track, landmarks, temporal smoothing and the FFHQ-style crop (paper section 3.1)."""

    detector: Literal["hog", "cnn"] = "hog"
    """dlib's HOG face detector, or its CNN (MMOD) detector: slower, finds more turned faces."""
    detector_upsample: int = field(default=0, metadata={"ge": 0, "le": 3})
    """How many times the detector upsamples the image it searches (the reference code: 0). HOG finds
    face boxes down to about 55 px at 0, 30 px at 1, in pixels of that image (``detect_max_side``). At most
    3: each time doubles both sides, so a full 4K frame upsampled 3 times is 30720 px wide (1.6 GB), and the
    faces found past that are a few pixels wide, far too small to edit."""
    detect_max_side: int = field(default=0, metadata=NON_NEGATIVE)
    """Faces are detected on a copy of the frame at most this large (0: the full frame, as the reference
    code); landmarks always use the full frame. 960 with upsample 1 cuts a 4K frame's detection from 0.6
    to 0.2 s on two CPU cores but misses faces under ~120 px there (``benchmarks/landmarks.py``)."""
    face: str = "largest"
    """Which face to follow when there are several: "largest", "N" (N-th largest in the first frame
    with faces, 0 = largest) or "X,Y" (the face whose box contains that pixel of that frame, the
    smallest such box where they overlap; no box holding it is an error naming the nearest face)."""
    max_gap: int = field(default=5, metadata=NON_NEGATIVE)
    """Runs of at most this many frames without the face get interpolated landmarks and are edited;
    longer runs pass through unedited."""
    center_sigma: float = field(default=1.0, metadata={"ge": 0, "le": 100})
    """Gaussian low-pass over time of the crop centre, in frames (reference code: 1; see ``sigma_unit``)."""
    axes_sigma: float = field(default=3.0, metadata={"ge": 0, "le": 100})
    """Gaussian low-pass over time of the crop's x/y axes, in frames (reference code: 3; see ``sigma_unit``)."""
    sigma_unit: Literal["frame-at-25fps", "frame"] = "frame-at-25fps"
    """What the sigmas count: "frame-at-25fps", frames of a 25 fps clip, scaled with the clip's rate so
    the smoothing spans the same time at any rate; "frame", the clip's own frames (the reference code),
    which at 50 fps leaves 1.35x the crop's noise and 2.3x its frame-to-frame jitter
    (``benchmarks/landmarks.py``)."""
    scale: float = field(default=1.0, metadata={"gt": 0, "le": 4})
    """Crop size relative to the FFHQ crop (1.0 is the FFHQ crop)."""
    pad: Literal["mirror", "black"] = "mirror"
    """What a crop shows where it reaches beyond the frame: the frame mirrored at its edge (as FFHQ's
    crops, on which the generator and e4e were trained) or black (the reference code)."""
    shrink_by: Literal["side", "half-diagonal"] = "side"
    """Large quads are box-averaged by an integer factor before the crop is sampled: floor(side / crop
    size) ("side": pools from 2x, where bilinear sampling starts to alias) or floor(diagonal / crop size / 2)
    (the reference code's, from 2.83x)."""
    sampler: Literal["opencv", "pil"] = "opencv"
    """What resamples the crops and warps the stitched crops back into the frames: "opencv" rounds each bilinear
    value and box-averages a large quad's region with the exact pixel mapping; "pil" is the reference code's
    PIL calls: bilinear values truncated (half a level darker on average), a large quad's whole frame shrunk
    with PIL's Lanczos filter and the quad divided by the factor k (the crop moves (k - 1) / 2 frame pixels right
    and down), the paste-back an 8-bit RGBA warp laid over the frame with PIL's ``alpha_composite``."""

    def __post_init__(self) -> None:
        _check_settings(self, "alignment")
        if not re.fullmatch(r"largest|\d+|\d+(\.\d+)?,\d+(\.\d+)?", self.face.replace(" ", "")):
            raise SettingError("alignment.face", f"must be 'largest', an index N or a pixel X,Y; got {self.face!r}")


@dataclass(frozen=True)
class EncodingConfig:
    """e4e inversion of the aligned crops into W+ pivots (paper section 3.2)."""

    method: Literal["e4e", "optimization"] = "e4e"
    """How pivots are found: the profile's encoder (e4e, as the paper; the mobile profile's own encoder,
    trained here), or per-frame optimisation from the average latent (the PTI/stylegan2-ada projector:
    the paper's "w/o e4e" ablation)."""
    batch_size: int = field(default=8, metadata=POSITIVE)
    """Crops encoded (or projected) per batch."""
    resize: Literal["antialias", "plain"] = "antialias"
    """How crops are brought to the encoder's input size: bilinear with antialiasing (as the PIL resize
    e4e was trained behind) or plain bilinear (the reference code's tensor ``Resize``, which aliases)."""
    projection_steps: int = field(default=450, metadata=POSITIVE)
    """Optimisation steps per frame when ``method`` is "optimization" (PTI's ``first_inv_steps``)."""
    projection_lr: float = field(default=5e-3, metadata=POSITIVE)
    """Peak learning rate of the projector (PTI's ``first_inv_lr``)."""
    projection_noise_weight: float = field(default=1e5, metadata=NON_NEGATIVE)
    """Weight of the projector's noise regularisation (stylegan2-ada's ``regularize_noise_weight``)."""
    warm_start_steps: int = field(default=0, metadata=NON_NEGATIVE)
    """0: every frame is projected on its own from the average latent (the reference). N > 0: frames
    are projected in order, the first with ``projection_steps`` steps, each next one starting from its
    predecessor's w and noise with N steps: smoother pivots, far fewer steps."""

    def __post_init__(self) -> None:
        _check_settings(self, "encoding")


@dataclass(frozen=True)
class PTIConfig:
    """One generator tuned around all pivots together (paper eq. 1)."""

    lr: float = field(default=3e-5, metadata=POSITIVE)
    """Adam learning rate."""
    observations_per_frame: int = field(default=80, metadata=POSITIVE)
    """Train until each frame has been seen this many times."""
    batch_size: int = field(default=1, metadata=POSITIVE)
    """Frames per optimisation step."""
    lambda_lpips: float = field(default=1.0, metadata=NON_NEGATIVE)
    """Weight of LPIPS(c_i, r_i)."""
    lambda_l2: float = field(default=10.0, metadata=NON_NEGATIVE)
    """λ_L2: weight of the pixel-wise MSE(c_i, r_i)."""
    lambda_r: float = field(default=0.1, metadata=NON_NEGATIVE)
    """λ_R: weight of PTI's locality regulariser."""
    locality_alpha: float = field(default=30.0, metadata=NON_NEGATIVE)
    """The regulariser's code is the pivot moved this far towards a random w."""
    locality_psi: float = field(default=0.5, metadata=FRACTION)
    """Truncation of the random w drawn from the original mapping network."""
    lpips_resolution: int = field(default=0, metadata=NON_NEGATIVE)
    """Images are area-downsampled to this size before LPIPS (0: the generator's own size, as the
    reference code; LPIPS at 1024 px costs about as much as the generator's backward pass)."""
    seed: int = field(default=0, metadata={"ge": 0, "le": 2**63 - 1})
    """Seeds frame order and the regulariser's random codes."""
    frame_order: Literal["shuffled", "fixed"] = "shuffled"
    """"shuffled": each pass over the frames in a new random order; "fixed": always in frame order (the
    reference code), which fits the frames visited first in each pass worst (``benchmarks/pti_settings.py``:
    mean reconstruction LPIPS 0.0228 against 0.0191, the worst frame minus the best 0.0063 against 0.0029)."""
    regularizer_noise: Literal["const", "none"] = "none"
    """The noise the regulariser's images are rendered with: "none", no noise (the reference code); "const",
    the stored noise, as the reconstruction is rendered. Measured alike (``benchmarks/pti_settings.py``:
    locality LPIPS 0.184 against 0.177, reconstruction 0.0183 against 0.0190, MSE equal)."""
    checkpoint_every: int = field(default=100, metadata=NON_NEGATIVE)
    """Save the tuned generator and optimiser every this many steps, so a stopped run resumes there
    (0: never). Not part of the stage's cache key: it does not change the result."""
    checkpoint_seconds: float = field(default=60.0, metadata=NON_NEGATIVE)
    """Save them also once this many seconds have passed since the last save (0: never by time), so that
    a clip of few steps, or slow steps, lose at most this much tuning. Not part of the stage's cache key."""
    method: Literal["pti", "none"] = "pti"
    """"pti" tunes the generator (the paper); "none" keeps the original generator (the "w/o PTI" ablation)."""

    def __post_init__(self) -> None:
        _check_settings(self, "pti")


@dataclass(frozen=True)
class EditingConfig:
    """Linear latent edits e_i = G(w_i + δw; θ_p) (paper section 3.3)."""

    edits: tuple[tuple[str, float], ...] = ()
    """(direction, strength) pairs applied together: a profile's direction name,
    ``sefa:K`` or a direction file."""
    halve_files: Literal["equal-rows", "all"] = "equal-rows"
    """Which direction files move the pivots by strength / 2: "equal-rows", only [num_ws, w_dim] files whose
    rows are all equal (the reference code's own files), read as their first row; "all", every file, read as
    its first row (the reference code applies ``factor / 2`` of the first row of whatever file it reads, so
    a per-layer file with unequal rows moves every layer by its row 0)."""

    def __post_init__(self) -> None:
        _check_settings(self, "editing")
        for name, strength in self.edits:
            check_strength(name, strength)


def check_strength(name: str, strength: float) -> None:
    """Refuse an edit strength that is not finite or beyond :data:`MAX_STRENGTH` either way.

    Raises:
        SettingError: naming the direction and the strength.
    """
    if not (math.isfinite(strength) and abs(strength) <= MAX_STRENGTH):
        raise SettingError(f"the strength of {name}", f"must be a finite number from {-MAX_STRENGTH:g} to "
                                                      f"{MAX_STRENGTH:g}, got {strength:g}")


@dataclass(frozen=True)
class StitchingConfig:
    """Per-frame stitching tuning (paper eqs. 2-4)."""

    lr: float = field(default=3e-4, metadata=POSITIVE)
    """Adam learning rate."""
    steps: int = field(default=100, metadata=POSITIVE)
    """Optimisation steps per frame."""
    lambda_m: float = field(default=0.01, metadata=NON_NEGATIVE)
    """λ_m: weight of the loss that keeps the edit inside the mask."""
    loss: Literal["l1", "l2"] = "l1"
    """The paper's L1, or the reference code's L2."""
    normalise: Literal["mask", "pixels"] = "mask"
    """What a masked loss is divided by: "mask", the mask's area (the sum over channels and pixels of the
    masked error over the sum of the mask: the reference code's ``masked_l2``); "pixels", all 3·H·W values."""
    border_px: int = field(default=50, metadata={"gt": 0, "le": 512})
    """Width of the boundary b = m ⊕ dilate(m), in pixels at 1024 px, scaled to the model size."""
    early_stop_loss: float = field(default=0.0, metadata=NON_NEGATIVE)
    """Stop a frame early once its boundary loss falls below this (0 never stops early)."""
    early_stop_check: Literal["before", "after"] = "before"
    """"before": the boundary loss of the current weights is checked before the update and a frame below
    ``early_stop_loss`` stops without stepping (the reference code); "after": the update is taken first."""
    segment: Literal["edit", "crop"] = "edit"
    """The image BiSeNet parses for the masks: the edit e_i (the paper's Fig. 3) or the original crop x_i
    (the reference code's ``calc_masks``)."""
    parse_resize: Literal["nearest", "antialias"] = "nearest"
    """How that image is brought to BiSeNet's 512 px: nearest-neighbour (the reference code) or antialiased."""
    mask_shape: Literal["square", "disc"] = "square"
    """"square" (the reference code's ``create_masks``): the masks are made on the 512 px labels, b is the
    face dilated by a (2·border/2 + 1)² square minus the face, plus the face within border/2 px of the crop
    edge; the content mask is m − b; all are resized to the crop bilinearly, so their edges are soft.
    "disc": at the crop's size, b = dilate(m) by a disc minus m, content = m, every mask in {0, 1}."""
    batch_size: int = field(default=8, metadata=POSITIVE)
    """Frames tuned at once, each with its own copy of the weights."""
    warm_start: float = field(default=0.3, metadata=FRACTION)
    """0: every frame's tuning starts from θ_p (the paper, the reference code). f > 0: the frames of a
    chunk are split into ``batch_size`` runs of neighbours; each run's first frame starts from θ_p and
    takes ``steps``, each next one goes on from where its predecessor ended (see ``warm_optimizer``) and
    takes ceil(f·steps). Measured (README, Benchmarks): at 0.3 with Adam's state carried, a lower boundary
    error than every frame tuned from θ_p, at 2-3x the speed."""
    warm_optimizer: Literal["carried", "fresh"] = "carried"
    """What a warm frame takes from its neighbour besides the weights: "carried", Adam's moments and step
    count, so the optimisation goes on as if the neighbour's targets had been swapped for its own; "fresh",
    a new Adam, whose first steps move every weight by about ``lr`` whatever its gradient. Measured (README,
    Benchmarks): with a fresh Adam a third of the steps left the boundary error higher on the mobile profile
    (0.0141 against 0.0114 at 100 steps), carried it ends lower (0.0111)."""
    method: Literal["tuning", "none"] = "tuning"
    """"tuning" is the paper's stitching tuning; "none" keeps the raw edit e_i (the "w/o stitching"
    ablation: pair it with blending.method "mask" or "poisson")."""

    def __post_init__(self) -> None:
        _check_settings(self, "stitching")


@dataclass(frozen=True)
class BlendingConfig:
    """Paste the stitched crop back into the frame."""

    method: Literal["feather", "mask", "poisson"] = "feather"
    """"feather": through the dilated mask m^d with a Gaussian edge (the paper); "mask": a hard paste
    inside the segmentation mask m; "poisson": Poisson blending (OpenCV seamlessClone) inside m.
    The last two are the paper's blending baselines."""
    feather_shape: Literal["square", "disc"] = "square"
    """"square" (the reference code's ``paste_image_mask``): m^d is eroded by a (2r + 1)² square and blurred
    by a (2r + 1)² Gaussian whose σ follows OpenCV's rule, 0.3·(r − 1) + 0.8, r = ``feather_radius_px``;
    "disc": eroded by a disc of r = ceil(2σ) and blurred with σ = ``feather_px``, so the edge stays inside m^d."""
    feather_radius_px: int = field(default=25, metadata={"ge": 0, "le": 512})
    """r of the "square" feathering, pixels at 1024 px, scaled to the crop (the reference code: 50 // 2)."""
    feather_px: float = field(default=12.0, metadata={"ge": 0, "le": 512})
    """σ of the "disc" feathering (pixels at 1024 px, scaled to the crop)."""

    def __post_init__(self) -> None:
        _check_settings(self, "blending")


@dataclass(frozen=True)
class OutputConfig:
    """Encoding of the edited video; the source's audio is copied as it is."""

    codec: str = "libx264"
    crf: int = field(default=18, metadata={"ge": 0, "le": 63})
    """Constant rate factor: lower is better quality and larger files (libx264: 0-51; VP9, AV1: 0-63). ffmpeg
    is asked at the start of a run whether it can encode with these settings."""
    preset: str = "medium"
    pix_fmt: str = "yuv420p"

    def __post_init__(self) -> None:
        _check_settings(self, "output")


@dataclass(frozen=True)
class RunConfig:
    """Every stage's config for one run."""

    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    pti: PTIConfig = field(default_factory=PTIConfig)
    editing: EditingConfig = field(default_factory=EditingConfig)
    stitching: StitchingConfig = field(default_factory=StitchingConfig)
    blending: BlendingConfig = field(default_factory=BlendingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Rebuild a config written by :func:`to_dict`; unknown stages or fields raise ``TypeError``."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown stage(s) {', '.join(sorted(unknown))} in a run config")
        parts = {}
        for f in dataclasses.fields(cls):
            stage = dict(data.get(f.name, {}))
            if f.name == "editing" and "edits" in stage:
                stage["edits"] = tuple((str(n), float(s)) for n, s in stage["edits"])
            parts[f.name] = f.default_factory(**stage)  # type: ignore[misc]
        return cls(**parts)


def to_dict(config: Any) -> dict[str, Any]:
    """A config (one of the dataclasses here, or a dict of them) as plain JSON-able data."""
    if isinstance(config, dict):
        return {name: to_dict(part) if isinstance(part, dict) or dataclasses.is_dataclass(part) else part
                for name, part in config.items()}
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"not a config: {config!r}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_hash(config: Any) -> str:
    """A stable hex digest of a config's values, used in artifact keys."""
    text = json.dumps(to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def with_overrides(config: RunConfig, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """A copy of ``config`` with ``{stage: {field: value}}`` replaced.

    Raises:
        ValueError: an unknown stage or field, or a value of the wrong type.
    """
    data = to_dict(config)
    for stage, fields in overrides.items():
        for name, value in fields.items():
            if stage not in data:
                raise SettingError(f"{stage}.{name}", f"is not a setting: there is no stage {stage!r}; stages are "
                                                      f"{', '.join(data)}")
            if name not in data[stage]:
                raise SettingError(f"{stage}.{name}", f"is not a setting; {stage} has {', '.join(data[stage])}")
            current = data[stage][name]
            if isinstance(current, bool) or not isinstance(current, (int, float, str)):
                raise SettingError(f"{stage}.{name}", "cannot be set from the command line")
            data[stage][name] = _convert(value, type(current), f"{stage}.{name}")
    return RunConfig.from_dict(data)


def _convert(value: Any, kind: type, name: str) -> Any:
    """``value`` (often a command-line string) as ``kind``, refusing anything that would lose information."""
    try:
        if kind is str:
            return str(value)
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        raise SettingError(name, f"must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}") from None


ABLATIONS: dict[str, dict[str, dict[str, str]]] = {
    "no-e4e": {"encoding": {"method": "optimization"}},
    "no-pti": {"pti": {"method": "none"}},
    "no-stitching": {"stitching": {"method": "none"}, "blending": {"method": "mask"}},
    "poisson": {"stitching": {"method": "none"}, "blending": {"method": "poisson"}},
}
"""The paper's ablations (section 4.3), each as the settings it changes: pivots by optimisation
instead of e4e, no generator tuning, the raw edit pasted inside the segmentation mask instead of
stitching tuning, and the raw edit Poisson-blended."""


def ablations_of(config: RunConfig) -> list[str]:
    """The names of the :data:`ABLATIONS` a config carries out (empty for the full method)."""
    found = []
    for name, settings in ABLATIONS.items():
        if all(getattr(getattr(config, stage), field_name) == value
               for stage, fields in settings.items() for field_name, value in fields.items()):
            found.append(name)
    return found


# --- profiles and qualities ---------------------------------------------------------------------

PROFILES = ("tiny", "ffhq", "mobile")
"""The sets of networks a run can use (:mod:`stitchtime_core.models.profiles` loads them)."""
QUALITIES = ("preview", "paper")


def check_device(device: Any) -> None:
    """Check that torch can compute on ``device`` (a name or a ``torch.device``) here, before any network is put
    there. Loads torch only for a CUDA device.

    Raises:
        DeviceError: a CUDA device is asked for and this torch has no CUDA, or finds no GPU, or fewer GPUs than
            the index asked for; the message says which, and what ``CUDA_VISIBLE_DEVICES`` holds.
        ValueError: not a device torch knows (e.g. "gpu").
    """
    if str(device) == "cpu":
        return
    import torch

    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda") from None
    if wanted.type != "cuda":
        return
    if torch.version.cuda is None:
        raise DeviceError(str(device), f"this torch ({torch.__version__}) was built without CUDA; "
                                       "install a CUDA build of torch, or run with --device cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
    count = torch.cuda.device_count()
    if not count:
        raise DeviceError(str(device), f"no CUDA GPU is visible here (torch {torch.__version__}, CUDA "
                                       f"{torch.version.cuda}{shown}): run with --device cpu, or where an NVIDIA GPU "
                                       "and its driver are")
    if (wanted.index or 0) >= count:
        raise DeviceError(str(device), f"only {count} CUDA GPU{'s' if count > 1 else ''} visible here "
                                       f"(cuda:0 to cuda:{count - 1}{shown})")


def on_gpu(device: str) -> bool:
    """Whether ``device`` (a name or a ``torch.device``) is a GPU."""
    return str(device).startswith("cuda")


def default_quality(device: str) -> str:
    """``paper`` on a GPU, ``preview`` on a CPU, where the paper's settings take hours per clip."""
    return "paper" if on_gpu(device) else "preview"


def profile_defaults(profile: str, quality: str = "paper") -> RunConfig:
    """The run config a profile starts from at a quality.

    ``paper``: the paper's values (section 3.5). ``preview``: fewer steps, for CPUs (see
    :data:`PREVIEW`). The tiny networks start from random weights and have settings of their own at
    both qualities: PTI needs a larger learning rate and batches to fit the frames within a CPU-minute,
    and stitching tuning takes fewer steps (at the paper's learning rate: a larger one blurs the face it
    should keep). The projector (the "w/o e4e" ablation) needs a larger learning rate too: the tiny W
    space is wider (spread about 6.4), and at 5e-3 its LPIPS only falls from 0.11 to 0.065 in 20 steps.
    The run's config file records the values used.
    """
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if profile == "tiny":
        return RunConfig(
            encoding=EncodingConfig(projection_steps=100, projection_lr=0.02),
            pti=PTIConfig(lr=1e-2, observations_per_frame=32, batch_size=4),
            stitching=StitchingConfig(steps=25),
        )
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return PREVIEW if quality == "preview" else RunConfig()


def device_defaults(profile: str, device: str) -> dict[str, dict[str, Any]]:
    """``{stage: {setting: value}}`` that running on ``device`` changes: on a CPU the real profiles stitch one
    frame at a time, as ``preview`` always does.

    At 1024 px on two CPU cores, frames tuned 8 at once (each with its own weights) cost 2.3x a frame what one
    at a time does: the mobile profile's stitch stage took 235 s a frame at the paper's 100 steps, the reference
    code's loop 101 s, and warm starts, which then run through a whole chunk, 39 s at a lower boundary error and
    a higher TL-ID (``benchmarks/stitching.py``; README, Benchmarks). The tiny profile's 64 px frames gain from
    batches on a CPU too (3x), so it keeps them; on a GPU batches are the point.
    """
    if profile != "tiny" and not on_gpu(device):
        return {"stitching": {"batch_size": 1}}
    return {}


def run_config(profile: str, quality: str = "paper", overrides: dict[str, dict[str, Any]] | None = None, *,
               preset: str = "paper", device: str | None = None) -> RunConfig:
    """A preset's settings, then those the profile and quality change (step counts, learning rates: what
    :func:`profile_defaults` sets apart from the paper's), then the device's (:func:`device_defaults`, when
    ``device`` is given), then the user's overrides; the edits are set per output.

    So ``--quality preview`` shortens a ``stit-code`` run as it shortens a ``paper`` one, and ``--set`` wins.

    Raises:
        ValueError: an unknown profile, quality or preset, or a bad override.
    """
    config = with_overrides(_preset_config(preset), _differences(profile_defaults(profile, quality), RunConfig()))
    if device is not None:
        config = with_overrides(config, device_defaults(profile, device))
    return with_overrides(config, overrides or {})


def preset_differences(config: RunConfig, preset: str) -> dict[str, dict[str, Any]]:
    """``{stage: {setting: value}}`` of every setting of ``config`` that is not the preset's own: what the profile,
    the quality and the user's overrides changed (a run summary records them beside the preset's name).

    Raises:
        ValueError: an unknown preset.
    """
    return _differences(config, _preset_config(preset))


def _preset_config(preset: str) -> RunConfig:
    """The settings a preset gives before any profile, quality or override.

    Raises:
        ValueError: an unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return with_overrides(RunConfig(), PRESETS[preset])


def _differences(config: RunConfig, base: RunConfig) -> dict[str, dict[str, Any]]:
    """``{stage: {setting: value}}`` of the settings where ``config`` differs from ``base``."""
    new, old = to_dict(config), to_dict(base)
    return {stage: changed for stage in new
            if (changed := {name: value for name, value in new[stage].items() if value != old[stage][name]})}


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "stit-code": {
        "alignment": {"sigma_unit": "frame", "pad": "black", "shrink_by": "half-diagonal", "sampler": "pil"},
        "encoding": {"resize": "plain"},
        "pti": {"observations_per_frame": 300, "lambda_r": 0.0, "frame_order": "fixed"},
        "editing": {"halve_files": "all"},
        "stitching": {"loss": "l2", "warm_start": 0.0, "segment": "crop"},
    },
}
"""Which behaviour a run follows (``--preset``); the README's method section tables every difference.

``paper``: the paper where it speaks (L1, λ_R = 0.1, PTI until each frame is seen 80 times, BiSeNet on the
edited image as its Fig. 3), the reference code where it is silent (loss normalisation, early-stop order,
mask shapes, feathering, faces detected on the full frame without upsampling), and stitchtime's own choices
where a measurement or a convention says so (warm starts, smoothing sigmas that span the same time at any
frame rate, ...). ``stit-code``: the reference code (rotemtzaban/STIT) as it runs with its own defaults:
smoothing sigmas in the clip's frames, crops padded black, pooled by the quad's half diagonal, sampled and
pasted back with PIL's transforms (a pooled frame shrunk with its Lanczos filter), the e4e input resized
without antialiasing, L2, no warm starts, 300 PTI passes in frame order without the regulariser, the original
crop segmented, every direction file read as half its first row.
"""


PREVIEW = RunConfig(
    encoding=EncodingConfig(projection_steps=100, warm_start_steps=10),
    pti=PTIConfig(lr=3e-4, observations_per_frame=4, lambda_r=0.0, lpips_resolution=256),
    stitching=StitchingConfig(lr=1e-4, steps=10, batch_size=1),
)
"""``--quality preview`` for the real profiles: what a CPU does in minutes per clip instead of hours.

PTI sees each frame 4 times instead of 80, at PTI's single-image learning rate (3e-4) instead of
STIT's 3e-5, without the locality regulariser (which doubles a step's cost; STIT's own ``train.py``
leaves it off), with LPIPS at 256 px instead of 1024 px (as the projector measures it). Stitching
tuning takes 10 steps instead of 100, at 1e-4 instead of 3e-4 (on MobileStyleGAN, 10 steps at 3e-4
soften the face; at 1e-4 the boundary error falls as far and the face stays sharp), one frame at a
time (on a CPU, several frames at once only add work); as at ``paper`` quality, each frame after a
chunk's first goes on from where its neighbour ended (weights and Adam's state) for 3 steps.
Optimisation pivots take 100 steps for the first frame and 10 for each next one, which starts from its
neighbour's.
"""
