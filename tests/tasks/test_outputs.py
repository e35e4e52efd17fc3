"""The run summary as a typed model: what a run writes is what the report and `stitchtime report` read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.outputs import SINGLE_OUTPUT_FIELDS, OutputSummary, RunSummary


def _output(label: str) -> dict:
    return {"edits": [{"direction": "age", "strength": 2.0}], "label": label, "output": f"/out/{label}.mp4",
            "seconds": {"edit": 0.1}, "reused_stages": [], "artifacts": {"edit": "edit/abc"}, "made_seconds": 9.5,
            "stitching": {"boundary_error_after": 0.04}, "identity": {"tl_id": 1.0}, "report": f"/out/{label}.html"}


def _summary(outputs: list[dict]) -> dict:
    return {"input": "/in.mp4", "flow_run_id": None, "config": "/out/x.config.json", "profile": "tiny",
            "quality": "preview", "device": "cpu", "store": "file:///data", "ablations": [],
            "methods": {"encoding": "e4e"}, "frames": 10, "fps": "25/1", "size": [64, 64], "has_audio": True,
            "variable_frame_rate": False, "rotation": 0, "edited_frames": 10, "interpolated_frames": [],
            "passed_through_frames": [], "seconds": {"probe": 0.1}, "total_seconds": 12.0, "reused_stages": [],
            "artifacts": {"probe": "probe/abc"}, "pti": {"method": "pti"}, "outputs": outputs}


def test_a_summary_reads_back_as_it_was_written(tmp_path: Path) -> None:
    several = RunSummary.model_validate(_summary([_output("age+2"), _output("age-2")]))
    assert all(name not in several.as_json() for name in SINGLE_OUTPUT_FIELDS)
    path = tmp_path / "x.summary.json"
    path.write_text(json.dumps(several.as_json()))
    assert RunSummary.read(path) == several and isinstance(several.outputs[1], OutputSummary)
    assert several.outputs[1].edits[0].strength == 2.0 and several.fps == "25/1"


def test_a_file_that_is_no_summary_is_refused_naming_what_is_wrong(tmp_path: Path) -> None:
    broken = _summary([_output("age+2")])
    del broken["outputs"][0]["artifacts"]
    path = tmp_path / "x.summary.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"outputs\.0\.artifacts"):
        RunSummary.read(path)
