"""The --edit syntax, output names and --ablation settings: fast, no flow run."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from flows.edit_spec import PLACEABLE_STAGES, parse_edit_spec, parse_placement, run_overrides
from tasks.outputs import check_outputs, output_label, output_paths
from stitchtime_core.config import ABLATIONS
from stitchtime_core.errors import InputError


@pytest.mark.parametrize("text, edit_sets", [
    ("age=2", [[("age", 2.0)]]),
    ("age=-4,-2,2,4", [[("age", -4.0)], [("age", -2.0)], [("age", 2.0)], [("age", 4.0)]]),
    ("age=2+smile=1", [[("age", 2.0), ("smile", 1.0)]]),
    ("age=-2,2+smile=1", [[("age", -2.0), ("smile", 1.0)], [("age", 2.0), ("smile", 1.0)]]),
    ("age=1,2+smile=-1,1", [[("age", 1.0), ("smile", -1.0)], [("age", 1.0), ("smile", 1.0)],
                            [("age", 2.0), ("smile", -1.0)], [("age", 2.0), ("smile", 1.0)]]),
    ("sefa:3=1.5", [[("sefa:3", 1.5)]]),
    ("age=+2", [[("age", 2.0)]]),
    ("age=.5,1e-1,2E+1", [[("age", 0.5)], [("age", 0.1)], [("age", 20.0)]]),
    ("dirs/age.npy=2", [[("dirs/age.npy", 2.0)]]),
    ("dirs/a+b.npy=2+sefa:0=-1", [[("dirs/a+b.npy", 2.0), ("sefa:0", -1.0)]]),  # "+" inside a file name
    ("C:/dirs/age.npy=1", [[("C:/dirs/age.npy", 1.0)]]),
])
def test_edit_spec_gives_one_edit_set_per_output(text: str, edit_sets: list) -> None:
    assert parse_edit_spec(text) == edit_sets


@pytest.mark.parametrize("text", ["age", "age=", "=2", "age=x", "age=nan", "age=2,", "age=2,,3", "age=2+",
                                  "+age=2", "age=2++smile=1", "age==2", "age=2 smile=1", "age=2,smile=1"])
def test_bad_edit_spec_says_what_is_expected(text: str) -> None:
    with pytest.raises(click.BadParameter, match=r"expected NAME=STRENGTH.*e\.g\. age=2"):
        parse_edit_spec(text)


def test_a_direction_twice_in_one_spec_is_refused() -> None:
    with pytest.raises(click.BadParameter, match="age is given twice"):
        parse_edit_spec("age=1+smile=1+age=2")


@pytest.mark.parametrize("edit_set, label", [
    ([("age", 2.0)], "age+2"),
    ([("age", -4.0)], "age-4"),
    ([("age", 0.0)], "age+0"),
    ([("age", -0.0)], "age+0"),
    ([("age", 1.5)], "age+1.5"),
    ([("age", 2.0), ("smile", 1.0)], "age+2_smile+1"),
    ([("sefa:3", 1.5)], "sefa3+1.5"),
    ([("/data/dirs/my age.npy", 2.0)], "my-age+2"),
    ([("dirs/age.pt", -1.0)], "age-1"),
    ([("a/..", 1.0)], "edit+1"),
    ([("age", 1234567.0)], "age+1234567.0"),  # %g would round it, and two strengths would share a name
])
def test_output_label_is_short_and_filesystem_safe(edit_set: list, label: str) -> None:
    assert output_label(edit_set) == label


def test_one_output_is_out_and_several_go_beside_it() -> None:
    assert output_paths("out/clip.mp4", [[("age", 2.0)]]) == [("age+2", Path("out/clip.mp4"))]
    assert output_paths("out/clip.mp4", parse_edit_spec("age=-2,2+smile=1")) == [
        ("age-2_smile+1", Path("out/clip.age-2_smile+1.mp4")), ("age+2_smile+1", Path("out/clip.age+2_smile+1.mp4"))]


def test_labels_that_would_clash_are_made_unique() -> None:
    edit_sets = [[("age", 2.0)], [("dirs/age.npy", 2.0)], [("AGE", 2.0)]]
    assert [label for label, _ in output_paths("clip.mp4", edit_sets)] == ["age+2", "age+2_v2", "AGE+2_v3"]


def test_the_same_edit_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="asked for twice"):
        output_paths("clip.mp4", [[("age", 2.0), ("smile", 1.0)], [("smile", 1.0), ("age", 2.0)]])
    with pytest.raises(ValueError, match="at least one edit"):
        output_paths("clip.mp4", [])


def test_no_output_may_be_the_source(tmp_path: Path) -> None:
    source = tmp_path / "clip.age+2.mp4"
    source.write_bytes(b"video")
    with pytest.raises(InputError, match="overwrite its source"):
        check_outputs(str(source), tmp_path / "clip.mp4", [[("age", -2.0)], [("age", 2.0)]])
    # With several outputs --out itself is not written, so it may name the source.
    outputs = check_outputs(str(source), source, [[("age", -2.0)], [("age", 4.0)]])
    assert [path.name for _, path in outputs] == ["clip.age+2.age-2.mp4", "clip.age+2.age+4.mp4"]
    with pytest.raises(InputError, match="overwrite its source"):
        check_outputs(str(source), source, [[("age", 2.0)]])
    with pytest.raises(InputError, match="file extension"):
        check_outputs(str(source), tmp_path / "clip", [[("age", -2.0)], [("age", 2.0)]])


def test_ablations_become_settings_and_an_explicit_set_wins() -> None:
    assert run_overrides(("no-e4e", "no-pti"), []) == {"encoding": {"method": "optimization"},
                                                       "pti": {"method": "none"}}
    assert run_overrides(("no-stitching",), [("blending", "method", "poisson"), ("stitching", "steps", "5")]) == {
        "stitching": {"method": "none", "steps": "5"}, "blending": {"method": "poisson"}}
    assert run_overrides(("poisson", "poisson"), []) == ABLATIONS["poisson"]
    with pytest.raises(click.UsageError, match="no-stitching and --ablation poisson both set blending.method"):
        run_overrides(("no-stitching", "poisson"), [])


def test_every_run_command_takes_a_preset_and_the_config_file_records_it(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from flows.cli import main
    from stitchtime_core.config import run_config
    from tasks.outputs import write_config

    for command in ("edit", "batch", "ablate"):
        assert "--preset [paper|stit-code]" in CliRunner().invoke(main, [command, "--help"]).output
    refused = CliRunner().invoke(main, ["edit", "x.mp4", "--edit", "age=1", "--out", "y.mp4", "--preset", "stit"])
    assert refused.exit_code == 2 and "'stit' is not one of 'paper', 'stit-code'" in refused.output
    path = tmp_path / "run.config.json"
    write_config(path, "tiny", "preview", "stit-code", run_config("tiny", "preview", preset="stit-code"), [])
    written = json.loads(path.read_text())
    assert written["preset"] == "stit-code" and written["stitching"]["loss"] == "l2"


def test_a_placement_names_placeable_stages_and_flow_slash_deployment() -> None:
    from tasks import stages

    assert PLACEABLE_STAGES == tuple(stages.PLACEABLE)  # the CLI reads the names without importing the stages
    assert parse_placement(" encode=run-stage/gpu , pti=run-stage/big-gpu") == {"encode": "run-stage/gpu",
                                                                               "pti": "run-stage/big-gpu"}
    assert parse_placement("") == parse_placement(None) == {}
    for text, problem in [("pti", "placement 'pti': expected STAGE=DEPLOYMENT"),
                          ("pti=", "placement 'pti=': expected STAGE=DEPLOYMENT"),
                          ("render=run-stage/gpu", "stage 'render' cannot be placed; choose one of encode, pti"),
                          ("pti=gpu", "placement 'pti=gpu': a deployment is named FLOW/DEPLOYMENT"),
                          ("pti=a/b/c", "placement 'pti=a/b/c': a deployment is named FLOW/DEPLOYMENT (e.g. "
                                        "stitch-chunk/gpu), got 'a/b/c'"),
                          ("pti=/gpu", "got '/gpu'"), ("pti=run-stage/", "got 'run-stage/'")]:
        with pytest.raises(ValueError) as raised:
            parse_placement(text)
        assert problem in str(raised.value)


def test_ablate_refuses_a_second_edit_rather_than_dropping_one() -> None:
    from click.testing import CliRunner

    from flows.cli import main

    for edits in (["age=1", "smile=1"], ["age=1,2"]):
        refused = CliRunner().invoke(main, ["ablate", "x.mp4", *(f"--edit={edit}" for edit in edits)])
        assert refused.exit_code == 2 and "give one edit (one strength per direction)" in refused.output


@pytest.mark.parametrize("out, problem", [
    ("", "--out: the output path is empty"),
    (".mp4", ".mp4: output needs a name before its extension (e.g. clip.mp4)"),
    ("edited", "edited: output needs a file extension (e.g. .mp4)"),
])
def test_an_output_name_without_a_name_or_an_extension_is_named_as_such(out: str, problem: str,
                                                                         tmp_path: Path) -> None:
    source = tmp_path / "clip.mp4"
    source.write_bytes(b"not read")
    with pytest.raises(InputError) as raised:
        check_outputs(str(source), out, [[("age", 2.0)]])
    assert str(raised.value) == problem


def test_a_bad_profile_from_the_environment_names_the_variable() -> None:
    from click.testing import CliRunner

    from flows.cli import main

    args = ["edit", "x.mp4", "--edit", "age=1", "--out", "y.mp4"]
    refused = CliRunner(env={"STITCHTIME_PROFILE": "bogus"}).invoke(main, args)
    assert refused.exit_code == 2
    assert refused.output.splitlines()[-1] == "Error: $STITCHTIME_PROFILE=bogus: 'bogus' is not one of 'mobile', " \
                                              "'ffhq', 'tiny'."
    refused = CliRunner(env={"STITCHTIME_PROFILE": "bogus"}).invoke(main, [*args, "--profile", "bogos"])
    assert refused.output.splitlines()[-1] == "Error: Invalid value for '--profile': 'bogos' is not one of " \
                                              "'mobile', 'ffhq', 'tiny'."


def test_report_of_a_file_that_is_no_summary_says_what_is_wrong(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flows.cli import main

    (tmp_path / "bad.summary.json").write_text("{bad")
    (tmp_path / "empty.summary.json").write_text("{}")
    for name, reason in [("bad", "Invalid JSON: key must be a string at line 1 column 2"),
                         ("empty", "input: Field required")]:
        refused = CliRunner().invoke(main, ["report", str(tmp_path / f"{name}.summary.json")])
        assert refused.exit_code == 1
        assert refused.output.splitlines() == [f"Error: {tmp_path / name}.summary.json: not a stitchtime run summary "
                                               f"({reason})"]
