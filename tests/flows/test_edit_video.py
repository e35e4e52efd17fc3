"""The whole pipeline through the real CLI, against a real Prefect server and a real S3-protocol server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from stitchtime_core.config import OutputConfig
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import VideoWriter, ffmpeg_binary, iter_frames, probe
from browser import BROWSER, open_in_chromium
from cli_runner import run_cli

# Few steps: the test is about the pipeline's wiring and contracts, not the quality of the edit.
FAST = ["--set", "pti.observations_per_frame=4", "--set", "stitching.steps=3"]
SHARED = ["probe", "landmarks", "align", "encode", "pti"]
"""Stages run once per run, whatever the number of outputs."""
PER_OUTPUT = ["edit", "stitch", "render", "measure"]


def audio_md5(path: Path) -> str:
    result = subprocess.run([ffmpeg_binary(), "-v", "error", "-i", str(path), "-map", "0:a", "-c", "copy",
                             "-f", "md5", "-"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edit")


@pytest.fixture(scope="module")
def clip(workdir: Path) -> Path:
    path = workdir / "clip.mp4"
    make_sample_clip(path, seconds=1.0, size=(192, 192))
    return path


@pytest.fixture(scope="module")
def cli_env(prefect_server: str, workdir: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_server,
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "prefect-results")}


@pytest.fixture(scope="module")
def first_run(clip: Path, cli_env: dict[str, str], workdir: Path) -> dict:
    out = workdir / "out" / "edited.mp4"
    out.parent.mkdir()
    started = time.perf_counter()
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--out", str(out), "--store", str(workdir / "data"),
                      "--json", *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return {"out": out, "summary": json.loads(result.stdout), "seconds": time.perf_counter() - started,
            "stderr": result.stderr}


def test_output_has_source_frames_rate_size_and_audio(clip: Path, first_run: dict) -> None:
    source, edited = probe(clip), probe(first_run["out"])
    assert edited.frame_count == source.frame_count == 25
    assert edited.fps == source.fps == Fraction(25)
    assert (edited.width, edited.height) == (source.width, source.height)
    assert edited.has_audio
    assert audio_md5(first_run["out"]) == audio_md5(clip)


def test_face_is_edited_and_the_rest_of_the_frame_is_kept(clip: Path, first_run: dict) -> None:
    src = np.stack(list(iter_frames(clip))).astype(np.float32)
    out = np.stack(list(iter_frames(first_run["out"]))).astype(np.float32)
    diff = np.abs(src - out).mean(axis=(0, 3))  # [H, W] over frames and channels
    # The face sits in the middle of the sample clip; the corners are background.
    h, w = diff.shape
    face = diff[int(0.35 * h):int(0.65 * h), int(0.35 * w):int(0.65 * w)].mean()
    corners = np.mean([diff[:20, :20].mean(), diff[:20, -20:].mean(), diff[-20:, :20].mean(), diff[-20:, -20:].mean()])
    # The corners only carry re-encoding loss (crf 18 twice: about 2 grey levels).
    assert corners < 3.0, f"background changed (mean abs diff {corners:.2f})"
    assert face > 5 * corners, f"face region barely changed (mean abs diff {face:.2f}, corners {corners:.2f})"


def test_summary_and_config_are_written_beside_the_output(first_run: dict, clip: Path, workdir: Path) -> None:
    out = first_run["out"]
    summary = json.loads(out.with_name("edited.summary.json").read_text())
    assert summary == first_run["summary"]
    assert summary["input"] == str(clip.resolve())
    assert summary["profile"] == "tiny" and summary["frames"] == 25 and summary["fps"] == "25/1"
    assert summary["ablations"] == []
    # The tiny profile's own steps and rates, and --set's (the preset is the paper's).
    assert summary["preset"] == "paper"
    assert summary["differs_from_preset"] == {
        "encoding": {"projection_steps": 100, "projection_lr": 0.02},
        "pti": {"lr": 0.01, "observations_per_frame": 4, "batch_size": 4}, "stitching": {"steps": 3}}
    assert summary["methods"] == {"encoding": "e4e", "pti": "pti", "stitching": "tuning", "blending": "feather"}
    assert set(summary["seconds"]) == set(SHARED) == set(summary["artifacts"])  # JSON keys come sorted
    assert summary["reused_stages"] == []
    [output] = summary["outputs"]
    assert output["edits"] == [{"direction": "age", "strength": 2.0}] and output["label"] == "age+2"
    assert output["output"] == summary["output"] == str(out.resolve())
    assert set(output["seconds"]) == set(PER_OUTPUT) == set(output["artifacts"]) and output["reused_stages"] == []
    assert output["stitching"] == summary["stitching"]
    assert summary["stitching"]["boundary_error_after"] < summary["stitching"]["boundary_error_before"]
    for stage, key in [*summary["artifacts"].items(), *output["artifacts"].items()]:
        assert key.startswith(f"{stage}/")
        assert (workdir / "data" / key / "done.json").is_file()
    config = json.loads(out.with_name("edited.config.json").read_text())
    assert config["pti"]["observations_per_frame"] == 4 and config["stitching"]["steps"] == 3
    assert config["stitching"]["lambda_m"] == 0.01 and config["pti"]["lambda_l2"] == 10.0
    assert config["editing"] == [{"edits": [["age", 2.0]], "halve_files": "equal-rows"}]  # one entry per output


def test_identity_metrics_and_the_report_come_with_the_output(first_run: dict, clip: Path, cli_env: dict[str, str],
                                                              workdir: Path, tmp_path: Path) -> None:
    summary, out = first_run["summary"], first_run["out"]
    identity = summary["identity"]
    assert identity == summary["outputs"][0]["identity"]
    assert identity["network"] == "dlib_face_recognition_resnet_model_v1"
    assert identity["frames"] == identity["frames_with_face"] == 25 and identity["tg_pairs"] == 25 * 24 // 2
    # The run measures as `stitchtime metrics` does on the two files: the same quads, the same numbers.
    result = run_cli(["metrics", str(out), str(clip), "--json"], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["tl_id"] == pytest.approx(identity["tl_id"], abs=1e-6)
    assert measured["tg_id"] == pytest.approx(identity["tg_id"], abs=1e-6)

    report = out.with_name("edited.report.html")
    assert summary["report"] == summary["outputs"][0]["report"] == str(report.resolve())
    page = report.read_text()
    assert f"{identity['tl_id']:.4f}" in page and f"{identity['tg_id']:.4f}" in page
    assert f"{summary['stitching']['boundary_error_after']:.4f}" in page
    if BROWSER is not None:  # 4 keyframes of 5 images each, and the similarity plot's two lines
        attributes = open_in_chromium(report, tmp_path)
        assert attributes["images"] == attributes["loaded"] == "20"
        assert len(attributes["line-widths"].split()) == 2 and float(attributes["svg-width"]) > 0

    # On the Prefect server: the report as a markdown artifact, and each long stage's progress at 100 %.
    artifacts = _artifacts(cli_env["PREFECT_API_URL"], summary["flow_run_id"])
    [markdown] = [a for a in artifacts if a.type == "markdown"]
    assert markdown.key == "report-age-2" and f"| TL-ID | {identity['tl_id']:.4f} |" in markdown.data
    progress = {a.key.split("-")[0]: a.data for a in artifacts if a.type == "progress"}
    assert progress == {stage: 100.0 for stage in ("landmarks", "align", "encode", "pti", "stitch", "render")}

    # `stitchtime report` writes it again from the summary and the store, unchanged.
    report.unlink()
    result = run_cli(["report", str(out)], env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {report.resolve()}" and report.read_text() == page
    # It runs no network: the same summary said to be of the ffhq profile, whose files are nowhere, reports too.
    elsewhere = json.loads(out.with_name("edited.summary.json").read_text())
    elsewhere["profile"] = "ffhq"
    elsewhere["outputs"][0]["output"] = str(tmp_path / "elsewhere.mp4")
    (tmp_path / "elsewhere.summary.json").write_text(json.dumps(elsewhere))
    result = run_cli(["report", str(tmp_path / "elsewhere.summary.json")],
                     env={**cli_env, "STITCHTIME_MODELS": str(tmp_path / "no-models")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "<img" in (tmp_path / "elsewhere.report.html").read_text()


def test_second_identical_run_reuses_every_stage(first_run: dict, clip: Path, cli_env: dict[str, str],
                                                 workdir: Path) -> None:
    out = workdir / "out" / "again.mp4"
    started = time.perf_counter()
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--out", str(out), "--store", str(workdir / "data"),
                      "--json", *FAST], env=cli_env, cwd=workdir)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["reused_stages"] == SHARED + [f"{stage}[age+2]" for stage in PER_OUTPUT]
    assert summary["outputs"][0]["reused_stages"] == PER_OUTPUT
    assert summary["artifacts"] == first_run["summary"]["artifacts"]
    assert summary["outputs"][0]["artifacts"] == first_run["summary"]["outputs"][0]["artifacts"]
    assert out.read_bytes() == first_run["out"].read_bytes()
    # Work dropped to nothing: what is left is process start-up and reading small artifacts.
    assert summary["total_seconds"] < 0.2 * first_run["summary"]["total_seconds"]
    assert seconds < first_run["seconds"]
    # On the Prefect server: one task run per stage, each ending Cached (its done.json was in the store),
    # then the delivery of the stored output and its report; no Prefect result record anywhere in the store.
    runs = _task_runs(cli_env["PREFECT_API_URL"], summary["flow_run_id"])
    assert sorted(_task_name(run) for run in runs) == sorted(SHARED + PER_OUTPUT + ["deliver", "report"])
    assert {_task_name(run): run.state.name for run in runs} == {**{stage: "Cached" for stage in SHARED + PER_OUTPUT},
                                                                  "deliver": "Completed", "report": "Completed"}
    assert not list((workdir / "data").rglob("prefect-result*"))


def test_ablate_runs_every_variant_reusing_the_stages_they_share(first_run: dict, clip: Path,
                                                                cli_env: dict[str, str], workdir: Path) -> None:
    out_dir = workdir / "ablation"
    result = run_cli(["ablate", str(clip), "--edit", "age=2", "--out-dir", str(out_dir), "--store",
                      str(workdir / "data"), "--json", *FAST, "--set", "encoding.projection_steps=5"],
                     env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table == json.loads((out_dir / "clip.ablation.json").read_text())
    rows = {row["variant"]: row for row in table["rows"]}
    assert list(rows) == ["full", "no-e4e", "no-pti", "no-stitching", "poisson"]
    reused = {variant: json.loads(Path(row["summary"]).read_text())["reused_stages"] for variant, row in rows.items()}
    per_output = lambda stages: [f"{stage}[age+2]" for stage in stages]  # noqa: E731
    assert reused["full"] == SHARED + per_output(PER_OUTPUT)  # the first run made all of it
    assert reused["no-e4e"] == ["probe", "landmarks", "align"]
    assert reused["no-pti"] == ["probe", "landmarks", "align", "encode"] + per_output(["edit"])
    assert reused["no-stitching"] == SHARED + per_output(["edit"])
    assert reused["poisson"] == SHARED + per_output(["edit", "stitch"])  # no-stitching's untuned crops
    # The full method's numbers are the first run's; seconds count every stage as it was made.
    full = first_run["summary"]["outputs"][0]
    assert rows["full"]["tl_id"] == full["identity"]["tl_id"]
    assert rows["full"]["boundary_error"] == full["stitching"]["boundary_error_after"]
    assert rows["full"]["seconds"] == pytest.approx(full["made_seconds"], abs=0.01)
    # Without stitching tuning the boundary error stays the raw edit's; tuning lowers it.
    assert rows["no-stitching"]["boundary_error"] == rows["poisson"]["boundary_error"] == \
        full["stitching"]["boundary_error_before"] > rows["full"]["boundary_error"]
    page = Path(rows["full"]["report"]).read_text()
    assert "Ablation" in page and all(variant in page for variant in rows)
    assert all(Path(row["output"]).is_file() and Path(row["report"]).is_file() for row in rows.values())


def test_a_stage_whose_artifacts_were_deleted_is_made_again(first_run: dict, clip: Path, cli_env: dict[str, str],
                                                            workdir: Path) -> None:
    # Prefect's record of the PTI stage goes with its folder; a record left without its done.json
    # (artifacts removed one by one, e.g. by an expiry rule) is not a cache hit either.
    pti = workdir / "data" / first_run["summary"]["artifacts"]["pti"]
    encode = workdir / "data" / first_run["summary"]["artifacts"]["encode"]
    shutil.rmtree(pti)
    (encode / "done.json").unlink()
    out = workdir / "out" / "remade.mp4"
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--out", str(out), "--store", str(workdir / "data"),
                      "--json", *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["reused_stages"] == ["probe", "landmarks", "align"] + [f"{stage}[age+2]" for stage in PER_OUTPUT]
    runs = {_task_name(run): run.state.name for run in _task_runs(cli_env["PREFECT_API_URL"], summary["flow_run_id"])}
    assert runs["encode"] == runs["pti"] == "Completed" and runs["align"] == runs["render"] == "Cached"
    assert (pti / "done.json").is_file() and (encode / "done.json").is_file()
    assert out.read_bytes() == first_run["out"].read_bytes()


def _task_name(run) -> str:  # noqa: ANN001 - a Prefect TaskRun
    return run.name.rsplit("-", 1)[0]


def _artifacts(api_url: str, flow_run_id: str) -> list:
    """The artifacts of one flow run (its task runs' included), read from the Prefect server."""
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list:
        async with PrefectClient(api_url) as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def _task_runs(api_url: str, flow_run_id: str) -> list:
    """The task runs of one flow run, read from the Prefect server."""
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list:
        async with PrefectClient(api_url) as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_a_changed_setting_reruns_only_the_stages_it_affects(first_run: dict, clip: Path, cli_env: dict[str, str],
                                                             workdir: Path) -> None:
    # A direction file ([w_dim] for the tiny generator) instead of a profile name: only the edit and
    # what follows it run again.
    direction = workdir / "direction.npy"
    np.save(direction, np.random.default_rng(0).standard_normal(64).astype(np.float32) * 0.2)
    out = workdir / "out" / "from-file.mp4"
    result = run_cli(["edit", str(clip), "--edit", f"{direction}=1.5", "--out", str(out),
                      "--store", str(workdir / "data"), "--json", *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["reused_stages"] == SHARED
    assert summary["outputs"][0]["edits"] == [{"direction": str(direction), "strength": 1.5}]
    assert summary["outputs"][0]["label"] == "direction+1.5"
    assert probe(out).frame_count == 25


def test_s3_store_gives_the_same_video_as_file_store(first_run: dict, clip: Path, cli_env: dict[str, str],
                                                     workdir: Path, s3_server) -> None:
    out = workdir / "out" / "from-s3.mp4"
    env = {**cli_env, **s3_server.env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    store = f"s3://{s3_server.bucket}/edit-test"
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--out", str(out), "--store", store, "--json", *FAST],
                     env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["store"] == store and summary["reused_stages"] == []
    assert summary["artifacts"] == first_run["summary"]["artifacts"]
    assert summary["outputs"][0]["artifacts"] == first_run["summary"]["outputs"][0]["artifacts"]
    np.testing.assert_array_equal(np.stack(list(iter_frames(out))), np.stack(list(iter_frames(first_run["out"]))))


@pytest.fixture(scope="module")
def strengths_run(clip: Path, cli_env: dict[str, str], workdir: Path) -> dict:
    """Two strengths of one direction in one run, on a store of their own."""
    out = workdir / "strengths" / "clip.mp4"
    out.parent.mkdir()
    result = run_cli(["edit", str(clip), "--edit", "age=-2,2", "--out", str(out),
                      "--store", str(workdir / "strengths-data"), "--json", *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return {"out": out, "summary": json.loads(result.stdout), "stderr": result.stderr}


def _face_region(path: Path) -> np.ndarray:
    frames = np.stack(list(iter_frames(path))).astype(np.float32)  # [N, H, W, 3]
    h, w = frames.shape[1:3]
    return frames[:, int(0.35 * h):int(0.65 * h), int(0.35 * w):int(0.65 * w)]


def test_several_strengths_share_every_stage_up_to_pti(strengths_run: dict, clip: Path, workdir: Path) -> None:
    summary, folder = strengths_run["summary"], strengths_run["out"].parent
    assert [o["label"] for o in summary["outputs"]] == ["age-2", "age+2"]
    assert [o["edits"] for o in summary["outputs"]] == [[{"direction": "age", "strength": -2.0}],
                                                        [{"direction": "age", "strength": 2.0}]]
    paths = [folder / "clip.age-2.mp4", folder / "clip.age+2.mp4"]
    assert [o["output"] for o in summary["outputs"]] == [str(p.resolve()) for p in paths]
    assert "output" not in summary and "stitching" not in summary  # only for a single output
    # --out itself is not written; one summary and one config for the run are, and a report per output.
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["clip.age-2.mp4", "clip.age+2.mp4", "clip.age-2.report.html", "clip.age+2.report.html",
         "clip.summary.json", "clip.config.json"])
    assert json.loads((folder / "clip.summary.json").read_text()) == summary
    config = json.loads((folder / "clip.config.json").read_text())
    assert config["editing"] == [{"edits": [["age", -2.0]], "halve_files": "equal-rows"},
                                 {"edits": [["age", 2.0]], "halve_files": "equal-rows"}]

    # The shared stages ran once: one line each on stderr, one artifact each in the store.
    data = workdir / "strengths-data"
    for stage in SHARED:
        assert [p.name for p in (data / stage).iterdir()] == [summary["artifacts"][stage].split("/")[1]]
        assert sum(line.split()[1:2] == [stage] for line in strengths_run["stderr"].splitlines()) == 1
    for stage in PER_OUTPUT:
        assert len({o["artifacts"][stage] for o in summary["outputs"]}) == 2
        assert len(list((data / stage).iterdir())) == 2

    source, younger, older = _face_region(clip), *(_face_region(p) for p in paths)
    assert probe(paths[0]).frame_count == probe(paths[1]).frame_count == 25
    assert np.abs(younger - older).mean() > 2.0, "the two strengths gave the same face"
    assert np.abs(younger - source).mean() > 2.0 and np.abs(older - source).mean() > 2.0


def test_another_strength_reuses_the_outputs_already_made(strengths_run: dict, clip: Path,
                                                          cli_env: dict[str, str], workdir: Path) -> None:
    out = strengths_run["out"]
    result = run_cli(["edit", str(clip), "--edit", "age=-2,2,4", "--out", str(out),
                      "--store", str(workdir / "strengths-data"), *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.with_name("clip.summary.json").read_text())
    assert summary["reused_stages"] == SHARED + [f"{stage}[{label}]" for label in ("age-2", "age+2")
                                                 for stage in PER_OUTPUT]
    before = strengths_run["summary"]["outputs"]
    assert [o["artifacts"] for o in summary["outputs"][:2]] == [o["artifacts"] for o in before]
    assert [o["reused_stages"] for o in summary["outputs"]] == [PER_OUTPUT, PER_OUTPUT, []]
    # The text output names every video with its scores and report, and the summary.
    paths = [out.with_name(f"clip.{label}.mp4").resolve() for label in ("age-2", "age+2", "age+4")]
    lines = result.stdout.splitlines()
    assert lines[0:6:2] == [f"edited video: {p}" for p in paths]
    for line, output in zip(lines[1:6:2], summary["outputs"]):
        identity = output["identity"]
        assert line == (f"  TL-ID {identity['tl_id']:.4f}, TG-ID {identity['tg_id']:.4f}, similarity to the source "
                        f"{identity['source_similarity']:.4f}; report: "
                        f"{out.with_name('clip.' + output['label'] + '.report.html').resolve()}")
    assert lines[6:] == [f"summary:      {out.with_name('clip.summary.json').resolve()}"]
    assert probe(paths[2]).frame_count == 25


@pytest.mark.parametrize("ablation, methods", [
    ("no-stitching", {"encoding": "e4e", "pti": "pti", "stitching": "none", "blending": "mask"}),
    ("poisson", {"encoding": "e4e", "pti": "pti", "stitching": "none", "blending": "poisson"}),
])
def test_an_ablation_is_recorded_in_the_summary_and_config(ablation: str, methods: dict, first_run: dict, clip: Path,
                                                           cli_env: dict[str, str], workdir: Path) -> None:
    out = workdir / "out" / f"{ablation}.mp4"
    result = run_cli(["edit", str(clip), "--edit", "age=2", "--ablation", ablation, "--out", str(out),
                      "--store", str(workdir / "data"), *FAST], env=cli_env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"ablations:    {ablation}" in result.stdout.splitlines()
    summary = json.loads(out.with_name(f"{ablation}.summary.json").read_text())
    assert summary["ablations"] == [ablation] and summary["methods"] == methods
    assert summary["reused_stages"][:len(SHARED)] == SHARED  # the ablation changes nothing up to PTI
    config = json.loads(out.with_name(f"{ablation}.config.json").read_text())
    assert (config["stitching"]["method"], config["blending"]["method"]) == (methods["stitching"], methods["blending"])
    assert probe(out).frame_count == 25


@pytest.mark.parametrize("args, message", [
    (["--edit", "age"], "expected NAME=STRENGTH"),
    (["--edit", "age=2,,4"], "expected NAME=STRENGTH"),
    (["--edit", "age=1+smile=x"], "expected NAME=STRENGTH"),
    (["--edit", "age=1+age=2"], "age is given twice"),
    (["--edit", "age=2", "--edit", "age=-2,2"], "age=2 is asked for twice"),
    (["--edit", "age=2", "--ablation", "no-gan"], "'no-gan' is not one of"),
    (["--edit", "age=2", "--ablation", "no-stitching", "--ablation", "poisson"], "both set blending.method"),
])
def test_bad_edit_or_ablation_is_refused_before_any_work(args: list[str], message: str, clip: Path,
                                                         cli_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(["edit", str(clip), *args, "--out", str(tmp_path / "out.mp4"), "--store", str(tmp_path / "data")],
                     env=cli_env, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def _phone_clip_with_gaps(path: Path, *, hidden: list[int]) -> list[np.ndarray]:
    """A portrait clip stored landscape with a 90° rotation tag, no audio; the face is covered in ``hidden``."""
    from skimage.data import astronaut

    from stitchtime_core.sample_clip import FACE_BOX, camera_matrices, render_frame

    size = (144, 192)  # display width, height: portrait
    photo = astronaut()
    frames = []
    for i, matrix in enumerate(camera_matrices(30, fps=Fraction(25), size=size)):
        frame = render_frame(photo, matrix, size)
        if i in hidden:  # paint over the face: no detector finds it there
            x0, y0, x1, y1 = FACE_BOX
            corners = np.array([[x0, y0, 1], [x1, y1, 1]]) @ matrix.T
            (fx0, fy0), (fx1, fy1) = corners.min(axis=0).astype(int), corners.max(axis=0).astype(int)
            frame[max(fy0, 0):fy1, max(fx0, 0):fx1] = 128
        frames.append(frame)
    with VideoWriter(path, width=size[0], height=size[1], fps=Fraction(25), rotation=90,
                     config=OutputConfig(crf=12)) as writer:
        for frame in frames:
            writer.write(frame)
    return frames


def test_rotated_silent_clip_with_gaps(cli_env: dict[str, str], tmp_path: Path) -> None:
    short, long = [5, 6], list(range(14, 24))
    source = tmp_path / "phone.mp4"
    _phone_clip_with_gaps(source, hidden=short + long)
    src_info = probe(source)
    assert (src_info.rotation, src_info.width, src_info.height, src_info.has_audio) == (90, 144, 192, False)

    out = tmp_path / "phone-edited.mp4"
    result = run_cli(["edit", str(source), "--edit", "age=2", "--out", str(out), "--store", str(tmp_path / "data"),
                      "--json", *FAST], env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["interpolated_frames"] == short
    assert summary["passed_through_frames"] == long
    assert summary["edited_frames"] == 30 - len(long)

    info = probe(out)
    assert (info.rotation, info.width, info.height, info.frame_count, info.has_audio) == (90, 144, 192, 30, False)
    src = np.stack(list(iter_frames(source))).astype(np.float32)
    edited = np.stack(list(iter_frames(out))).astype(np.float32)
    change = np.abs(src - edited).mean(axis=(1, 2, 3))  # per frame
    # Passed-through frames carry only re-encoding loss (crf 18: ~2 grey levels on this small, detailed
    # clip); edited ones, interpolated included, changed far more.
    assert change[long].max() < 3.0, change[long]
    assert change[short].min() > 2 * change[long].max(), change
    assert np.delete(change, long).min() > 2 * change[long].max()


def test_the_chosen_face_is_edited_and_the_other_left_untouched(cli_env: dict[str, str], tmp_path: Path) -> None:
    from skimage.data import astronaut

    # Two real faces: the astronaut (larger, left) and a mirrored 0.8x copy (right), drifting slowly.
    left = astronaut()[0:300, 60:380]
    right = cv2.resize(left[:, ::-1], (256, 240), interpolation=cv2.INTER_AREA)
    scene = np.full((300, 640, 3), (196, 191, 185), np.uint8)
    scene[:, :320], scene[30:270, 352:608] = left, right
    source = tmp_path / "two.mp4"
    with VideoWriter(source, width=640, height=300, fps=Fraction(25), config=OutputConfig(crf=12)) as writer:
        for i in range(12):
            writer.write(cv2.warpAffine(scene, np.float32([[1, 0, i * 0.5], [0, 1, 0]]), (640, 300),
                                        borderMode=cv2.BORDER_REPLICATE))
    out = tmp_path / "two-edited.mp4"
    result = run_cli(["edit", str(source), "--edit", "age=2", "--face", "1", "--out", str(out),
                      "--store", str(tmp_path / "data"), *FAST], env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    diff = np.abs(np.stack(list(iter_frames(source))).astype(np.float32)
                  - np.stack(list(iter_frames(out))).astype(np.float32)).mean(axis=(0, 3))
    chosen, other = diff[90:180, 430:530].mean(), diff[70:170, 110:210].mean()
    assert other < 3.0, f"the face that was not chosen changed ({other:.2f}; re-encoding alone gives ~2)"
    assert chosen > 5 * other, f"chosen face {chosen:.2f}, other face {other:.2f}"
