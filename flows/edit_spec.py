"""The command line's small languages: edit specs (``--edit age=-2,2+smile=1``), settings
(``--set stitching.steps=50``) and how ablations and settings combine into a run's overrides."""

from __future__ import annotations

import itertools
import re

import click

from stitchtime_core.config import ABLATIONS, check_strength

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_STRENGTHS = rf"{_NUMBER}(?:,{_NUMBER})*"
# The last NAME=STRENGTHS term of a spec, and what comes before it (itself a spec, joined by "+").
# The name is everything after that "+": it may hold ":" (sefa:3), "/" and even "+" (a file path).
_LAST_TERM = re.compile(rf"(?:(?P<rest>.*={_STRENGTHS})\+)?(?P<name>.+)=(?P<strengths>{_STRENGTHS})")
_EDIT_EXAMPLES = "e.g. age=2, age=-4,-2,2,4 (one output per strength), age=2+smile=1 (one combined output)"


def parse_edit_spec(text: str) -> list[list[tuple[str, float]]]:
    """The edit sets (one per output) one ``--edit`` stands for: ``NAME=S1[,S2,...]`` terms joined by ``+``.

    Each term gives one or more strengths of a direction, and the spec stands for every combination:
    ``age=-2,2+smile=1`` is ``[[("age", -2.0), ("smile", 1.0)], [("age", 2.0), ("smile", 1.0)]]``.
    A name may hold ``:`` (``sefa:3``) and be a file path (even one with ``+``), never ``=``.

    Raises:
        click.BadParameter: the spec does not have that form, or names a direction twice.
    """
    terms: list[tuple[str, list[float]]] = []
    rest: str | None = text
    while rest is not None:
        match = _LAST_TERM.fullmatch(rest)
        name = match["name"] if match else ""
        if not name.strip() or name.startswith("+") or "=" in name:
            raise click.BadParameter(f"{text!r}: expected NAME=STRENGTH[,STRENGTH...][+NAME=STRENGTH...], "
                                     f"{_EDIT_EXAMPLES}")
        strengths = [float(s) for s in match["strengths"].split(",")]
        for strength in strengths:
            try:
                check_strength(name, strength)
            except ValueError as exc:
                raise click.BadParameter(f"{text!r}: {exc}") from None
        terms.insert(0, (name, strengths))
        rest = match["rest"]
    names = [name for name, _ in terms]
    for name in names:
        if names.count(name) > 1:
            raise click.BadParameter(f"{text!r}: {name} is given twice; give each direction once, "
                                     f"with all its strengths: {name}=S1,S2")
    return [list(edit_set) for edit_set in itertools.product(*[[(name, s) for s in strengths]
                                                               for name, strengths in terms])]


def parse_edits(ctx: click.Context, param: click.Parameter, value: str | tuple[str, ...]) -> list:
    """Click callback: every --edit's edit sets, in order; the same output asked for twice is refused."""
    edit_sets = [edit_set for text in ([value] if isinstance(value, str) else value)
                 for edit_set in parse_edit_spec(text)]
    seen = set()
    for edit_set in edit_sets:
        if frozenset(edit_set) in seen:  # edits add up, so their order does not matter
            text = "+".join(f"{name}={strength:g}" for name, strength in edit_set)
            raise click.BadParameter(f"{text} is asked for twice")
        seen.add(frozenset(edit_set))
    return edit_sets


def run_overrides(ablations: tuple[str, ...], settings: list[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    """``{stage: {setting: value}}`` from the chosen ablations, then the --set settings, which win.

    Raises:
        click.UsageError: two ablations disagree on a setting.
    """
    overrides: dict[str, dict[str, str]] = {}
    chosen: dict[str, str] = {}
    for ablation in ablations:
        for stage, fields in ABLATIONS[ablation].items():
            for name, value in fields.items():
                setting = f"{stage}.{name}"
                if overrides.get(stage, {}).get(name, value) != value:
                    raise click.UsageError(f"--ablation {chosen[setting]} and --ablation {ablation} both set "
                                           f"{setting} ({overrides[stage][name]} and {value}); choose one")
                overrides.setdefault(stage, {})[name] = value
                chosen.setdefault(setting, ablation)
    for stage, name, value in settings:
        overrides.setdefault(stage, {})[name] = value
    return overrides


def parse_setting(text: str) -> tuple[str, str, str]:
    path, sep, value = text.partition("=")
    stage, dot, name = path.partition(".")
    if not sep or not dot or not stage or not name:
        raise click.BadParameter(f"{text!r}: expected STAGE.SETTING=VALUE, e.g. stitching.steps=50")
    return stage, name, value


PLACEABLE_STAGES = ("encode", "pti")
"""The stages a run can place on another work pool, whole: those of ``tasks.stages.PLACEABLE`` (a test keeps the
two alike; this module reads them without importing the stages, Prefect and torch)."""


def check_deployment_name(name: str) -> None:
    """Raise ValueError unless ``name`` is FLOW/DEPLOYMENT, as Prefect names a deployment."""
    flow_name, _, deployment = name.partition("/")
    if not flow_name or not deployment or "/" in deployment:
        raise ValueError(f"a deployment is named FLOW/DEPLOYMENT (e.g. stitch-chunk/gpu), got {name!r}")


def parse_placement(text: str | None) -> dict[str, str]:
    """``encode=run-stage/gpu,pti=run-stage/gpu`` as a placement.

    Raises:
        ValueError: not of that form, or a stage that cannot be placed.
    """
    placement = {}
    for part in filter(None, (text or "").replace(" ", "").split(",")):
        stage, sep, deployment = part.partition("=")
        if not sep or not deployment:
            raise ValueError(f"placement {part!r}: expected STAGE=DEPLOYMENT, e.g. pti=run-stage/gpu")
        if stage not in PLACEABLE_STAGES:
            raise ValueError(f"stage {stage!r} cannot be placed; choose one of {', '.join(PLACEABLE_STAGES)}")
        try:
            check_deployment_name(deployment)
        except ValueError as exc:
            raise ValueError(f"placement {part!r}: {exc}") from None
        placement[stage] = deployment
    return placement


def parse_places(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    """Click callback: the ``--place STAGE=DEPLOYMENT`` options as a placement; None when none is given (the
    flow then reads ``$STITCHTIME_PLACEMENT``)."""
    if not values:
        return None
    try:
        return parse_placement(",".join(values))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_fan_out(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: ``--fan-out``'s deployment, checked for its form (whether it exists is asked later)."""
    if value:
        try:
            check_deployment_name(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value
