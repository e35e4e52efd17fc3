"""The ffhq profile end to end, on a models folder whose files have the official layouts (small shapes)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import alexnet

from stitchtime_core.models.bisenet import BiSeNet
from stitchtime_core.models.e4e import Encoder4Editing
from stitchtime_core.sample_clip import make_sample_clip
from stitchtime_core.video import probe
from cli_runner import run_cli

_spec = importlib.util.spec_from_file_location("fake_official", Path(__file__).parents[1] / "core" / "fake_official.py")
fake_official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_official)

FAST = ["--set", "pti.observations_per_frame=2", "--set", "pti.batch_size=4", "--set", "stitching.steps=2"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    fake_official.write_fake_ada_pickle(folder / "ffhq.pkl", img_resolution=64)
    G = fake_official.fake_generator(img_resolution=64)
    torch.manual_seed(0)
    encoder = Encoder4Editing(stylegan_size=64, input_size=64, widths=(16, 32, 64, G.w_dim))
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 64},
                "latent_avg": G.mapping.w_avg.repeat(G.num_ws, 1)}, folder / "e4e_ffhq_encode.pt")
    torch.save(alexnet(weights=None).state_dict(), folder / "alexnet-owt-7be5be79.pth")
    torch.save(fake_official.seeded_weights(BiSeNet(), seed=1).state_dict(), folder / "79999_iter.pth")
    (folder / "directions").mkdir()
    np.save(folder / "directions" / "age.npy", np.tile(np.random.default_rng(0).standard_normal(G.w_dim), (10, 1)))
    return folder


@pytest.fixture(scope="module")
def env(prefect_server: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_server}


def test_models_verify_and_list_see_the_folder(models_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(["models", "verify", "--profile", "ffhq", "--no-hash", "--models", str(models_dir)], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = json.loads(run_cli(["models", "list", "--profile", "ffhq", "--json", "--models", str(models_dir)], env, tmp_path).stdout)
    present = {row["name"] for row in listed if row["present"]}
    assert present == {"ffhq.pkl", "e4e_ffhq_encode.pt", "alexnet-owt-7be5be79.pth", "79999_iter.pth",
                       "directions/age.npy"}


def test_ffhq_profile_edits_a_clip_with_the_official_file_layouts(models_dir: Path, env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    make_sample_clip(clip, seconds=0.4, size=(192, 192))
    out = tmp_path / "edited.mp4"
    result = run_cli(["edit", str(clip), "--profile", "ffhq", "--models", str(models_dir), "--edit", "age=4",
                      "--out", str(out), "--store", str(tmp_path / "data"), "--quality", "paper", "--json", *FAST],
                     env, tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["profile"] == "ffhq" and summary["quality"] == "paper" and summary["reused_stages"] == []
    # With the face-parsing file present, masks come from BiSeNet (landmarks where it finds no face).
    assert summary["stitching"]["masks"] == "bisenet"
    assert probe(out).frame_count == probe(clip).frame_count == 10
    config = json.loads(out.with_name("edited.config.json").read_text())
    assert config["pti"]["lr"] == 3e-5 and config["stitching"]["lr"] == 3e-4  # the paper's values
