"""benchmarks/gpu_check.sh run as its CPU dry run (64 px, tiny layout), so the one call a lent GPU gets does not
fail on the script itself; benchmarks/gpu_report.py turns its JSON into the README's tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_report  # noqa: E402


def run_check(tmp_path: Path, **env: str) -> dict:
    out = tmp_path / "gpu-check.json"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable,
                                 "GPU_CHECK_OUT": str(out), **env}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wrote {out}" in result.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_check(tmp_path_factory.mktemp("check"), GPU_CHECK_OPTIONS="fp32 channels-last",
                     GPU_CHECK_SKIP="pipeline")


def test_every_part_runs_or_says_why_not(check: dict) -> None:
    parts = check["parts"]
    assert list(parts) == ["tests", "method-64-fp32", "generator-fp32", "method-64-channels-last",
                           "generator-channels-last", "reference-cuda-ops", "pipeline"]
    for name in ("tests", "method-64-fp32", "generator-fp32", "method-64-channels-last", "generator-channels-last"):
        assert parts[name]["status"] == "ok", parts[name]["log"]
        assert parts[name]["exit_code"] == 0
    assert parts["reference-cuda-ops"]["status"] == "skipped: no CUDA device"
    assert parts["pipeline"]["status"] in ("skipped: GPU_CHECK_SKIP", "skipped: no ffmpeg binary",
                                           "skipped: Prefect is not installed")
    assert check["device"] == "cpu" and check["machine"]["cores"] == os.cpu_count()


def test_the_methods_end_at_the_same_boundary_error(check: dict) -> None:
    fp32 = check["parts"]["method-64-fp32"]["result"]
    stitch = {run["method"]: run for run in fp32["runs"] if run["part"] == "stitch" and run["frames"] == 2}
    loop = "reference" if "reference" in stitch else "naive"  # the reference where .whl/ holds its source
    assert set(stitch) == {"ours", "ours-batch1", loop}
    for run in stitch.values():
        assert run["boundary_error_after"] == pytest.approx(stitch[loop]["boundary_error_after"], abs=1e-3)
        assert run["boundary_error_after"] < run["boundary_error_before"]
    [summary] = fp32["summary"]
    assert summary["stitch_speedup"][f"{loop}/ours"] > 0
    assert summary["pti_memory_by_frames"]["frames"] == [2, 4]
    [run] = check["parts"]["method-64-channels-last"]["result"]["runs"][:1]
    assert run["channels_last"] and run["method"] == "ours"


def test_the_report_tables_every_run(check: dict) -> None:
    text = gpu_report.report(check)
    stitch = [run for run in check["parts"]["method-64-fp32"]["result"]["runs"] if run["part"] == "stitch"]
    for run in stitch:
        assert f"| 64 | {run['method']} | fp32 | {run['frames']} | {run['batch']} | 2 | {run['seconds_per_frame']} |" \
            in text
    generator = check["parts"]["generator-channels-last"]["result"]["runs"]
    assert f"| 64 | fp32+channels_last | 2 | {generator[0]['forward_seconds_per_image']} |" in text
    assert "| reference-cuda-ops | skipped: no CUDA device | 0 |  |" in text
    assert "Speed-ups" in text and "Peak memory as the clip grows" in text


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    check = run_check(tmp_path, GPU_CHECK_OPTIONS="fp32", GPU_CHECK_SIZES="48", GPU_CHECK_SKIP="tests pipeline")
    method, generator = check["parts"]["method-48-fp32"], check["parts"]["generator-fp32"]
    assert method["status"] == "failed" and method["exit_code"] == 1
    assert generator["status"] == "failed"  # ran although the part before it failed
    assert check["parts"]["tests"]["status"] == "skipped: GPU_CHECK_SKIP"
    # Each benchmark still wrote its report, every measurement in it failed with its own error.
    for part in (method, generator):
        runs = part["result"]["runs"]
        assert len(runs) >= 2 and all("power of two >= 4, got 48" in run["failed"] for run in runs)
    text = gpu_report.report(check)
    assert "| method-48-fp32 | failed | " in text and "some measurements failed" in text
    assert "| method-48-fp32 | part stitch, size 48, method ours, frames 2, batch 2 | ValueError: img_resolution " \
        "must be a power of two >= 4, got 48 |" in text
    assert "Stitching tuning, per frame" not in text  # no figures where none were measured


def test_the_report_names_a_missing_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(tmp_path / "none.json")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"Error: {tmp_path / 'none.json'}: cannot read the GPU check's JSON" in result.stderr
