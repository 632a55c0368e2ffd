"""Write the FID Inception key manifest and golden-parity fixture from pytorch-fid's own code.

    git clone https://github.com/mseitzer/pytorch-fid /tmp/pytorch-fid
    python tests/generate/make_inception_fixtures.py --pytorch_fid_repo /tmp/pytorch-fid

Needs torch, torchvision, numpy and scipy (pytorch-fid's imports). Outputs (committed; the tests need only torch):
  tests/manifests/inception-2015-12-05.json
                        keys and shapes of the state dict that pytorch-fid's `fid_inception_v3()` loads strictly,
                        i.e. of pt_inception-2015-12-05-6726825d.pth
  tests/fixtures/inception_fid.safetensors
                        two 32x32 uint8 images and the 2048-d features pytorch-fid's `InceptionV3` gives them (resize
                        and normalisation included) with deterministic pseudo-random weights under the real key names
                        (`features`, float32, and `features.f64`: the same code run in float64 on the same weights and
                        images, see fixture_tools.py); and two random Gaussians with pytorch-fid's
                        `calculate_frechet_distance` of them

The full network has 23.9M weights, too many to commit; `hashed_weights` makes them from an integer hash of their
position, exactly and identically on every machine, and tests/conftest.py makes them the same way (the fixture keeps
the sum of every tensor, so a difference in the weights shows up as such).
"""

import argparse
import copy
import json
import math
import os
import sys

import torch
from fixture_tools import float64, modules_under, report, save_fixture

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, TESTS)
from hashed_weights import hashed_weights  # noqa: E402  (the tests remake the same weights)


def import_pytorch_fid(repo):
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        # A torchvision built for CUDA next to a CPU-only torch cannot load its C++ operators, and its import then
        # fails on registering two of them. pytorch-fid needs only torchvision's Python model code: declaring the
        # two operators lets that import.
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_pytorch_fid.keep = lib  # the declarations live as long as the Library object
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        import torchvision  # noqa: F401
    sys.path.insert(0, os.path.join(repo, "src"))
    from pytorch_fid import fid_score, inception

    return inception, fid_score


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pytorch_fid_repo", required=True, help="checkout of https://github.com/mseitzer/pytorch-fid")
    args = parser.parse_args()
    inception, fid_score = import_pytorch_fid(args.pytorch_fid_repo)

    # The manifest: build pytorch-fid's network with its weight download replaced by a recorder of the state dict
    # it would load (strictly), then give it the hashed weights through the same path.
    requested = {}

    def load_state_dict_from_url(url, **kwargs):
        assert url.endswith("pt_inception-2015-12-05-6726825d.pth"), url
        return requested["state"]

    inception.load_state_dict_from_url = load_state_dict_from_url
    Inception3 = inception.torchvision.models.inception.Inception3
    load = Inception3.load_state_dict
    Inception3.load_state_dict = lambda self, state, strict=True: requested.setdefault("net", self)
    requested["state"] = None
    net = inception.fid_inception_v3()
    Inception3.load_state_dict = load
    manifest = {k: list(v.shape) for k, v in net.state_dict().items()}
    with open(os.path.join(TESTS, "manifests", "inception-2015-12-05.json"), "w") as f:
        json.dump(manifest, f, indent=0)
    print(f"manifest: {len(manifest)} keys, {sum(math.prod(s) for s in manifest.values()):,} numbers")

    weights = hashed_weights(manifest)
    requested["state"] = weights
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        # What pytorch-fid's get_activations does: images in [0, 1] (ToTensor), pool3 output squeezed.
        features = model(images.float() / 255)[0].squeeze(3).squeeze(2)
    model64 = copy.deepcopy(model).double()  # the same weights, exactly
    with torch.no_grad(), float64(modules_under(args.pytorch_fid_repo)):
        features64 = model64(images.double() / 255)[0].squeeze(3).squeeze(2)
    size = features.abs()
    print(f"features {tuple(features.shape)}: largest {size.max():.4g}, mean size {size.mean():.4g}")

    # Two Gaussians in 64 dimensions with full-rank covariances, and pytorch-fid's distance between them.
    dim = 64
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    a1, a2 = (torch.randn(dim, 2 * dim, generator=g, dtype=torch.float64) for _ in range(2))
    sigma1, sigma2 = a1 @ a1.T / (2 * dim), a2 @ a2.T / (2 * dim)
    frechet = fid_score.calculate_frechet_distance(mu1.numpy(), sigma1.numpy(), mu2.numpy(), sigma2.numpy())

    fixture = {
        "images": images,
        "features": features.contiguous(),
        "features.f64": features64.contiguous(),
        "weight_sums": torch.stack([weights[k].double().sum() for k in manifest]),
        "mu1": mu1,
        "sigma1": sigma1,
        "mu2": mu2,
        "sigma2": sigma2,
        "frechet": torch.tensor([float(frechet)], dtype=torch.float64),
    }
    path = os.path.join(TESTS, "fixtures", "inception_fid.safetensors")
    fixture = save_fixture(path, fixture, {"source": "pytorch-fid InceptionV3, hashed weights"})
    report({k: v for k, v in fixture.items() if k.startswith("features")}, "inception features")
    print(f"frechet distance {fixture['frechet'].item():.6f}")


if __name__ == "__main__":
    main()
