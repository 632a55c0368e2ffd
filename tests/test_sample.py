"""sample.py end to end, and the path from an official pickle to samples: download.py convert -> strict load -> sample."""

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from models import edm, edm2

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_tiny_grid_and_npz(tmp_path):
    out = tmp_path / "edm"
    result = run("sample.py", "--model", "edm", "--tiny", "--n", "5", "--batch", "3", "--steps", "2", "--npz", "--out_dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    grid = Image.open(out / "samples.png")
    assert grid.size == (3 * 8, 2 * 8)  # 5 images of 8x8 on a 3-column grid
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (5, 8, 8, 3) and data["images"].dtype == np.uint8
    assert data["labels"].shape == (5,) and data["labels"].max() < 10
    assert np.array_equal(np.asarray(grid)[:8, :8], data["images"][0])

    again = run("sample.py", "--model", "edm", "--tiny", "--n", "5", "--batch", "5", "--steps", "2", "--npz", "--out_dir", str(tmp_path / "again"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["labels"], data["labels"])  # the seed fixes them


def test_edm2_student_sampler(tmp_path):
    result = run("sample.py", "--model", "edm2", "--tiny", "--sampler", "student", "--steps", "2", "--n", "4", "--class", "3", "--npz", "--out_dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (np.load(tmp_path / "samples.npz")["labels"] == 3).all()


def test_official_pickle_to_samples(tmp_path):
    """The converter's output loads strictly into models/edm.py, and sample.py samples from it."""
    converted = tmp_path / "converted.safetensors"
    result = run("download.py", "convert", os.path.join(HERE, "fixtures", "pickle_edm_tiny.pkl"), str(converted))
    assert result.returncode == 0, result.stderr
    cfg = edm.Config(img_resolution=8, model_channels=4, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,))
    with torch.device("meta"):
        model = edm.EDMPrecond(cfg)
    edm.load_checkpoint(model, str(converted))  # strict: every key and shape

    student = tmp_path / "student.safetensors"
    save_file(model.state_dict(), str(student), metadata={"config": edm.config_to_json(cfg)})
    result = run("sample.py", "--model", "edm", "--ckpt", str(student), "--sampler", "euler", "--steps", "3", "--n", "2", "--guidance", "1.5", "--out_dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "samples.png").size == (16, 8)


def test_official_edm2_pickle_loads_strictly(tmp_path):
    converted = tmp_path / "converted.safetensors"
    result = run("download.py", "convert", os.path.join(HERE, "fixtures", "pickle_edm2_tiny.pkl"), str(converted))
    assert result.returncode == 0, result.stderr
    cfg = edm2.Config(img_resolution=8, label_dim=10, model_channels=4, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=4)  # fmt: skip
    with torch.device("meta"):
        model = edm2.EDM2Precond(cfg)
    edm2.load_checkpoint(model, str(converted))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run("sample.py", "--model", "edm", "--ckpt", "edm-cifar10-32x32-cond-vp", "--root", str(tmp_path))
    assert result.returncode != 0
    assert "python download.py edm-cifar10-32x32-cond-vp" in result.stderr
    assert "Traceback" not in result.stderr
