"""Adam: the batched one of stitching against torch.optim.Adam (the same numbers), and torch.optim.Adam's
state kept flat for PTI checkpoints, which resumes exactly."""

from __future__ import annotations

import pytest
import torch

from stitchtime_core.adam import BatchedAdam, adam_for, adam_state, adam_step, load_adam_state


def _problem(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {"a": torch.randn(5, 4, generator=g), "b": torch.randn(7, generator=g)}
    return params, torch.randn(4, 7, generator=g)


def _loss(p: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return ((p["a"][:4] @ p["b"][:4, None].expand(4, 7) * p["b"]) - target).square().mean() + p["a"].abs().sum()


@pytest.mark.parametrize("lr", [0.1, 3e-4])
def test_batched_steps_are_torch_optim_adams_to_the_bit(lr: float) -> None:
    ours, target = _problem(0)
    theirs = {k: v.clone().requires_grad_(True) for k, v in ours.items()}
    ours = {k: v.requires_grad_(True) for k, v in ours.items()}
    adam, reference = BatchedAdam(ours, lr=lr), torch.optim.Adam(list(theirs.values()), lr=lr)
    for step in range(25):
        if step == 10:  # a new learning rate
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
    adam = BatchedAdam(params, lr=0.1)
    adam.step([torch.ones(5, 4), None])
    assert torch.equal(params["b"], before["b"]) and not torch.equal(params["a"], before["a"])


def test_frames_that_leave_the_batch_keep_their_own_moments() -> None:
    g = torch.Generator().manual_seed(3)
    start, target = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    batched = BatchedAdam({"x": start.clone().requires_grad_(True)}, lr=0.05)
    alone = [{"x": start[i:i + 1].clone().requires_grad_(True)} for i in range(3)]
    singles = [BatchedAdam(p, lr=0.05) for p in alone]
    for step in range(8):
        if step == 4:  # frame 1 stops: the others go on as if they had always been alone
            batched.keep(torch.tensor([True, False, True]))
            del singles[1], alone[1]
        rows = target[[0, 2]] if step >= 4 else target
        x = batched.params["x"]
        batched.step(torch.autograd.grad((x - rows).square().sum(), [x]))
        for p, adam, t in zip(alone, singles, rows):
            adam.step(torch.autograd.grad((p["x"] - t).square().sum(), [p["x"]]))
    assert torch.allclose(batched.params["x"], torch.cat([p["x"] for p in alone]), atol=0, rtol=0)


def test_torch_adams_flat_state_resumes_where_it_stopped_and_refuses_other_parameters() -> None:
    params, target = _problem(2)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    straight = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    adam, whole = adam_for(list(params.values()), lr=0.05), adam_for(list(straight.values()), lr=0.05)
    for _ in range(6):
        adam_step(adam, _loss(params, target))
        adam_step(whole, _loss(straight, target))
    state = adam_state(adam)
    assert sorted(state) == ["exp_avg.0", "exp_avg.1", "exp_avg_sq.0", "exp_avg_sq.1", "step"]
    assert float(state["step"]) == 6
    resumed_params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    resumed = adam_for(list(resumed_params.values()), lr=0.05)
    load_adam_state(resumed, state)
    for _ in range(4):
        adam_step(resumed, _loss(resumed_params, target))
        adam_step(whole, _loss(straight, target))
    assert all(torch.equal(resumed_params[k], straight[k]) for k in straight)
    with pytest.raises(ValueError, match="1 missing"):
        load_adam_state(adam_for([*params.values(), torch.zeros(3, requires_grad=True)], lr=0.1), state)
    with pytest.raises(ValueError, match="exp_avg.1 is \\[7\\], parameter 1 \\[8\\]"):
        load_adam_state(adam_for([params["a"], torch.zeros(8, requires_grad=True)], lr=0.1), state)


def test_a_step_gives_no_gradient_to_tensors_outside_the_optimiser() -> None:
    weight = torch.randn(4, requires_grad=True)  # e.g. a generator's weights the projector reads
    w = torch.zeros(4, requires_grad=True)
    adam_step(adam_for([w], lr=0.1), ((w + weight) ** 2).sum())
    assert weight.grad is None and not torch.equal(w, torch.zeros(4))
