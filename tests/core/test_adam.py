"""Adam: frames leaving stitching's batch keep their own moments, and torch.optim.Adam's state kept flat
for PTI checkpoints resumes exactly."""

from __future__ import annotations

import pytest
import torch

from stitchtime_core.adam import adam_for, adam_state, adam_step, keep_rows, load_adam_state


def _problem(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {"a": torch.randn(5, 4, generator=g), "b": torch.randn(7, generator=g)}
    return params, torch.randn(4, 7, generator=g)


def _loss(p: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return ((p["a"][:4] @ p["b"][:4, None].expand(4, 7) * p["b"]) - target).square().mean() + p["a"].abs().sum()


def test_frames_that_leave_the_batch_go_on_as_if_they_had_always_been_alone() -> None:
    g = torch.Generator().manual_seed(3)
    start, target = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    batched = adam_for([start.clone().requires_grad_(True)], lr=0.05)
    alone = [start[i:i + 1].clone().requires_grad_(True) for i in range(3)]
    singles = [adam_for([x], lr=0.05) for x in alone]
    for step in range(8):
        if step == 4:  # frame 1 stops after 4 steps, with moments and a step count of its own
            batched = keep_rows(batched, torch.tensor([True, False, True]))
            del singles[1], alone[1]
        rows = target[[0, 2]] if step >= 4 else target
        x = batched.param_groups[0]["params"][0]
        adam_step(batched, (x - rows).square().sum())
        for x1, adam, t in zip(alone, singles, rows):
            adam_step(adam, (x1 - t).square().sum())
    kept = batched.param_groups[0]["params"][0]
    assert kept.shape == (2, 6) and torch.equal(kept, torch.cat(alone))


def test_rows_kept_before_the_first_step_start_fresh() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    kept = keep_rows(adam_for([x], lr=0.1), torch.tensor([0, 3]))
    fresh = x.detach()[[0, 3]].clone().requires_grad_(True)
    reference = adam_for([fresh], lr=0.1)
    y = kept.param_groups[0]["params"][0]
    adam_step(kept, y.square().sum())
    adam_step(reference, fresh.square().sum())
    assert torch.equal(y, fresh) and not torch.equal(y, x.detach()[[0, 3]])


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
