"""Latent edits (paper section 3.3): SeFa directions, direction files, and e_i = G(w_i + δw; θ_p)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fake_official import RunsCommandWhenUnpickled
from stitchtime_core.editing import edit_latents, load_direction_file, resolve_direction, sefa_directions
from stitchtime_core.errors import InputError

NUM_WS, W_DIM = 10, 64  # the tiny generator's W+


class _CreatesMarker:
    """A pickle payload: unpickling it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def sefa(tiny) -> torch.Tensor:
    return sefa_directions(tiny.generator)


def test_sefa_directions_are_orthonormal_and_shared_by_every_layer(sefa):
    assert sefa.shape == (W_DIM, NUM_WS, W_DIM)
    rows = sefa[:, 0]
    assert torch.allclose(rows @ rows.T, torch.eye(W_DIM), atol=1e-5)
    assert torch.equal(sefa, rows.unsqueeze(1).expand_as(sefa))


def test_sefa_directions_are_the_principal_axes_of_the_style_weights(tiny, sefa):
    A = tiny.generator.style_affine_weights().double()
    A = A / A.norm(dim=1, keepdim=True)
    rows = sefa[:, 0].double()
    energy = (A @ rows.T).square().sum(dim=0)  # ||A d_k||², the eigenvalue of d_k
    assert (energy[:-1] >= energy[1:] - 1e-6).all()  # largest first
    assert energy[0] > 2 * energy[-1]
    top = rows[0]
    assert torch.allclose(A.T @ (A @ top), energy[0] * top, atol=1e-4)  # an eigenvector of AᵀA


def test_strength_zero_reproduces_the_pti_inversion(pivots, pti_run, sefa):
    edited = edit_latents(pivots, [(sefa[0], 0.0)])
    assert torch.equal(edited, pivots)
    G = pti_run.result.generator
    with torch.no_grad():
        assert torch.equal(G.synthesis(edited[:2]), G.synthesis(pivots[:2]))


def test_edit_latents_sums_the_directions(pivots, tiny):
    age, smile = tiny.directions["age"], tiny.directions["smile"]
    edited = edit_latents(pivots, [(age, 2.0), (smile, -1.5)])
    assert edited.shape == pivots.shape
    assert torch.allclose(edited, pivots + 2.0 * age + -1.5 * smile, atol=1e-6)
    # The same offset for every frame, so a frame's edit does not depend on the others.
    offsets = edited - pivots
    assert torch.allclose(offsets, offsets[:1].expand_as(offsets), atol=1e-6)
    assert torch.equal(edit_latents(pivots, []), pivots)
    with pytest.raises(ValueError, match="does not match"):
        edit_latents(pivots, [(age[0], 1.0)])


def test_an_edit_changes_the_image(tiny, pivots, pti_run):
    G = pti_run.result.generator
    with torch.no_grad():
        before = G.synthesis(pivots[:1])
        after = G.synthesis(edit_latents(pivots[:1], [(tiny.directions["age"], 2.0)]))
    assert (after - before).abs().mean() > 0.02


@pytest.mark.parametrize("shape", [[W_DIM], [1, W_DIM], [NUM_WS, W_DIM]])
def test_load_npy_direction(tmp_path, shape):
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float64)
    path = tmp_path / "direction.npy"
    np.save(path, array)
    direction = load_direction_file(path, num_ws=NUM_WS, w_dim=W_DIM)
    assert direction.shape == (NUM_WS, W_DIM) and direction.dtype == torch.float32
    expected = np.broadcast_to(array.reshape(-1, W_DIM), (NUM_WS, W_DIM))
    np.testing.assert_allclose(direction.numpy(), expected, rtol=1e-6)


def test_load_pt_direction(tmp_path):
    tensor = torch.randn([NUM_WS, W_DIM], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.save(tensor, tmp_path / "direction.pt")
    direction = load_direction_file(tmp_path / "direction.pt", num_ws=NUM_WS, w_dim=W_DIM)
    assert direction.dtype == torch.float32
    assert torch.allclose(direction, tensor.float())
    torch.save(tensor[0], tmp_path / "row.pt")
    assert torch.allclose(load_direction_file(tmp_path / "row.pt", num_ws=NUM_WS, w_dim=W_DIM),
                          tensor[0].float().expand(NUM_WS, W_DIM))


@pytest.mark.parametrize("shape", [[W_DIM + 1], [2, W_DIM], [NUM_WS + 1, W_DIM], [NUM_WS, W_DIM, 1], []])
def test_load_direction_rejects_wrong_shapes(tmp_path, shape):
    np.save(tmp_path / "direction.npy", np.zeros(shape, np.float32))
    torch.save(torch.zeros(shape), tmp_path / "direction.pt")
    for name in ("direction.npy", "direction.pt"):
        with pytest.raises(InputError, match="shape"):
            load_direction_file(tmp_path / name, num_ws=NUM_WS, w_dim=W_DIM)


PAYLOADS = pytest.mark.parametrize("payload", [_CreatesMarker, RunsCommandWhenUnpickled],
                                   ids=["open", "os.system"])


@PAYLOADS
def test_load_direction_never_unpickles_an_npy(tmp_path, payload):
    marker, control_marker = tmp_path / "pwned", tmp_path / "control"
    np.save(tmp_path / "evil.npy", np.array([payload(str(marker))], dtype=object), allow_pickle=True)
    np.save(tmp_path / "control.npy", np.array([payload(str(control_marker))], dtype=object),
            allow_pickle=True)
    # The payload is live: numpy's pickle-enabled loader runs it.
    np.load(tmp_path / "control.npy", allow_pickle=True)
    assert control_marker.exists()
    with pytest.raises(InputError, match="not a readable direction file") as error:
        load_direction_file(tmp_path / "evil.npy", num_ws=NUM_WS, w_dim=W_DIM)
    assert error.value.path == str(tmp_path / "evil.npy")
    assert not marker.exists()


@PAYLOADS
def test_load_direction_never_unpickles_a_pt(tmp_path, payload):
    marker, control_marker = tmp_path / "pwned", tmp_path / "control"
    torch.save(payload(str(marker)), tmp_path / "evil.pt")
    torch.save(payload(str(control_marker)), tmp_path / "control.pt")
    # The payload is live: a full (not weights-only) torch.load runs it.
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control_marker.exists()
    with pytest.raises(InputError, match="cannot be read as a tensors-only torch file .*, so it is not a direction "
                                         "file$") as error:
        load_direction_file(tmp_path / "evil.pt", num_ws=NUM_WS, w_dim=W_DIM)
    assert error.value.path == str(tmp_path / "evil.pt")
    assert not marker.exists()


def test_load_direction_rejects_a_pt_holding_a_dict(tmp_path):
    torch.save({"direction": torch.zeros(W_DIM)}, tmp_path / "direction.pt")
    with pytest.raises(InputError, match="holds a dict, expected one tensor"):
        load_direction_file(tmp_path / "direction.pt", num_ws=NUM_WS, w_dim=W_DIM)


def test_load_direction_rejects_missing_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="no such direction file") as info:
        load_direction_file(tmp_path / "missing.npy", num_ws=NUM_WS, w_dim=W_DIM)
    assert info.value.path == str(tmp_path / "missing.npy")
    (tmp_path / "direction.txt").write_text("0.1 0.2")
    with pytest.raises(InputError, match="unknown direction format"):
        load_direction_file(tmp_path / "direction.txt", num_ws=NUM_WS, w_dim=W_DIM)
    (tmp_path / "garbage.npy").write_bytes(os.urandom(64))
    with pytest.raises(InputError, match="not a readable direction file"):
        load_direction_file(tmp_path / "garbage.npy", num_ws=NUM_WS, w_dim=W_DIM)
    (tmp_path / "garbage.pt").write_bytes(b"\x01" + os.urandom(63))  # neither torch.save's zip nor a pickle
    with pytest.raises(InputError, match="garbage.pt: is not a torch file, so it is not a direction file$"):
        load_direction_file(tmp_path / "garbage.pt", num_ws=NUM_WS, w_dim=W_DIM)


def test_resolve_direction(tiny, sefa, tmp_path):
    G, named = tiny.generator, tiny.directions
    assert set(named) == {"age", "smile", "pose"}
    assert torch.equal(resolve_direction("smile", G=G, named=named), named["smile"])
    assert torch.equal(resolve_direction("sefa:3", G=G, named=named), sefa[3])
    assert torch.equal(resolve_direction(f"sefa:{W_DIM - 1}", G=G, named=named), sefa[W_DIM - 1])
    np.save(tmp_path / "mine.npy", np.arange(W_DIM, dtype=np.float32))
    from_file = resolve_direction(str(tmp_path / "mine.npy"), G=G, named=named)
    assert torch.equal(from_file, torch.arange(W_DIM, dtype=torch.float32).expand(NUM_WS, W_DIM))
    with pytest.raises(InputError, match="no such direction file"):
        resolve_direction(str(tmp_path / "missing.pt"), G=G, named=named)


@pytest.mark.parametrize("spec", ["sefa:x", "sefa:", "sefa:-1", f"sefa:{W_DIM}", "sefa:1.5"])
def test_resolve_direction_rejects_bad_sefa_indices(tiny, spec):
    w_dim = tiny.generator.w_dim
    with pytest.raises(ValueError, match=f"^edit '{spec}': sefa:K needs a whole number K from 0 to {w_dim - 1}$"):
        resolve_direction(spec, G=tiny.generator, named=tiny.directions)


def test_resolve_direction_rejects_unknown_names(tiny):
    with pytest.raises(ValueError, match=r"unknown edit direction 'gender'.*\(age, pose, smile\)"):
        resolve_direction("gender", G=tiny.generator, named=tiny.directions)
    with pytest.raises(ValueError, match=r"\(none\)"):
        resolve_direction("age", G=tiny.generator, named={})


def test_the_reference_layout_uses_its_first_row_at_half_strength(tmp_path):
    # STIT's w_directions/*.npy: [18, 512] with equal rows, applied as factor / 2 of row 0.
    row = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    path = tmp_path / "age.npy"
    np.save(path, np.tile(row, (10, 1)))
    direction = load_direction_file(path, num_ws=10, w_dim=64)
    np.testing.assert_allclose(direction.numpy(), np.tile(row / 2, (10, 1)))


def test_per_layer_and_interfacegan_directions_keep_full_strength(tmp_path):
    rows = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float32)
    np.save(tmp_path / "layers.npy", rows)
    np.save(tmp_path / "one.npy", rows[:1])
    np.testing.assert_array_equal(load_direction_file(tmp_path / "layers.npy", num_ws=10, w_dim=64).numpy(), rows)
    np.testing.assert_array_equal(load_direction_file(tmp_path / "one.npy", num_ws=10, w_dim=64).numpy(),
                                  np.tile(rows[:1], (10, 1)))


def test_halving_every_file_reads_its_first_row_as_the_reference(tmp_path):
    # STIT's LatentEditor keeps `arr[0, None]` of any file and applies factor / 2 of it: a per-layer file with
    # unequal rows moves every layer by its row 0.
    rows = np.random.default_rng(3).standard_normal((10, 64)).astype(np.float32)
    np.save(tmp_path / "layers.npy", rows)
    np.save(tmp_path / "one.npy", rows[:1])
    for name in ("layers.npy", "one.npy"):
        np.testing.assert_array_equal(load_direction_file(tmp_path / name, num_ws=10, w_dim=64, halve="all").numpy(),
                                      np.tile(rows[:1] / 2, (10, 1)))


def test_a_direction_with_nan_is_refused(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.full(64, np.nan, np.float32))
    with pytest.raises(InputError, match="NaN"):
        load_direction_file(path, num_ws=10, w_dim=64)
