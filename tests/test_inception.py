"""models/inception.py: keys of the real checkpoint, parity with pytorch-fid, strict loading, the Frechet distance.

The fixture and manifest come from tests/generate/make_inception_fixtures.py (pytorch-fid's own network). Its weights
are too many to commit; the `inception_weights` fixture (conftest.py) remakes them exactly as the generator made them.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models import inception

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "manifests", "inception-2015-12-05.json")
FIXTURE = os.path.join(HERE, "fixtures", "inception_fid.safetensors")


def manifest():
    with open(MANIFEST) as f:
        return json.load(f)


def test_keys_and_shapes_match_the_real_checkpoint():
    with torch.device("meta"):
        model = inception.InceptionV3()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest()
    assert list(ours) == list(manifest())  # the same order too: the modules are declared as torchvision's
    assert sum(math.prod(s) for s in ours.values()) == 23_885_486


# The fixture holds pytorch-fid's features in float32 (`features`) and from the same pytorch-fid code run in float64 on
# the same weights and images (`features.f64`, tests/generate/fixture_tools.py). Bounds, relative to the feature scale:
# - float64 against float64: 1e-12. Measured 0 (1 thread) and 8e-16 (2 threads): float64 rounding, which no CPU moves
#   to 1e-12.
# - float32 against pytorch-fid's float32: 20x pytorch-fid's own float32 error on the fixture (its float32 vs float64
#   features, measured 3.2e-7; ours against it 1.9e-7..2.5e-7).
F64_BOUND = 1e-12
F32_FACTOR = 20


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def fixture_and_model(inception_weights):
    fixture = load_file(FIXTURE)
    weights = load_file(inception_weights)
    sums = torch.stack([weights[k].double().sum() for k in manifest()])
    assert torch.allclose(sums, fixture["weight_sums"], rtol=1e-12, atol=1e-9), "the hashed weights changed"
    return fixture, inception.from_pretrained(str(inception_weights))


def test_features_match_pytorch_fid(inception_weights):
    """Ours in float64 against pytorch-fid in float64; bound F64_BOUND (measured above)."""
    fixture, model = fixture_and_model(inception_weights)
    model.double()
    with torch.no_grad():
        features = model(fixture["images"])  # uint8 (2, 3, 32, 32): resized to 299 inside
    want = fixture["features.f64"]
    assert features.shape == want.shape == (2, inception.FEATURE_DIM) and features.dtype == torch.float64
    error = relative_error(features, want)
    assert error < F64_BOUND, f"max abs error {error:.2e} of the output scale"


def test_float32_features_match_pytorch_fid_float32(inception_weights):
    """Ours in float32 against pytorch-fid in float32 (uint8 images to [0, 1] in float32, as its ToTensor); bound
    F32_FACTOR x pytorch-fid's own float32 error on the fixture."""
    fixture, model = fixture_and_model(inception_weights)
    with torch.no_grad():
        features = model(fixture["images"])
    want = fixture["features"]
    assert features.shape == want.shape and features.dtype == torch.float32
    bound = F32_FACTOR * relative_error(want.double(), fixture["features.f64"])
    error = relative_error(features, want)
    assert error < bound, f"max abs error {error:.2e} of the output scale, bound {bound:.1e}"

    floats = model(fixture["images"].float() / 255)  # the same images as floats in [0, 1]: the same input
    assert torch.equal(floats, features)


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    state = {k: torch.zeros(s) for k, s in manifest().items()}
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["Mixed_7c.branch_pool.conv.weight_typo"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as e:
        inception.from_pretrained(str(path))
    message = str(e.value)
    assert "missing:    Mixed_7c.branch_pool.conv.weight (192, 2048, 1, 1)" in message
    assert "unexpected: Mixed_7c.branch_pool.conv.weight_typo" in message
    assert "shape:      fc.weight checkpoint (1000, 2048) != model (1008, 2048)" in message


def test_missing_weights_name_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python download.py inception"):
        inception.from_pretrained(root=str(tmp_path))


# ----------------------------------------------------------------------------
# Frechet distance and feature statistics


def frechet_by_eigvals(mu1, sigma1, mu2, sigma2):
    """The textbook form with numpy: tr((S1 S2)^(1/2)) as the sum of square roots of the eigenvalues of S1 S2."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(t, dtype=np.float64) for t in (mu1, sigma1, mu2, sigma2))
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)
    return ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum()


def random_covariance(dim, rank, generator):
    a = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    return a @ a.T / rank


def test_frechet_matches_pytorch_fid():
    """pytorch-fid's distance, float64 (numpy and scipy); measured 1e-16..2.5e-16 relative, bound 1e-9."""
    f = load_file(FIXTURE)
    got = inception.frechet_distance(f["mu1"], f["sigma1"], f["mu2"], f["sigma2"])
    assert got == pytest.approx(f["frechet"].item(), rel=1e-9)


def test_frechet_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(8, generator=g), torch.randn(8, generator=g)
    var1, var2 = torch.rand(8, generator=g) + 0.1, torch.rand(8, generator=g) + 0.1
    # Commuting covariances: (S1 S2)^(1/2) = diag(sqrt(var1 var2)), so the trace terms are sum((sd1 - sd2)^2).
    expected = ((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum()
    got = inception.frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("rank", [32, 4])  # full rank, and singular, as with fewer samples than features
def test_frechet_matches_eigvals_form_and_is_symmetric(rank):
    g = torch.Generator().manual_seed(rank)
    mu1, mu2 = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    sigma1, sigma2 = random_covariance(16, rank, g), random_covariance(16, rank, g)
    got = inception.frechet_distance(mu1, sigma1, mu2, sigma2)
    # float64 throughout. Measured: against the eigenvalue form 1e-16 (rank 32), 1e-9 (rank 4: the square root of a
    # singular product is ill-conditioned); swapped arguments 3e-16 and 5e-10. Bounds 1e-6 and 1e-7.
    assert got == pytest.approx(frechet_by_eigvals(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert got == pytest.approx(inception.frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-7)


def test_frechet_of_identical_stats_is_zero():
    # Like Inception features: non-negative (after a ReLU and a mean), of different scales, some units that never fire.
    features = torch.randn(500, 64, generator=torch.Generator().manual_seed(4)).relu() * torch.logspace(-3, 3, 64)
    features[:, :8] = 0
    mu, sigma = inception.feature_stats(features)
    distance = inception.frechet_distance(mu, sigma, mu, sigma)
    assert 0 <= distance <= 1e-9 * sigma.trace().item()


def test_feature_stats_match_numpy():
    features = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    mu, sigma = inception.feature_stats(features)
    assert mu.dtype == sigma.dtype == torch.float64
    assert np.allclose(mu.numpy(), features.numpy().mean(0)) and np.allclose(sigma.numpy(), np.cov(features.numpy().T))


def test_running_stats_equal_feature_stats():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(1)).relu() + 5  # a mean far from zero
    running = inception.FeatureStats(dim=16)
    for batch in features.split(64):
        running.update(batch)
    mu, sigma = running.mean_cov()
    want_mu, want_sigma = inception.feature_stats(features)
    assert torch.allclose(mu, want_mu, rtol=1e-12) and torch.allclose(sigma, want_sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        inception.FeatureStats(dim=16).mean_cov()
