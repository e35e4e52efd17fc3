"""The stage tasks' own behaviour, their code called without Prefect (``stages.call``) on a short real clip:
the ablation settings change what they say, PTI resumes from its checkpoint, render blends each way, the sampler
keys the crops and the paste-back."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from stitchtime_core.config import (BlendingConfig, EditingConfig, OutputConfig, RunConfig, StitchingConfig,
                                    with_overrides, ABLATIONS)
from stitchtime_core.config import profile_defaults
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.tensors import tensor_to_images
from stitchtime_core.video import iter_frames, probe
from stage_runs import stitch_here
from tasks import stages
from tasks.store import open_store

TINY = stages.Runtime("tiny")
"""The tiny profile on the CPU."""
FAST = {"pti": {"observations_per_frame": "2", "batch_size": "4", "checkpoint_every": "2"},
        "stitching": {"steps": "3"}, "encoding": {"projection_steps": "5"}}
EDIT = EditingConfig(edits=(("age", 2.0),))


@dataclasses.dataclass
class Upstream:
    store_uri: str
    source: str
    config: RunConfig
    probe: stages.StageRef
    align: stages.StageRef
    pivots: stages.StageRef
    pti: stages.StageRef
    edit: stages.StageRef


def _stitch(up: Upstream, config: StitchingConfig, pti: stages.StageRef | None = None) -> stages.StageRef:
    edit = up.edit if pti is None else stages.call(stages.edit_pivots, up.store_uri, up.pivots, EDIT, TINY)
    return stitch_here(up.store_uri, up.align, pti or up.pti, edit, config, TINY, chunk_size=4)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    folder = tmp_path_factory.mktemp("stages")
    source = str(folder / "clip.mp4")
    make_sample_clip(source, seconds=0.4, fps=Fraction(25), size=(192, 192))  # 10 frames
    config = with_overrides(profile_defaults("tiny"), FAST)
    store_uri = str(folder / "store")
    p = stages.call(stages.probe_video, store_uri, source)
    landmarks = stages.call(stages.detect_landmarks, store_uri, source, p, config.alignment)
    align = stages.call(stages.align_faces, store_uri, source, p, landmarks, config.alignment, 64)
    pivots = stages.call(stages.encode_pivots, store_uri, align, config.encoding, TINY)
    pti = stages.call(stages.tune_pti, store_uri, align, pivots, config.pti, TINY)
    edit = stages.call(stages.edit_pivots, store_uri, pivots, EDIT, TINY)
    return Upstream(store_uri, source, config, p, align, pivots, pti, edit)


def _chunks(up: Upstream, stitch: stages.StageRef) -> dict[str, torch.Tensor]:
    store = open_store(up.store_uri)
    parts = [store.get_tensors(k) for k in stitch.info["chunks"]]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def test_optimisation_pivots_are_w_codes_unlike_e4e(up: Upstream) -> None:
    config = with_overrides(up.config, ABLATIONS["no-e4e"]).encoding
    projected = stages.call(stages.encode_pivots, up.store_uri, up.align, config, TINY)
    store = open_store(up.store_uri)
    w = store.get_tensors(f"{projected.key}/pivots.safetensors")["pivots"]
    e4e = store.get_tensors(f"{up.pivots.key}/pivots.safetensors")["pivots"]
    assert projected.info["method"] == "optimization" and up.pivots.info["method"] == "e4e"
    assert w.shape == e4e.shape == (10, 10, 64)
    assert torch.equal(w, w[:, :1].expand_as(w))  # one w for all layers, as PTI's W projector
    assert not torch.equal(e4e, e4e[:, :1].expand_as(e4e))


def test_no_pti_keeps_the_original_generator(up: Upstream) -> None:
    no_pti = stages.call(stages.tune_pti, up.store_uri, up.align, up.pivots,
                         dataclasses.replace(up.config.pti, method="none"), TINY)
    assert no_pti.info == {"method": "none", "steps": 0}
    assert not open_store(up.store_uri).exists(f"{no_pti.key}/generator.safetensors")
    raw = dataclasses.replace(up.config.stitching, method="none")
    with_original, with_pti = _chunks(up, _stitch(up, raw, no_pti)), _chunks(up, _stitch(up, raw))
    models = TINY.networks
    latents = open_store(up.store_uri).get_tensors(f"{up.edit.key}/latents.safetensors")["latents"]
    with torch.no_grad():
        original = models.generator.synthesis(latents, noise_mode="const")
    expected = torch.from_numpy(tensor_to_images(original))
    assert (with_original["stitched"].int() - expected.int()).abs().max() <= 1  # rounding only
    assert (with_pti["stitched"].int() - expected.int()).abs().float().mean() > 5


def test_no_stitching_keeps_the_raw_edit_and_tuning_lowers_the_boundary_error(up: Upstream) -> None:
    raw = _stitch(up, dataclasses.replace(up.config.stitching, method="none"))
    tuned = _stitch(up, up.config.stitching)
    raw_chunks, tuned_chunks = _chunks(up, raw), _chunks(up, tuned)
    assert raw_chunks["steps"].tolist() == [0] * 10 and tuned_chunks["steps"].tolist() == [3] * 10
    assert raw.info["boundary_error_after"] == pytest.approx(raw.info["boundary_error_before"])
    assert tuned.info["boundary_error_after"] < raw.info["boundary_error_before"]
    assert raw.info["masks"] == tuned.info["masks"] == "landmarks"
    # m inside m^d = m + boundary; both stored for the blending methods.
    m, md = raw_chunks["masks"], raw_chunks["paste_masks"]
    assert ((md >= m).all() and (md.sum() > m.sum()) and m.sum() > 0).item()


def test_each_blending_method_pastes_its_own_way(up: Upstream, tmp_path: Path) -> None:
    stitch = _stitch(up, up.config.stitching)
    frames = {}
    for method in ("feather", "mask", "poisson"):
        out = str(tmp_path / f"{method}.mp4")
        blending = BlendingConfig(method=method)
        stages.call(stages.render_output, up.store_uri, up.source, up.probe, up.align, stitch, blending,
                    OutputConfig(crf=0, preset="ultrafast", pix_fmt="yuv444p"), out,
                    sampler=up.config.alignment.sampler)
        frames[method] = np.stack(list(iter_frames(out, probe(out)))).astype(int)
    source = np.stack(list(iter_frames(up.source, probe(up.source)))).astype(int)
    changed = {name: (np.abs(f - source).max(axis=-1) > 3).mean() for name, f in frames.items()}
    # The hard mask pastes inside m only, the feathered paste reaches out over the boundary ring.
    assert 0 < changed["mask"] < changed["feather"]
    assert np.abs(frames["poisson"] - frames["mask"]).mean() > 0.5
    assert np.abs(frames["feather"] - frames["mask"]).mean() > 0.5


def test_the_sampler_keys_the_crops_and_the_paste_back(up: Upstream, tmp_path: Path) -> None:
    # alignment.sampler makes the crops (align) and warps them back (render): a change re-runs both.
    pil = dataclasses.replace(up.config.alignment, sampler="pil")
    assert up.config.alignment.sampler == "opencv"
    landmarks = stages.call(stages.detect_landmarks, up.store_uri, up.source, up.probe, pil)
    align = stages.call(stages.align_faces, up.store_uri, up.source, up.probe, landmarks, pil, 64)
    assert landmarks.reused and not align.reused and align.key != up.align.key
    stitch = _stitch(up, up.config.stitching)
    output = OutputConfig(crf=0, preset="ultrafast", pix_fmt="yuv444p")
    frames, keys = {}, {}
    for sampler in ("opencv", "pil"):
        out = str(tmp_path / f"{sampler}.mp4")
        render = stages.call(stages.render_output, up.store_uri, up.source, up.probe, up.align, stitch,
                             up.config.blending, output, out, sampler=sampler)
        if render.reused:  # the blending test may have rendered this one
            stages.call(stages.deliver_output, up.store_uri, render, out)
        keys[sampler] = render.key
        frames[sampler] = np.stack(list(iter_frames(out, probe(out)))).astype(int)
    assert keys["pil"] != keys["opencv"]
    difference = np.abs(frames["pil"] - frames["opencv"])
    # Truncated against rounded, in the pasted region only.
    assert 0 < difference.mean() < 0.5 and difference.max() <= 12


class _Killed(Exception):
    pass


def _pti_inputs_in_a_store_of_their_own(up: Upstream, folder: Path) -> str:
    store_uri = str(folder / "store")
    store, source_store = open_store(store_uri), open_store(up.store_uri)
    for ref in (up.align, up.pivots):
        for key in source_store.list(ref.key):
            store.put_bytes(key, source_store.get_bytes(key))
    return store_uri


def _same_generator(up: Upstream, store_uri: str, pti: stages.StageRef) -> bool:
    a = open_store(store_uri).get_tensors(f"{pti.key}/generator.safetensors")
    b = open_store(up.store_uri).get_tensors(f"{up.pti.key}/generator.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_pti_stage_resumes_from_its_checkpoint(up: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_uri = _pti_inputs_in_a_store_of_their_own(up, tmp_path)
    real = stages.pti.tune_generator

    def killed_after_first_checkpoint(*args, checkpoint, **kwargs):
        def save_then_die(state):
            checkpoint(state)
            raise _Killed

        return real(*args, checkpoint=save_then_die, **kwargs)

    monkeypatch.setattr(stages.pti, "tune_generator", killed_after_first_checkpoint)
    with pytest.raises(_Killed):
        stages.call(stages.tune_pti, store_uri, up.align, up.pivots, up.config.pti, TINY)
    monkeypatch.setattr(stages.pti, "tune_generator", real)
    resumed = stages.call(stages.tune_pti, store_uri, up.align, up.pivots, up.config.pti, TINY)
    assert resumed.key == up.pti.key and not resumed.reused
    assert resumed.info["resumed_from_step"] == 2 and up.pti.info["resumed_from_step"] == 0
    assert resumed.info["last_loss"] == up.pti.info["last_loss"] and _same_generator(up, store_uri, resumed)
    # Deleted once the generator is written.
    assert not open_store(store_uri).exists(f"{resumed.key}/checkpoint.safetensors")


def test_a_short_pti_is_checkpointed_by_time_and_a_killed_run_resumes_there(
        up: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 steps, far fewer than the step interval: only the time interval checkpoints before the end.
    config = dataclasses.replace(up.config.pti, checkpoint_every=100, checkpoint_seconds=25)
    assert stages.pti.pti_steps(10, config) == 5
    store_uri = _pti_inputs_in_a_store_of_their_own(up, tmp_path)
    real = stages.pti.tune_generator
    saved = []

    def ten_seconds_a_step_killed_after_a_checkpoint(*args, progress, checkpoint, **kwargs):
        now = [0.0]

        def step(*progress_args):
            now[0] += 10
            progress(*progress_args)

        def save_then_die(state):
            checkpoint(state)
            saved.append(state.step)
            raise _Killed

        return real(*args, progress=step, checkpoint=save_then_die, clock=lambda: now[0], **kwargs)

    monkeypatch.setattr(stages.pti, "tune_generator", ten_seconds_a_step_killed_after_a_checkpoint)
    with pytest.raises(_Killed):
        stages.call(stages.tune_pti, store_uri, up.align, up.pivots, config, TINY)
    assert saved == [3]  # 30 s in
    monkeypatch.setattr(stages.pti, "tune_generator", real)
    resumed = stages.call(stages.tune_pti, store_uri, up.align, up.pivots, config, TINY)
    assert resumed.key == up.pti.key and resumed.info["resumed_from_step"] == 3 and resumed.info["steps"] == 5
    assert resumed.info["last_loss"] == up.pti.info["last_loss"] and _same_generator(up, store_uri, resumed)
    assert not open_store(store_uri).exists(f"{resumed.key}/checkpoint.safetensors")


def test_the_checkpoint_intervals_are_not_part_of_the_pti_key(up: Upstream) -> None:
    for changed in ({"checkpoint_every": 7}, {"checkpoint_seconds": 0.5}, {"checkpoint_seconds": 0}):
        again = stages.call(stages.tune_pti, up.store_uri, up.align, up.pivots,
                            dataclasses.replace(up.config.pti, **changed), TINY)
        assert again.reused and again.key == up.pti.key


def test_with_warm_starts_the_chunk_size_is_part_of_the_stitch_key(up: Upstream) -> None:
    # A warm-started frame goes on from its neighbour in the same chunk: other chunks, another result.
    config = up.config.stitching
    assert config.warm_start > 0
    warm = {size: stages.call(stages.plan_stitch, up.store_uri, up.align, up.pti, up.edit, config, TINY, size).key
            for size in (4, 5)}
    cold = {size: stages.call(stages.plan_stitch, up.store_uri, up.align, up.pti, up.edit,
                              dataclasses.replace(config, warm_start=0), TINY, size).key for size in (4, 5)}
    assert warm[4] != warm[5] and cold[4] == cold[5] and cold[4] not in warm.values()
