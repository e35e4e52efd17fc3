"""Our Adam against torch.optim.Adam: the same numbers, and a state that resumes exactly."""

from __future__ import annotations

import pytest
import torch

from stitchtime_core.adam import Adam


def _problem(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {"a": torch.randn(5, 4, generator=g), "b": torch.randn(7, generator=g)}
    return params, torch.randn(4, 7, generator=g)


def _loss(p: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return ((p["a"][:4] @ p["b"][:4, None].expand(4, 7) * p["b"]) - target).square().mean() + p["a"].abs().sum()


@pytest.mark.parametrize("lr", [0.1, 3e-4])
def test_steps_are_torch_optim_adams_to_the_bit(lr: float) -> None:
    ours, target = _problem(0)
    theirs = {k: v.clone().requires_grad_(True) for k, v in ours.items()}
    ours = {k: v.requires_grad_(True) for k, v in ours.items()}
    adam, reference = Adam(ours, lr=lr), torch.optim.Adam(list(theirs.values()), lr=lr)
    for step in range(25):
        if step == 10:  # a new learning rate, as the projector sets one every step
            adam.lr = reference.param_groups[0]["lr"] = lr / 3
        adam.step(torch.autograd.grad(_loss(ours, target), list(ours.values())))
        reference.zero_grad()
        _loss(theirs, target).backward()
        reference.step()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), step
    assert adam.steps == 25


def test_a_missing_gradient_leaves_its_tensor_alone() -> None:
    params, _ = _problem(1)
    before = {k: v.clone() for k, v in params.items()}
    adam = Adam(params, lr=0.1)
    adam.step([torch.ones(5, 4), None])
    assert torch.equal(params["b"], before["b"]) and not torch.equal(params["a"], before["a"])


def test_state_resumes_where_it_stopped_and_refuses_other_parameters() -> None:
    params, target = _problem(2)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    straight = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    adam, whole = Adam(params, lr=0.05), Adam(straight, lr=0.05)
    for _ in range(6):
        adam.step(torch.autograd.grad(_loss(params, target), list(params.values())))
        whole.step(torch.autograd.grad(_loss(straight, target), list(straight.values())))
    state = adam.state()
    assert sorted(state) == ["exp_avg.0", "exp_avg.1", "exp_avg_sq.0", "exp_avg_sq.1", "step"]
    resumed_params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    resumed = Adam(resumed_params, lr=0.05)
    resumed.load_state(state)
    for _ in range(4):
        resumed.step(torch.autograd.grad(_loss(resumed_params, target), list(resumed_params.values())))
        whole.step(torch.autograd.grad(_loss(straight, target), list(straight.values())))
    assert resumed.steps == 10 and all(torch.equal(resumed_params[k], straight[k]) for k in straight)
    with pytest.raises(ValueError, match="1 missing"):
        Adam({**params, "c": torch.zeros(3)}, lr=0.1).load_state(state)
    with pytest.raises(ValueError, match="exp_avg.1 is \\[7\\], b \\[8\\]"):
        Adam({"a": params["a"], "b": torch.zeros(8)}, lr=0.1).load_state(state)
