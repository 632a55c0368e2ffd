"""toy.py: the procedural dataset, the shipped classifier and the toy FID / class accuracy metrics."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def classifier():
    return toy.load_classifier()


# ----------------------------------------------------------------------------
# Data


def test_batch_shapes_range_and_dtypes():
    images, labels = toy.toy_batch(1000, seeded(0))
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (1000,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert set(labels.tolist()) == set(range(10)) == set(range(len(toy.class_names)))
    # Anti-aliased edges: pixels between background and shape exist, not just two levels per image.
    assert len(torch.unique(images[0])) > 100


def test_batch_is_deterministic_given_the_generator():
    a, la = toy.toy_batch(64, seeded(5))
    b, lb = toy.toy_batch(64, seeded(5), device="cpu")
    c, _ = toy.toy_batch(64, seeded(6))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_requested_labels_are_drawn():
    labels = torch.tensor([3, 3, 0, 9])
    _, drawn = toy.toy_batch(4, seeded(0), labels=labels)
    assert torch.equal(drawn, labels)


def test_classes_differ_far_more_than_sampling_noise():
    """Per-class mean images: any two classes are further apart than two independent estimates of one class."""
    labels = torch.arange(10000) % 10
    means = [toy.toy_batch(10000, seeded(seed), labels=labels)[0].view(1000, 10, -1).mean(0) for seed in (1, 2)]
    between = torch.cdist(means[0], means[0])[~torch.eye(10, dtype=torch.bool)].min()  # closest pair of classes
    within = (means[0] - means[1]).norm(dim=1).max()
    assert between > 2 * within, (between, within)


# ----------------------------------------------------------------------------
# Classifier


def test_shipped_classifier_is_accurate(classifier):
    assert 50_000 <= sum(p.numel() for p in classifier.parameters()) <= 200_000
    assert toy.accuracy(classifier, 1000, seed=3) >= 0.97
    with safe_open(toy.DEFAULT_CLASSIFIER, "pt") as f:
        metadata = f.metadata()
    assert {"steps", "seed", "held_out_accuracy"} <= set(metadata)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        toy.load_classifier(str(tmp_path / "missing.safetensors"))
    state = dict(toy.ToyClassifier().state_dict(), extra=torch.zeros(1))
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(RuntimeError, match="extra"):
        toy.load_classifier(str(tmp_path / "extra.safetensors"))


# ----------------------------------------------------------------------------
# Toy FID and class accuracy


def test_toy_fid_separates_real_images_from_noise_and_collapse(classifier):
    labels = torch.arange(1000) % 10
    real = toy.evaluate(classifier, toy.toy_batch(1000, seeded(11), labels=labels)[0], labels)
    noise = toy.evaluate(classifier, torch.randn(1000, 3, 32, 32, generator=seeded(12)), labels)
    one_class = toy.toy_batch(1000, seeded(13), labels=torch.full((1000,), 3))[0]
    collapsed = toy.evaluate(classifier, one_class, labels)
    assert real["accuracy"] >= 0.97 and real["fid"] < 100
    assert noise["fid"] > 100 * real["fid"] and collapsed["fid"] > 100 * real["fid"]
    assert collapsed["accuracy"] == pytest.approx(0.1)  # only the requests for class 3 are met


def test_reference_stats_are_deterministic_and_cached(classifier):
    assert toy.reference_stats(classifier) is toy.reference_stats(classifier)  # computed once per classifier
    copies = [toy.ToyClassifier() for _ in range(2)]
    for copy in copies:
        copy.load_state_dict(classifier.state_dict())
    (mu1, sigma1), (mu2, sigma2) = (toy.reference_stats(copy, n=500) for copy in copies)  # two separate computations
    assert torch.equal(mu1, mu2) and torch.equal(sigma1, sigma2)


# ----------------------------------------------------------------------------
# Command line and style


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_preview_and_help(tmp_path):
    result = run("toy.py", "preview", "--out", str(tmp_path / "toy.png"), "--per_class", "3", "--zoom", "1")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "toy.png").size == (3 * 32, 10 * 32)
    usage = run("toy.py")
    assert usage.returncode == 0 and len(usage.stdout.strip().splitlines()) == 1 and "train-classifier" in usage.stdout


def test_ruff_clean():
    pytest.importorskip("ruff")
    files = ["toy.py", "tests/test_toy.py"]
    for command in (["format", "--check"], ["check"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command, *files], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
