"""Stitching tuning (paper section 3.4, eqs. 2-4) on real face crops after a short PTI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stitchtime_core import masks
from stitchtime_core.config import StitchingConfig
from stitchtime_core.editing import edit_latents
from stitchtime_core.stitching import boundary_error, masked_distances, stitch_frames, tuning_plan, warm_steps

FRAMES = 3
"""Frames stitched per test: each tunes its own copy, so more frames only cost time."""

STITCH_TEST_CONFIG = StitchingConfig(steps=20, warm_start=0)
"""The paper's learning rate and λ_m, a fifth of its steps, every frame from θ_p."""


@dataclasses.dataclass(frozen=True)
class StitchCase:
    edited_latents: torch.Tensor
    crops: torch.Tensor
    masks: torch.Tensor
    boundaries: torch.Tensor
    edits: torch.Tensor
    """G(w + δw; θ_p): the raw edit."""


def _mean_inside(diff: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-frame mean of |diff| over a [frames, 1, H, W] region."""
    return (diff.abs() * region).sum(dim=(1, 2, 3)) / (3 * region.sum(dim=(1, 2, 3)))


@pytest.fixture(scope="module")
def case(tiny, face_clip, pivots, pti_run) -> StitchCase:
    m, _ = masks.face_masks(face_clip.crop_landmarks[:FRAMES], 64)
    b = masks.boundaries_of(m, border_px_1024=STITCH_TEST_CONFIG.border_px)
    latents = edit_latents(pivots[:FRAMES], [(tiny.directions["age"], 2.0)])
    with torch.no_grad():
        edits = pti_run.result.generator.synthesis(latents, noise_mode="const")
    return StitchCase(latents, face_clip.images[:FRAMES], torch.from_numpy(m).unsqueeze(1),
                      torch.from_numpy(b).unsqueeze(1), edits)


@pytest.fixture(scope="module")
def stitched(case, pti_run):
    before = {k: v.clone() for k, v in pti_run.result.generator.state_dict().items()}
    result = stitch_frames(pti_run.result.generator, case.edited_latents, case.crops, case.masks, case.boundaries,
                           config=STITCH_TEST_CONFIG)
    return result, before


def test_masks_are_a_face_and_a_ring_around_it(case):
    # 50 px at 1024 is a 3 px ring at 64 px; the face covers about 30% of the crop, the ring 10%.
    assert ((case.masks * case.boundaries).sum() == 0).item()
    assert 0.2 < case.masks.mean() < 0.4 and 0.05 < case.boundaries.mean() < 0.15


def test_stitching_pulls_the_boundary_to_the_original_and_keeps_the_edit(case, stitched):
    result, _ = stitched
    assert result.stitched.shape == (FRAMES, 3, 64, 64)
    assert torch.equal(result.steps, torch.full([FRAMES], STITCH_TEST_CONFIG.steps))
    # The reported errors are the mean |image - crop| over the ring.
    assert torch.allclose(result.boundary_error_before, _mean_inside(case.edits - case.crops, case.boundaries))
    assert torch.allclose(result.boundary_error_after, _mean_inside(result.stitched - case.crops, case.boundaries))
    # Measured on these frames: 0.319, 0.297, 0.357 -> 0.182, 0.178, 0.198 (ratios 0.55-0.60).
    assert (result.boundary_error_after < 0.75 * result.boundary_error_before).all()
    # Inside the mask the face stays the edit. Measured mean |s - e|: 0.163, 0.134, 0.239 (the edit
    # itself moved the face by 0.07 there); the stitched face stays nearer the edit than the original
    # crop: mean |s - x| 0.303, 0.290, 0.356.
    inside_edit = _mean_inside(result.stitched - case.edits, case.masks)
    assert (inside_edit < 0.3).all() and inside_edit.mean() < 0.2
    assert (inside_edit < 0.8 * _mean_inside(result.stitched - case.crops, case.masks)).all()


def test_stitching_leaves_the_pti_generator_alone(pti_run, stitched):
    _, before = stitched
    G = pti_run.result.generator
    after = G.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert not G.training and not any(p.requires_grad for p in G.parameters())


def test_early_stop(case, pti_run):
    inputs = (case.edited_latents[:2], case.crops[:2], case.masks[:2], case.boundaries[:2])
    config = dataclasses.replace(STITCH_TEST_CONFIG, early_stop_loss=1e9)
    # Checked before the update (the reference code): every frame stops at once, untuned.
    result = stitch_frames(pti_run.result.generator, *inputs, config=config)
    assert result.steps.tolist() == [0, 0]
    torch.testing.assert_close(result.stitched, case.edits[:2], rtol=0, atol=1e-5)  # unfused vs fused rounding
    # Checked after it: one step each.
    result = stitch_frames(pti_run.result.generator, *inputs,
                           config=dataclasses.replace(config, early_stop_check="after"))
    assert result.steps.tolist() == [1, 1]
    assert not torch.equal(result.stitched, case.edits[:2])  # the one step did tune


def test_l2_loss_runs_and_lowers_the_boundary_error(case, pti_run):
    config = dataclasses.replace(STITCH_TEST_CONFIG, loss="l2", steps=5)
    result = stitch_frames(pti_run.result.generator, case.edited_latents[:1], case.crops[:1], case.masks[:1],
                           case.boundaries[:1], config=config)
    assert result.stitched.shape == (1, 3, 64, 64) and torch.isfinite(result.stitched).all()
    assert (result.boundary_error_after < result.boundary_error_before).all()
    with pytest.raises(ValueError, match="stitching.loss must be one of 'l1', 'l2'"):
        stitch_frames(pti_run.result.generator, case.edited_latents[:1], case.crops[:1], case.masks[:1],
                      case.boundaries[:1], config=dataclasses.replace(config, loss="l3"))


def test_boundary_error_counts_only_the_ring():
    images, crops = torch.zeros([2, 3, 4, 4]), torch.zeros([2, 3, 4, 4])
    images[0, :, 0, 0] = 0.6  # inside frame 0's ring
    images[0, :, 3, 3] = 5.0  # outside it
    ring = torch.zeros([2, 1, 4, 4])
    ring[0, 0, 0, :2] = 1
    assert torch.allclose(boundary_error(images, crops, ring), torch.tensor([0.3, 0.0]))


@pytest.mark.parametrize("part, shape", [
    ("crops", [2, 3, 64, 64]),
    ("masks", [3, 1, 32, 32]),
    ("boundaries", [4, 1, 64, 64]),
])
def test_bad_shapes_raise(case, pti_run, part, shape):
    inputs = dict(crops=case.crops, masks=case.masks, boundaries=case.boundaries)
    inputs[part] = torch.zeros(shape)
    with pytest.raises(ValueError, match=f"{part} must be"):
        stitch_frames(pti_run.result.generator, case.edited_latents, config=STITCH_TEST_CONFIG, **inputs)


def test_a_mask_of_the_wrong_height_raises_value_error(case, pti_run):
    with pytest.raises(ValueError):
        stitch_frames(pti_run.result.generator, case.edited_latents[:1], case.crops[:1], torch.ones([1, 1, 32, 64]),
                      case.boundaries[:1], config=dataclasses.replace(STITCH_TEST_CONFIG, steps=1))


def test_crops_without_three_channels_raise(case, pti_run):
    with pytest.raises(ValueError):
        stitch_frames(pti_run.result.generator, case.edited_latents[:1], case.crops[:1, :1], case.masks[:1],
                      case.boundaries[:1], config=dataclasses.replace(STITCH_TEST_CONFIG, steps=1))


def test_wrong_latent_shape_raises(case, pti_run):
    with pytest.raises(ValueError, match="ws must have shape"):
        stitch_frames(pti_run.result.generator, case.edited_latents[:, :5], case.crops, case.masks, case.boundaries,
                      config=STITCH_TEST_CONFIG)


def _naive_stitch(G, latents, crops, edits, masks_, boundaries, config, *, warm=False):
    """The reference code's loop: a fresh copy of θ_p per frame, batch 1, torch.optim.Adam. With ``warm``,
    each frame after the first goes on from the copy its predecessor ended with, for ``warm_steps(config)``:
    with a fresh Adam, or with ``warm_optimizer`` "carried" the same Adam going on."""
    import copy

    images, synthesis, optimizer = [], None, None
    for i in range(latents.shape[0]):
        if not (warm and i and config.warm_optimizer == "carried"):
            synthesis = copy.deepcopy(synthesis if warm and i else G.synthesis).requires_grad_(True)
            optimizer = torch.optim.Adam(synthesis.parameters(), lr=config.lr)
        w, one = latents[i:i + 1], slice(i, i + 1)
        for _ in range(warm_steps(config) if warm and i else config.steps):
            image = synthesis(w, noise_mode="const")
            distance = lambda a, b, m: masked_distances(a, b, m, kind=config.loss,  # noqa: E731
                                                        normalise=config.normalise).sum()
            loss = distance(image, crops[one], boundaries[one]) + config.lambda_m * distance(image, edits[one],
                                                                                             masks_[one])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            images.append(synthesis(w, noise_mode="const"))
    return torch.cat(images)


def test_batched_tuning_equals_the_naive_per_frame_loop(case, pti_run):
    config = dataclasses.replace(STITCH_TEST_CONFIG, steps=6, batch_size=FRAMES)
    G = pti_run.result.generator
    naive = _naive_stitch(G, case.edited_latents, case.crops, case.edits, case.masks, case.boundaries, config)
    batched = stitch_frames(G, case.edited_latents, case.crops, case.masks, case.boundaries, config=config)
    one_at_a_time = stitch_frames(G, case.edited_latents, case.crops, case.masks, case.boundaries,
                                  config=dataclasses.replace(config, batch_size=1))
    # Not bit-identical: Adam divides each gradient by its own running scale, so float rounding in a
    # parameter whose gradient is near zero becomes a full-size step. Measured after 6 steps: tuning
    # moved pixels by 0.094 on average (0.49 at most); batched and naive differ by 0.0010 on average
    # (0.0071 at most), batch 3 and batch 1 by at most 0.0098.
    moved = (naive - case.edits).abs().mean()
    for other in (batched.stitched, one_at_a_time.stitched):
        assert (other - naive).abs().mean() < 0.03 * moved
        assert (other - naive).abs().max() < 0.03


def test_early_stopped_frames_leave_the_batch_with_their_own_result(case, pti_run):
    config = dataclasses.replace(STITCH_TEST_CONFIG, steps=4, batch_size=FRAMES)
    G = pti_run.result.generator
    # The first step's boundary loss is that of the raw edit: stop only the frame where it is lowest, before
    # its first update.
    first = masked_distances(case.edits, case.crops, case.boundaries, kind="l1", normalise="mask")
    low, second = first.sort().values[:2].tolist()
    config = dataclasses.replace(config, early_stop_loss=(low + second) / 2)
    result = stitch_frames(G, case.edited_latents, case.crops, case.masks, case.boundaries, config=config)
    frame = int(first.argmin())
    assert result.steps[frame] == 0 and (result.steps[torch.arange(FRAMES) != frame] > 0).all()
    # Each frame ends as it would alone: same steps, same image (up to Adam's rounding, see above).
    for i in range(FRAMES):
        alone = stitch_frames(G, case.edited_latents[i:i + 1], case.crops[i:i + 1], case.masks[i:i + 1],
                              case.boundaries[i:i + 1], config=dataclasses.replace(config, batch_size=1))
        assert alone.steps.tolist() == [int(result.steps[i])]
        assert (result.stitched[i] - alone.stitched[0]).abs().max() < 0.03


def test_method_none_keeps_the_raw_edit(case, pti_run):
    config = dataclasses.replace(STITCH_TEST_CONFIG, method="none")
    result = stitch_frames(pti_run.result.generator, case.edited_latents, case.crops, case.masks, case.boundaries,
                           config=config, edits=case.edits)
    assert torch.equal(result.stitched, case.edits) and result.steps.tolist() == [0] * FRAMES
    assert torch.equal(result.boundary_error_after, result.boundary_error_before)


def test_progress_counts_each_frame_once_as_it_finishes(case, pti_run):
    G, frames = pti_run.result.generator, case.edited_latents.shape[0]
    inputs = (case.edited_latents, case.crops, case.masks, case.boundaries)
    first = masked_distances(case.edits, case.crops, case.boundaries, kind="l1", normalise="mask")
    low, second = first.sort().values[:2].tolist()
    runs = {  # one frame stops before the first step and leaves its batch; batches of 2; nothing tuned
        "early stop": dataclasses.replace(STITCH_TEST_CONFIG, steps=1, batch_size=FRAMES,
                                          early_stop_loss=(low + second) / 2),
        "batches": dataclasses.replace(STITCH_TEST_CONFIG, steps=1, batch_size=2),
        "none": dataclasses.replace(STITCH_TEST_CONFIG, method="none"),
    }
    counts = {}
    for name, config in runs.items():
        counts[name] = []
        stitch_frames(G, *inputs, config=config, edits=case.edits, progress=counts[name].append)
    assert counts == {"early stop": [1, frames - 1], "batches": [2, frames - 2], "none": [frames]}


def test_the_warm_start_plan_follows_runs_of_neighbours():
    config = dataclasses.replace(STITCH_TEST_CONFIG, warm_start=0.5, batch_size=3)
    # Runs 0-2, 3-4, 5-6: each batch holds the next frame of every run still going.
    assert tuning_plan(7, config) == [([0, 3, 5], False), ([1, 4, 6], True), ([2], True)]
    assert tuning_plan(2, config) == [([0, 1], False)]
    assert tuning_plan(7, dataclasses.replace(config, warm_start=0)) == [([0, 1, 2], False),
                                                                             ([3, 4, 5], False), ([6], False)]


@pytest.mark.parametrize("optimizer", ["carried", "fresh"])
def test_warm_started_frames_go_on_from_their_neighbours_tuned_weights(optimizer, case, pti_run):
    config = dataclasses.replace(STITCH_TEST_CONFIG, steps=6, warm_start=0.3, batch_size=1, warm_optimizer=optimizer)
    assert warm_steps(config) == 2 and warm_steps(dataclasses.replace(config, steps=100)) == 30
    G = pti_run.result.generator
    inputs = (case.edited_latents, case.crops, case.masks, case.boundaries)
    naive = _naive_stitch(G, case.edited_latents, case.crops, case.edits, case.masks, case.boundaries, config,
                          warm=True)
    warm = stitch_frames(G, *inputs, config=config, edits=case.edits)
    cold = stitch_frames(G, *inputs, config=dataclasses.replace(config, warm_start=0), edits=case.edits)
    assert warm.steps.tolist() == [6, 2, 2]
    assert torch.equal(warm.stitched[0], cold.stitched[0])  # the first frame of a run starts from θ_p
    # Adam's rounding, as in the test above; warm and cold frames differ far more than that.
    assert (warm.stitched - naive).abs().max() < 0.03
    assert (warm.stitched[1:] - cold.stitched[1:]).abs().mean() > 3 * (warm.stitched - naive).abs().mean()
    # Two runs tuned side by side (batch 2): frames 0-1 and frame 2 are each what they are alone.
    runs = stitch_frames(G, *inputs, config=dataclasses.replace(config, batch_size=2), edits=case.edits)
    assert runs.steps.tolist() == [6, 2, 6]
    assert (runs.stitched[:2] - warm.stitched[:2]).abs().max() < 0.03
    assert (runs.stitched[2] - cold.stitched[2]).abs().max() < 0.03
    other = "fresh" if optimizer == "carried" else "carried"  # what is carried changes the warm frames
    swapped = stitch_frames(G, *inputs, config=dataclasses.replace(config, warm_optimizer=other), edits=case.edits)
    assert torch.equal(swapped.stitched[0], warm.stitched[0])
    assert (swapped.stitched[1:] - warm.stitched[1:]).abs().mean() > 3 * (warm.stitched - naive).abs().mean()


@pytest.mark.parametrize("check", ["before", "after"])
def test_a_frame_that_stops_early_hands_its_weights_and_adam_state_to_its_neighbour(check, case, pti_run):
    G = pti_run.result.generator
    inputs = (case.edited_latents, case.crops, case.masks, case.boundaries)
    losses = masked_distances(case.edits, case.crops, case.boundaries, kind="l1", normalise="mask").tolist()
    config = dataclasses.replace(STITCH_TEST_CONFIG, steps=6, warm_start=0.5, warm_optimizer="carried",
                                 early_stop_check=check, early_stop_loss=0.999 * losses[0])
    # Batch 2: runs [0, 1] and [2], frame 0 beside frame 2 and stopping early; batch 1: one run [0, 1, 2].
    side_by_side = stitch_frames(G, *inputs, config=dataclasses.replace(config, batch_size=2), edits=case.edits)
    alone = stitch_frames(G, *inputs, config=dataclasses.replace(config, batch_size=1), edits=case.edits)
    assert side_by_side.steps[0] < 6 and side_by_side.steps[:2].tolist() == alone.steps[:2].tolist()
    assert (side_by_side.stitched[:2] - alone.stitched[:2]).abs().max() < 0.03
