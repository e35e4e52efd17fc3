"""A run's outputs on the user's disk: their names, the checks made before any work, and the JSON beside them.

One run writes one video per edit set: ``--out`` itself for one, ``<out stem>.<label><suffix>`` beside it
for several, each with its report; the run's summary and config go beside ``--out``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from stitchtime_core import video
from stitchtime_core.config import OutputConfig, RunConfig, ablations_of, preset_differences, to_dict
from stitchtime_core.errors import InputError
from stitchtime_core.files import check_file, is_symlink_loop, write_output
from stitchtime_core.models.registry import DIRECTION_SUFFIXES, direction_kind, direction_names
from stitchtime_core.video import VideoInfo, probe, same_file

if TYPE_CHECKING:  # the command line checks outputs with this module before Prefect and torch are imported
    from tasks.stages import StageRef

EditSet = list[tuple[str, float]]
"""The (direction, strength) pairs applied together to make one output."""


def _direction_label(name: str) -> str:
    path = Path(name)
    if path.suffix in DIRECTION_SUFFIXES or "/" in name or os.sep in name:
        name = path.stem
    name = re.sub(r"\s+", "-", name.strip())
    return re.sub(r"[^A-Za-z0-9._-]+", "", name).strip(".") or "edit"


def _strength_label(strength: float) -> str:
    strength += 0.0  # -0.0 becomes 0.0
    short = f"{strength:+g}"
    return short if float(short) == strength else f"{strength:+}"


def output_label(edit_set: EditSet) -> str:
    """A short, filesystem-safe name of an edit set: ``age+2``, ``age-4``, ``age+2_smile+1``, ``sefa3+1.5``.

    A direction file is named by its file stem.
    """
    return "_".join(f"{_direction_label(name)}{_strength_label(strength)}" for name, strength in edit_set)


def _same_edit(edit_set: EditSet) -> frozenset[tuple[str, float]]:
    """Edits added together commute: ``age=2+smile=1`` and ``smile=1+age=2`` give the same output."""
    return frozenset((name, float(strength)) for name, strength in edit_set)


def output_paths(out: str | os.PathLike, edit_sets: list[EditSet]) -> list[tuple[str, Path]]:
    """(label, path) of each output: ``out`` itself for one edit set, else ``<stem>.<label><suffix>`` beside it.

    Labels are made unique with ``_v2``, ``_v3``… when two edit sets would get the same one.

    Raises:
        ValueError: no edit set, an empty one, or the same edit set twice.
    """
    if not edit_sets or not all(edit_sets):
        raise ValueError("give at least one edit (NAME=STRENGTH)")
    seen: set[frozenset[tuple[str, float]]] = set()
    for edit_set in edit_sets:
        if _same_edit(edit_set) in seen:
            raise ValueError(f"the edit {output_label(edit_set)} is asked for twice")
        seen.add(_same_edit(edit_set))
    labels: list[str] = []
    for edit_set in edit_sets:
        label = base = output_label(edit_set)
        for n in itertools.count(2):
            if label.lower() not in (taken.lower() for taken in labels):  # case-insensitive filesystems
                break
            label = f"{base}_v{n}"
        labels.append(label)
    out = Path(out)
    if len(edit_sets) == 1:
        return [(labels[0], out)]
    return [(label, out.with_name(f"{out.stem}.{label}{out.suffix}")) for label in labels]


def report_path(out: str | os.PathLike) -> Path:
    """Where the report of the output ``out`` goes: ``<out stem>.report.html`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.report.html")


def sidecar_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Where a run writes its summary and its resolved config: beside ``--out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json"), out.with_name(f"{out.stem}.config.json")


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary name, so a reader never sees half a file.

    Raises:
        InputError: ``path`` cannot be written (a full disk, say); no temporary file is left.
    """
    write_output(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_paths(source: str, out: str | os.PathLike) -> None:
    """Fail before any work when the input is missing or the output cannot be written."""
    check_file(source)  # a missing file, a symlink loop, a folder: each named as such
    if not os.access(source, os.R_OK):
        raise InputError(source, "not readable")
    check_writable(out, inputs=[source])
    check_output_name(out)


def check_output_name(out: str | os.PathLike) -> None:
    """Fail unless ``out`` names a file with an extension, which picks the container.

    Raises:
        InputError: an empty path, a name that is only an extension (``.mp4``) or none.
    """
    name = Path(out).name
    if not str(out):
        raise InputError("--out", "the output path is empty")
    if name.startswith(".") and not Path(name).suffix:
        raise InputError(out, f"output needs a name before its extension (e.g. clip{name})")
    if not Path(out).suffix:
        raise InputError(out, "output needs a file extension (e.g. .mp4)")


def check_writable(out: str | os.PathLike, *, inputs: list[str]) -> None:
    """Fail before any work when ``out`` is one of the ``inputs`` or its folder cannot be written.

    Raises:
        InputError: naming ``out`` or its folder, and the problem.
    """
    if is_symlink_loop(out):  # Path.resolve would raise RuntimeError
        raise InputError(out, "a symlink loop")
    if any(same_file(out, path) for path in inputs):
        raise InputError(out, "output would overwrite its source")
    folder = Path(out).resolve().parent
    if not folder.is_dir():
        raise InputError(folder, "output folder does not exist")
    try:  # the real test: permissions, a read-only file system, ACLs (os.access misses some)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise InputError(folder, f"output folder is not writable ({exc.strerror})") from None


def check_direction_names(edit_sets: list[EditSet], profile: str, models_dir: str | None) -> None:
    """Fail before any work when an edit names no direction of the profile, no ``sefa:K`` and no file; the
    networks are not loaded (the flow resolves every direction, files and ``sefa:K`` included, before its first
    stage). A profile without named directions (an ffhq folder without them) is left to the flow, which checks
    the profile's files first.

    Raises:
        ValueError: the first unknown name, listing the profile's directions.
    """
    names = direction_names(profile, models_dir)
    if not names:  # an ffhq models folder without directions: the flow checks the profile's files first
        return
    for edit_set in edit_sets:
        for name, _ in edit_set:
            direction_kind(name, names)


def check_encoding(out: str | os.PathLike, output: OutputConfig, source: str | None = None) -> VideoInfo | None:
    """Ask ffmpeg, before any work, whether it can write ``out`` with the ``output`` settings and ``source``'s
    audio (when it has any): see :func:`stitchtime_core.video.check_encoding`. Returns ``source``'s probe.

    Raises:
        ValueError: ffmpeg cannot (its reason, naming the settings or the container).
        InputError: ``source`` is not a video ffprobe can read.
    """
    info = probe(source) if source else None
    video.check_encoding(out, output, audio_source=source if info and info.has_audio else None)
    return info


def check_face_point(face: str, info: VideoInfo, source: str) -> None:
    """Fail before any work when ``face`` (``AlignmentConfig.face``) is a point X,Y outside ``source``'s frame.

    Raises:
        ValueError: naming ``--face``, the frame's size and the ranges of X and Y.
    """
    point = face.replace(" ", "").split(",")
    if len(point) == 2:
        x, y = (float(value) for value in point)
        if not (0 <= x < info.width and 0 <= y < info.height):
            raise ValueError(f"--face {face}: the point lies outside the frame of {source} ({info.width}x"
                             f"{info.height} px; X from 0 to {info.width - 1}, Y from 0 to {info.height - 1})")


def check_outputs(source: str, out: str | os.PathLike, edit_sets: list[EditSet]) -> list[tuple[str, Path]]:
    """:func:`check_paths` for every output the edit sets make, before any work; returns :func:`output_paths`.

    With several outputs ``--out`` itself is not written (only its summary), so it may name the source.
    The summary, config and reports written beside the outputs may not name it either.
    """
    check_output_name(out)
    outputs = output_paths(out, edit_sets)
    for _, path in outputs:
        check_paths(source, path)
    for path in [*sidecar_paths(out), *(report_path(path) for _, path in outputs)]:
        if same_file(path, source):
            raise InputError(path, "the run's summary, config or report would overwrite its source")
    return outputs


class PendingOutputs:
    """The files of one run, written under hidden temporary names beside their final ones and renamed to them
    together once every one is complete, the summary last: a reader (a batch asking whether a video is done)
    sees a run's whole set of outputs or none of it.

    Use it as a context manager around the run: a failure inside the block (Ctrl-C included) deletes the
    temporary files and leaves the final names as they were; an :class:`InputError` about a temporary file
    (a full disk) is raised again naming the final one. :meth:`commit` first deletes an earlier run's
    summary at the final name, so that set stops counting as done before any of its files is replaced;
    if a rename fails part way, every final name of the set is deleted.

    Args:
        finals: the final paths, the run's summary last.
    """

    def __init__(self, finals: list[Path]):
        token = uuid.uuid4().hex[:12]
        self.temps = {os.path.realpath(final): os.path.realpath(final.with_name(f".{final.stem}.partial-{token}"
                                                                               f"{final.suffix}"))
                      for final in finals}
        """Final path -> where the run writes it until :meth:`commit` (both real paths, as :meth:`path` looks
        them up); the suffix stays, as ffmpeg picks the container by it."""

    def path(self, final: str | os.PathLike) -> Path:
        """Where the file to go to ``final`` is written until :meth:`commit`."""
        return Path(self.temps[os.path.realpath(final)])

    def commit(self) -> None:
        """Rename every file to its final name, the summary last.

        Raises:
            InputError: a file is missing (never written) or cannot be renamed; then no final name of the set
                is left.
        """
        finals = list(self.temps)
        missing = [final for final in finals if not os.path.isfile(self.temps[final])]
        if missing:
            raise InputError(missing[0], "was not written: the run's outputs are left out")
        done: list[str] = []
        try:
            Path(finals[-1]).unlink(missing_ok=True)
            for final in finals:
                os.replace(self.temps[final], final)
                done.append(final)
        except OSError as exc:
            for final in finals:
                Path(final).unlink(missing_ok=True)
            raise InputError(exc.filename or finals[len(done)], f"cannot be written ({exc.strerror})") from None
        finally:
            self.discard()

    def discard(self) -> None:
        """Delete the temporary files that are left."""
        for temp in self.temps.values():
            Path(temp).unlink(missing_ok=True)

    def __enter__(self) -> PendingOutputs:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: object) -> None:
        self.discard()
        if isinstance(exc, InputError):  # a file that could not be written is named as the user knows it
            finals = {temp: final for final, temp in self.temps.items()}
            final = finals.get(os.path.realpath(exc.path))
            if final is not None:
                raise InputError(final, exc.problem) from None


def write_config(path: Path, profile: str, quality: str, preset: str, config: RunConfig, editing: list[Any]) -> None:
    """The run's config file: every stage's settings; ``editing`` holds one entry per output, in the order of
    the summary's outputs."""
    write_json(path, {"profile": profile, "quality": quality, "preset": preset, **to_dict(config),
                      "editing": [to_dict(entry) for entry in editing]})


class Edit(BaseModel):
    direction: str
    strength: float


class OutputSummary(BaseModel):
    """One output of a run: its edits, where it went, and its stages (those made for it alone)."""

    edits: list[Edit]
    label: str
    output: str
    seconds: dict[str, float]
    """What each of its stages took in this run (a reused one: the look-up)."""
    reused_stages: list[str]
    artifacts: dict[str, str]
    """Each of its stages' key in the store."""
    made_seconds: float
    """What making this output took when nothing was reused: every stage's time when it was made."""
    stitching: dict[str, Any]
    identity: dict[str, Any]
    report: str


class RunSummary(BaseModel):
    """What a run writes beside ``--out`` (``<out stem>.summary.json``) and its flow returns."""

    input: str
    flow_run_id: str | None
    config: str
    """The run's config file: every stage's settings."""
    profile: str
    quality: str
    preset: str = "paper"
    """Whose behaviour the settings start from (``stitchtime_core.config.PRESETS``); older summaries lack it."""
    differs_from_preset: dict[str, dict[str, Any]] = {}
    """``{stage: {setting: value}}``: every setting of this run that is not the preset's (what the profile, the
    quality and ``--set`` changed); older summaries lack it."""
    device: str
    store: str
    ablations: list[str]
    methods: dict[str, str]
    frames: int
    fps: str | float
    size: list[int]
    has_audio: bool
    variable_frame_rate: bool
    rotation: int
    edited_frames: int
    interpolated_frames: list[int]
    passed_through_frames: list[int]
    seconds: dict[str, float]
    """What each shared stage (probe to PTI) took in this run."""
    total_seconds: float
    reused_stages: list[str]
    artifacts: dict[str, str]
    pti: dict[str, Any]
    outputs: list[OutputSummary]
    # With one output, its main facts are at the top as well (the common case reads as before).
    output: str | None = None
    stitching: dict[str, Any] | None = None
    identity: dict[str, Any] | None = None
    report: str | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunSummary:
        """A run's summary file.

        Raises:
            OSError: it cannot be read. ValueError: it is not a run summary (naming what is wrong).
        """
        return cls.model_validate_json(Path(path).read_text())

    def as_json(self) -> dict[str, Any]:
        """The summary as the JSON it is written as."""
        data = self.model_dump(mode="json")
        if len(self.outputs) != 1:
            for name in SINGLE_OUTPUT_FIELDS:
                del data[name]
        return data


SINGLE_OUTPUT_FIELDS = ("output", "stitching", "identity", "report")


class AblationRow(BaseModel):
    """One variant of an ablation table: its scores, cost, and where its output, report and summary are."""

    variant: str
    tl_id: float | None
    tg_id: float | None
    boundary_error: float
    seconds: float
    """What the variant costs when nothing is reused: every stage's time when it was made."""
    output: str
    report: str
    summary: str


def output_summary(edit_set: EditSet, label: str, path: Path, shared: list[StageRef],
                   refs: list[StageRef]) -> OutputSummary:
    """One output's part of the run summary, from the stages run for it (``refs``) and those all outputs share."""
    by_stage = {ref.stage: ref for ref in refs}
    return OutputSummary(
        edits=[Edit(direction=name, strength=strength) for name, strength in edit_set],
        label=label,
        output=str(path.resolve()),
        seconds={ref.stage: round(ref.seconds, 3) for ref in refs},
        reused_stages=[ref.stage for ref in refs if ref.reused],
        artifacts={ref.stage: ref.key for ref in refs},
        made_seconds=round(sum(ref.made_seconds for ref in shared + refs), 3),
        stitching={k: v for k, v in by_stage["stitch"].info.items() if k != "chunks"},
        identity=by_stage["measure"].info,
        report=str(report_path(path).resolve()),
    )


def run_summary(source: str, config_path: Path, *, profile: str, quality: str, preset: str, device: str, store: str,
                config: RunConfig, shared: list[StageRef], results: list[OutputSummary], total_seconds: float,
                flow_run_id: str | None) -> RunSummary:
    """The run summary written beside ``--out``: the input, settings, every stage's key and seconds, each output."""
    from tasks.store import open_store

    by_stage = {ref.stage: ref for ref in shared}
    video, align = by_stage["probe"].info["video"], by_stage["align"].info
    one = results[0] if len(results) == 1 else None
    return RunSummary(
        input=os.path.abspath(source),
        flow_run_id=flow_run_id,
        config=str(config_path.resolve()),
        profile=profile,
        quality=quality,
        preset=preset,
        differs_from_preset=preset_differences(config, preset),
        device=device,
        store=open_store(store).uri,  # absolute: `stitchtime report` may run from another folder
        ablations=ablations_of(config),
        methods={"encoding": config.encoding.method, "pti": config.pti.method,
                 "stitching": config.stitching.method, "blending": config.blending.method},
        frames=video["frame_count"],
        fps=video["fps"],
        size=[video["width"], video["height"]],
        has_audio=video["has_audio"],
        variable_frame_rate=video["variable_frame_rate"],
        rotation=video["rotation"],
        edited_frames=align["edited_frames"],
        interpolated_frames=align["interpolated"],
        passed_through_frames=align["passed_through"],
        seconds={ref.stage: round(ref.seconds, 3) for ref in shared},
        total_seconds=round(total_seconds, 3),
        reused_stages=[ref.stage for ref in shared if ref.reused]
                      + [f"{stage}[{result.label}]" for result in results for stage in result.reused_stages],
        artifacts={ref.stage: ref.key for ref in shared},
        pti=by_stage["pti"].info,
        outputs=results,
        output=one and one.output, stitching=one and one.stitching, identity=one and one.identity,
        report=one and one.report,
    )
