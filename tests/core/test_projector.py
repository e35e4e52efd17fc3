"""Optimisation-based W pivots (the PTI / stylegan2-ada projector), on targets the tiny generator drew itself."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from stitchtime_core.config import EncodingConfig
from stitchtime_core.projector import (
    learning_rate, noise_regularization, project_pivots, projection_plan, w_statistics,
)

# A short run at a larger learning rate than the paper's 5e-3 for 450 steps: the tiny generator's W
# has a std of ~6.4, and 15 steps at 5e-3 barely leave w_avg.
CONFIG = EncodingConfig(method="optimization", batch_size=2, projection_steps=15, projection_lr=0.02)
SHORT_CONFIG = dataclasses.replace(CONFIG, projection_steps=4, batch_size=1)


@dataclasses.dataclass(frozen=True)
class Projection:
    w_true: torch.Tensor
    """[2, num_ws, w_dim] the codes the targets were drawn from."""
    targets: torch.Tensor
    """[2, 3, 64, 64] G.synthesis(w_true)."""
    pivots: torch.Tensor
    """[2, num_ws, w_dim] both targets projected in one batch."""
    original_state: dict[str, torch.Tensor]
    """The generator's state dict, cloned before projecting."""
    progress: list[tuple[int, int]]


@pytest.fixture(scope="module")
def projection(tiny, lpips_fn) -> Projection:
    G = tiny.generator
    with torch.no_grad():
        w_true = G.mapping(torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(7)))
        targets = G.synthesis(w_true, noise_mode="const")
    original_state = {k: v.clone() for k, v in G.state_dict().items()}
    progress: list[tuple[int, int]] = []
    pivots = project_pivots(G, targets, config=CONFIG, lpips_fn=lpips_fn, seed=0,
                            progress=lambda step, total: progress.append((step, total)))
    return Projection(w_true, targets, pivots, original_state, progress)


def _errors(G, pivots, targets, lpips_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame (MSE, LPIPS) between G(pivots) with the generator's own noise and the targets."""
    with torch.no_grad():
        images = G.synthesis(pivots, noise_mode="const")
        return F.mse_loss(images, targets, reduction="none").mean(dim=(1, 2, 3)), lpips_fn(images, targets).flatten()


def test_projection_recovers_generated_images(tiny, lpips_fn, projection):
    G = tiny.generator
    w_avg, _ = w_statistics(G)
    start = w_avg.expand(2, G.num_ws, G.w_dim)
    mse_start, lpips_start = _errors(G, start, projection.targets, lpips_fn)
    mse, lpips = _errors(G, projection.pivots, projection.targets, lpips_fn)
    # Measured: LPIPS 0.112 -> 0.029 (3.8x) and 0.173 -> 0.041 (4.2x); MSE 1.81 -> 0.61 (3.0x) and
    # 3.71 -> 1.04 (3.6x). The noise maps the projector optimised are dropped, as in PTI.
    assert torch.all(lpips * 2.5 < lpips_start)
    assert torch.all(mse * 2 < mse_start)


def test_pivots_are_one_w_per_frame(tiny, projection):
    G = tiny.generator
    pivots = projection.pivots
    assert pivots.shape == (2, G.num_ws, G.w_dim)
    assert pivots.dtype == torch.float32 and not pivots.requires_grad
    assert torch.isfinite(pivots).all()
    assert torch.equal(pivots, pivots[:, :1].expand_as(pivots))
    assert projection.progress == [(step, 15) for step in range(1, 16)]


def test_projection_leaves_the_generator_alone(tiny, projection):
    state = tiny.generator.state_dict()
    assert state.keys() == projection.original_state.keys()
    assert all(torch.equal(state[k], projection.original_state[k]) for k in state)
    assert all(p.grad is None for p in tiny.generator.parameters())


def test_frames_do_not_depend_on_their_batch(tiny, lpips_fn, projection):
    # Frame a alone gets the draws it got beside frame b, and (the optimiser being elementwise and the
    # loss a sum over frames) the same steps. Measured: max difference 5e-7 on values up to ~2.5, the
    # float rounding of batched convolutions.
    alone = project_pivots(tiny.generator, projection.targets[:1], config=CONFIG, lpips_fn=lpips_fn, seed=0)
    torch.testing.assert_close(alone, projection.pivots[:1], rtol=0, atol=1e-4)


def test_projection_is_deterministic_for_a_seed(tiny, lpips_fn, projection):
    target = projection.targets[:1]
    run = lambda seed: project_pivots(tiny.generator, target, config=SHORT_CONFIG, lpips_fn=lpips_fn,  # noqa: E731
                                      seed=seed, w_avg_samples=1000)
    first, second, other_seed = run(0), run(0), run(1)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other_seed)


def test_progress_counts_the_steps_of_every_batch(tiny, lpips_fn, projection):
    progress: list[tuple[int, int]] = []
    config = dataclasses.replace(SHORT_CONFIG, projection_steps=2)
    project_pivots(tiny.generator, projection.targets, config=config, lpips_fn=lpips_fn, w_avg_samples=1000,
                   progress=lambda step, total: progress.append((step, total)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_warm_starts_project_frames_in_order_with_few_steps_after_the_first():
    config = dataclasses.replace(CONFIG, projection_steps=15, warm_start_steps=3)
    assert projection_plan(3, config) == [(range(0, 1), 15), (range(1, 2), 3), (range(2, 3), 3)]
    assert projection_plan(2, config, warm=True) == [(range(0, 1), 3), (range(1, 2), 3)]
    assert projection_plan(3, CONFIG) == [(range(0, 2), 15), (range(2, 3), 15)]


def test_a_warm_start_goes_on_from_its_neighbour(tiny, lpips_fn, projection):
    """A frame like its predecessor, started from the predecessor's pivot, gets in 3 steps what a cold
    start gets in 15 (and far more than a cold start gets in 3), staying near that pivot; a neighbour
    given as ``start`` counts as the predecessor."""
    G = tiny.generator
    config = dataclasses.replace(CONFIG, warm_start_steps=3)
    targets = projection.targets[:1].repeat(2, 1, 1, 1)
    progress: list[tuple[int, int]] = []
    pivots = project_pivots(G, targets, config=config, lpips_fn=lpips_fn, w_avg_samples=1000,
                            progress=lambda step, total: progress.append((step, total)))
    assert progress[-1] == (18, 18)
    cold = project_pivots(G, targets[:1], config=dataclasses.replace(CONFIG, projection_steps=3), lpips_fn=lpips_fn,
                          w_avg_samples=1000)
    _, lpips_warm = _errors(G, pivots, targets, lpips_fn)
    _, lpips_cold = _errors(G, torch.cat([projection.pivots[:1], cold]), targets, lpips_fn)
    # Measured: 15 cold steps 0.029, 3 cold steps 0.087, 3 warm steps 0.023; the warm pivot moved 0.30 (W spread 6.5).
    assert float(lpips_warm[1]) < 1.2 * float(lpips_cold[0])
    assert float(lpips_warm[1]) < 0.5 * float(lpips_cold[1])
    _, w_std = w_statistics(G, samples=1000)
    assert float((pivots[1, 0] - pivots[0, 0]).norm()) < 0.1 * w_std

    continued = project_pivots(G, targets[:1], config=config, lpips_fn=lpips_fn, w_avg_samples=1000,
                               start=pivots[0, 0], progress=lambda step, total: progress.append((step, total)))
    assert progress[-1] == (3, 3)  # the first frame of this call starts warm: 3 steps, not 15
    assert float((continued[0, 0] - pivots[0, 0]).norm()) < 0.1 * w_std


def test_bad_crops_raise(tiny, lpips_fn):
    G = tiny.generator
    for shape in ([3, 64, 64], [1, 1, 64, 64], [1, 3, 32, 32], [1, 3, 64, 32]):
        with pytest.raises(ValueError, match="crops must be"):
            project_pivots(G, torch.zeros(shape), config=CONFIG, lpips_fn=lpips_fn)
    with pytest.raises(ValueError, match="crops are on meta"):
        project_pivots(G, torch.zeros([1, 3, 64, 64], device="meta"), config=CONFIG, lpips_fn=lpips_fn)


def test_no_frames_give_no_pivots(tiny, lpips_fn):
    G = tiny.generator
    pivots = project_pivots(G, torch.zeros([0, 3, 64, 64]), config=CONFIG, lpips_fn=lpips_fn)
    assert pivots.shape == (0, G.num_ws, G.w_dim)


def test_learning_rate_schedule():
    # Ramps up over the first 5 % of the steps, holds, and falls along a half cosine over the last 25 %.
    assert learning_rate(0.0, 0.1) == 0.0
    assert learning_rate(0.025, 0.1) == pytest.approx(0.05)
    assert learning_rate(0.5, 0.1) == pytest.approx(0.1)
    assert learning_rate(0.875, 0.1) == pytest.approx(0.05)
    assert learning_rate(1.0, 0.1) == pytest.approx(0.0)


def test_noise_regularization_tells_white_from_smooth_noise():
    white = torch.randn([1, 32, 32], generator=torch.Generator().manual_seed(0))
    smooth = F.avg_pool2d(white.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
    smooth = (smooth - smooth.mean()) / smooth.std()
    penalties = noise_regularization([torch.cat([white, smooth])])
    assert penalties.shape == (2,)
    # Measured: 0.0027 for white noise (its sample autocorrelation), 0.91 for the 3x3-smoothed copy.
    assert penalties[0] < 0.01 and penalties[1] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_projection_on_cuda_matches_cpu(tiny, lpips_fn, projection):
    G, lpips_cuda = copy.deepcopy(tiny.generator).cuda(), copy.deepcopy(lpips_fn).cuda()
    target = projection.targets[:1]
    on_cpu = project_pivots(tiny.generator, target, config=SHORT_CONFIG, lpips_fn=lpips_fn)
    on_cuda = project_pivots(G, target.cuda(), config=SHORT_CONFIG, lpips_fn=lpips_cuda)
    assert on_cuda.device.type == "cuda"
    # The random draws come from CPU streams, so only float rounding differs between the devices.
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=1e-3)
