"""Pivotal tuning of one generator around all frames' pivots (paper eq. 1), on real face crops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from stitchtime_core.config import PTIConfig
from stitchtime_core.pti import locality_codes, pti_steps, reconstruction_lpips, tune_generator

# A few steps on 4 frames: enough to tell runs apart, cheap enough to run three times.
SHORT_CONFIG = PTIConfig(lr=1e-2, observations_per_frame=2, batch_size=2, seed=5)


def _reconstruction_mse(G, pivots, images) -> float:
    with torch.no_grad():
        return float(F.mse_loss(G.synthesis(pivots, noise_mode="const"), images))


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def held_out_codes(tiny, pivots, pti_run) -> torch.Tensor:
    """Locality codes the tuning never saw: PTI's construction with a seed of their own."""
    with torch.no_grad():
        return locality_codes(tiny.generator, pivots, alpha=pti_run.config.locality_alpha,
                              psi=pti_run.config.locality_psi, generator=torch.Generator().manual_seed(123))


def _drift(tuned, original, codes) -> float:
    """MSE between the tuned and the original generator's images at ``codes``."""
    with torch.no_grad():
        return float(F.mse_loss(tuned.synthesis(codes), original.synthesis(codes)))


def test_pti_steps():
    assert pti_steps(6, PTIConfig(observations_per_frame=8, batch_size=2)) == 24
    assert pti_steps(1, PTIConfig()) == 80  # the paper: each frame observed 80 times
    assert pti_steps(120, PTIConfig()) == 9600
    assert pti_steps(5, PTIConfig(observations_per_frame=80, batch_size=3)) == 134  # ceil(400 / 3)
    assert pti_steps(7, PTIConfig(observations_per_frame=1, batch_size=8)) == 1


def test_pti_fits_the_frames(tiny, face_clip, pivots, pti_run):
    result = pti_run.result
    before = _reconstruction_mse(tiny.generator, pivots, face_clip.images)
    after = _reconstruction_mse(result.generator, pivots, face_clip.images)
    # Measured: 3.00 -> 0.130 (23x) for these 24 steps; the loss 30.2 -> 2.1.
    assert after * 10 < before
    assert after < 0.3
    assert result.steps == pti_steps(len(pivots), pti_run.config) == len(result.losses) == 24
    assert result.losses[-1] < result.losses[0] / 5
    assert [(step, total) for step, total, _ in pti_run.progress] == [(s, 24) for s in range(1, 25)]
    assert [loss for *_, loss in pti_run.progress] == result.losses


def test_pti_returns_a_frozen_copy_and_leaves_the_original_alone(tiny, pti_run):
    tuned = pti_run.result.generator
    assert tuned is not tiny.generator
    assert _states_equal(tiny.generator.state_dict(), pti_run.original_state)
    assert not tuned.training and not any(p.requires_grad for p in tuned.parameters())
    assert not tiny.generator.training and not any(p.requires_grad for p in tiny.generator.parameters())
    # Only the synthesis network is tuned: the mapping network (and w_avg) stay the original's.
    tuned_state = tuned.state_dict()
    mapping = [k for k in tuned_state if k.startswith("mapping.")]
    assert mapping and all(torch.equal(tuned_state[k], pti_run.original_state[k]) for k in mapping)
    name = "synthesis.b64.conv1.weight"
    assert not torch.equal(tuned_state[name], pti_run.original_state[name])


def test_pti_is_deterministic_for_a_seed(tiny, face_clip, pivots, lpips_fn):
    run = lambda config: tune_generator(tiny.generator, pivots[:4], face_clip.images[:4], config=config,  # noqa: E731
                                        lpips_fn=lpips_fn)
    first, second = run(SHORT_CONFIG), run(SHORT_CONFIG)
    other_seed = run(dataclasses.replace(SHORT_CONFIG, seed=6))
    assert first.steps == 4
    assert first.losses == second.losses
    assert _states_equal(first.generator.state_dict(), second.generator.state_dict())
    assert other_seed.losses != first.losses


def test_locality_regulariser_keeps_the_generator_near_the_original(tiny, face_clip, pivots, lpips_fn,
                                                                    pti_run, held_out_codes):
    unregularised = tune_generator(tiny.generator, pivots, face_clip.images, lpips_fn=lpips_fn,
                                   config=dataclasses.replace(pti_run.config, lambda_r=0.0))
    strongly_regularised = tune_generator(tiny.generator, pivots, face_clip.images, lpips_fn=lpips_fn,
                                          config=dataclasses.replace(pti_run.config, lambda_r=1.0))
    free = _drift(unregularised.generator, tiny.generator, held_out_codes)
    held = _drift(strongly_regularised.generator, tiny.generator, held_out_codes)
    # Measured drift: 3.43 without the regulariser, 3.25 at the paper's λ_R = 0.1, 2.51 at λ_R = 1.
    assert held < 0.85 * free
    # Both still fit the frames.
    for result in (unregularised, strongly_regularised, pti_run.result):
        assert _reconstruction_mse(result.generator, pivots, face_clip.images) < 0.3


def test_locality_codes_lie_alpha_from_the_pivots(tiny, pivots):
    codes = locality_codes(tiny.generator, pivots, alpha=30.0, psi=0.5, generator=torch.Generator().manual_seed(0))
    assert codes.shape == pivots.shape
    distances = (codes - pivots).flatten(1).norm(dim=1)
    assert torch.allclose(distances, torch.full_like(distances, 30.0), rtol=1e-4)


@pytest.mark.parametrize("pivot_slice, crop_shape, message", [
    (slice(0, 5), (6, 3, 64, 64), "5 pivots for 6 crops"),
    (slice(0, 6), (6, 3, 32, 32), r"crops must be \[frames, 3, 64, 64\]"),
    (slice(0, 6), (6, 1, 64, 64), r"crops must be \[frames, 3, 64, 64\]"),
])
def test_mismatched_shapes_raise(tiny, pivots, lpips_fn, pivot_slice, crop_shape, message):
    with pytest.raises(ValueError, match=message):
        tune_generator(tiny.generator, pivots[pivot_slice], torch.zeros(crop_shape), config=SHORT_CONFIG,
                       lpips_fn=lpips_fn)


def test_pivots_of_the_wrong_width_raise(tiny, pivots, face_clip, lpips_fn):
    with pytest.raises(ValueError, match="ws must have shape"):
        tune_generator(tiny.generator, pivots[:, :5], face_clip.images, config=SHORT_CONFIG, lpips_fn=lpips_fn)


class _Stop(Exception):
    pass


def test_a_resumed_run_equals_an_uninterrupted_one(tiny, face_clip, pivots, lpips_fn):
    config = dataclasses.replace(SHORT_CONFIG, observations_per_frame=4, checkpoint_every=3)  # 12 steps
    saved = []
    whole = tune_generator(tiny.generator, pivots[:6], face_clip.crops_chw, config=config, lpips_fn=lpips_fn,
                           checkpoint=saved.append)
    assert [c.step for c in saved] == [3, 6, 9, 12]  # and the finished state

    def stop_after_seven(step, total, loss):
        if step == 7:
            raise _Stop  # as if the process were killed after step 7

    kept = []
    with pytest.raises(_Stop):
        tune_generator(tiny.generator, pivots[:6], face_clip.crops_chw, config=config, lpips_fn=lpips_fn,
                       checkpoint=kept.append, progress=stop_after_seven)
    assert [c.step for c in kept] == [3, 6]
    resumed = tune_generator(tiny.generator, pivots[:6], face_clip.crops_chw, config=config, lpips_fn=lpips_fn,
                             resume=kept[-1])
    assert resumed.losses == whole.losses and len(whole.losses) == 12
    assert _states_equal(resumed.generator.state_dict(), whole.generator.state_dict())


class _Clock:
    """A clock that moves only when told: each PTI step "takes" ``step_seconds``, saves take no time."""

    def __init__(self, step_seconds: float):
        self.now, self.step_seconds = 0.0, step_seconds

    def __call__(self) -> float:
        return self.now

    def step(self, step: int, total: int, loss: float) -> None:
        self.now += self.step_seconds


# 12 steps of 7 s, checkpointed by time every 25 s: fewer steps than the step interval.
TIMED_CONFIG = dataclasses.replace(SHORT_CONFIG, observations_per_frame=4, checkpoint_every=100,
                                   checkpoint_seconds=25)


def _tune_timed(tiny, face_clip, pivots, lpips_fn, *, progress=None, **kwargs):
    clock = _Clock(step_seconds=7)

    def step(*args):
        clock.step(*args)
        if progress is not None:
            progress(*args)

    return tune_generator(tiny.generator, pivots[:6], face_clip.crops_chw, config=TIMED_CONFIG, lpips_fn=lpips_fn,
                          clock=clock, progress=step, **kwargs)


@pytest.fixture(scope="module")
def timed_run(tiny, face_clip, pivots, lpips_fn):
    """An uninterrupted run checkpointed by time, and its checkpoints."""
    saved = []
    return _tune_timed(tiny, face_clip, pivots, lpips_fn, checkpoint=saved.append), saved


def test_a_run_of_fewer_steps_than_the_interval_is_checkpointed_by_time(tiny, face_clip, pivots, lpips_fn,
                                                                        timed_run):
    whole, saved = timed_run
    # 28 s at step 4, 56 s at step 8 (25 s after the save at 28 s), and the finished state at step 12.
    assert whole.steps == 12 and [c.step for c in saved] == [4, 8, 12]
    steps = []

    def killed_after_six(step, total, loss):
        steps.append(step)
        if step == 6:
            raise _Stop

    kept = []
    with pytest.raises(_Stop):
        _tune_timed(tiny, face_clip, pivots, lpips_fn, checkpoint=kept.append, progress=killed_after_six)
    assert [c.step for c in kept] == [4]
    steps.clear()
    resumed = _tune_timed(tiny, face_clip, pivots, lpips_fn, resume=kept[-1], progress=lambda s, *_: steps.append(s))
    assert steps == list(range(5, 13))  # from the checkpoint at step 4, not from step 0
    assert resumed.losses == whole.losses
    assert _states_equal(resumed.generator.state_dict(), whole.generator.state_dict())


def test_the_finished_state_resumes_without_a_step_to_the_same_generator(tiny, face_clip, pivots, lpips_fn,
                                                                          timed_run):
    whole, saved = timed_run
    steps = []
    finished = _tune_timed(tiny, face_clip, pivots, lpips_fn, resume=saved[-1],
                           progress=lambda s, *_: steps.append(s), checkpoint=saved.append)
    assert steps == [] and len(saved) == 3  # no step taken, no checkpoint written again
    assert finished.steps == 12 and finished.losses == whole.losses
    assert _states_equal(finished.generator.state_dict(), whole.generator.state_dict())
    assert not finished.generator.training and not any(p.requires_grad for p in finished.generator.parameters())


@pytest.mark.parametrize("every, seconds, expected", [(0, 0, []), (5, 0, [5, 10, 12]), (0, 25, [4, 8, 12])])
def test_each_interval_alone_and_neither(tiny, face_clip, pivots, lpips_fn, every, seconds, expected):
    saved = []
    config = dataclasses.replace(TIMED_CONFIG, checkpoint_every=every, checkpoint_seconds=seconds)
    clock = _Clock(step_seconds=7)
    tune_generator(tiny.generator, pivots[:6], face_clip.crops_chw, config=config, lpips_fn=lpips_fn,
                   clock=clock, progress=clock.step, checkpoint=saved.append)
    assert [c.step for c in saved] == expected


def test_uint8_crops_tune_like_float_crops(tiny, face_clip, pivots, lpips_fn):
    from_float = tune_generator(tiny.generator, pivots[:4], face_clip.images[:4], config=SHORT_CONFIG,
                                lpips_fn=lpips_fn)
    from_uint8 = tune_generator(tiny.generator, pivots[:4], face_clip.crops_chw[:4], config=SHORT_CONFIG,
                                lpips_fn=lpips_fn)
    # The two conversions differ by an ulp, which 4 steps grow to about 2e-5 on an AVX-512 CPU; reading the
    # uint8 crops as [0, 1] or without the offset would differ by tens of percent.
    assert from_float.losses == pytest.approx(from_uint8.losses, rel=1e-4)


def test_a_checkpoint_of_another_run_is_refused(tiny, face_clip, pivots, lpips_fn):
    saved = []
    config = dataclasses.replace(SHORT_CONFIG, checkpoint_every=1)
    tune_generator(tiny.generator, pivots[:4], face_clip.images[:4], config=config, lpips_fn=lpips_fn,
                   checkpoint=saved.append)
    longer_than_run = dataclasses.replace(saved[-1], step=99)
    with pytest.raises(ValueError, match="does not fit a run of 4 steps"):
        tune_generator(tiny.generator, pivots[:4], face_clip.images[:4], config=config, lpips_fn=lpips_fn,
                       resume=longer_than_run)


def test_reconstruction_lpips_measures_pivots_before_and_after_tuning(tiny, face_clip, pivots, pti_run, lpips_fn):
    G, crops = tiny.generator, torch.from_numpy(face_clip.crops).permute(0, 3, 1, 2)
    frames = range(len(crops))
    before, after = reconstruction_lpips(G, pti_run.result.generator, pivots, crops, lpips_fn=lpips_fn, frames=frames)
    assert 0 < after < before  # tuning brings every frame closer to its crop
    same = reconstruction_lpips(G, G, pivots, crops, lpips_fn=lpips_fn, frames=frames)
    assert same[0] == same[1] == pytest.approx(before)
    with torch.no_grad():
        own = G.synthesis(pivots[:2], noise_mode="const")
    assert reconstruction_lpips(G, G, pivots[:2], own, lpips_fn=lpips_fn, frames=[0, 1]) == (0.0, 0.0)
    one = reconstruction_lpips(G, pti_run.result.generator, pivots, crops, lpips_fn=lpips_fn, frames=[1])
    assert one != (before, after)  # only the frames asked for are measured
    for bad, message in (([], "at least one"), ([len(crops)], "must lie in")):
        with pytest.raises(ValueError, match=message):
            reconstruction_lpips(G, G, pivots, crops, lpips_fn=lpips_fn, frames=bad)
