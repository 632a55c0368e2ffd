"""Write the EDM key manifests and golden-parity fixtures from the official NVlabs/edm code.

    git clone https://github.com/NVlabs/edm /tmp/edm
    python tests/generate/make_edm_fixtures.py --edm_repo /tmp/edm

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/<name>.json       state_dict keys and shapes of the official EDMPrecond for each released checkpoint
  tests/fixtures/edm_<arch>.safetensors
                                    a tiny official network with random weights (under the real key names), inputs
                                    and the official outputs, for ddpmpp, ncsnpp and adm: `output.<case>` in float32
                                    as the official code runs, `output.<case>.f64` from the same code run in float64
                                    on the same weights and inputs (see fixture_tools.py)
"""

import argparse
import copy
import json
import math
import os
import sys

import torch
from fixture_tools import float64, report, save_fixture

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# The official training options behind each released pickle (NVlabs/edm train.py: --arch, --cond, --augment).
DDPMPP = dict(
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    augment_dim=9,
)
NCSNPP = dict(
    DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]
)
ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4])
RELEASED = {
    "edm-cifar10-32x32-cond-vp": dict(img_resolution=32, label_dim=10, **DDPMPP),
    "edm-cifar10-32x32-uncond-vp": dict(img_resolution=32, label_dim=0, **DDPMPP),
    "edm-cifar10-32x32-cond-ve": dict(img_resolution=32, label_dim=10, **NCSNPP),
    "edm-cifar10-32x32-uncond-ve": dict(img_resolution=32, label_dim=0, **NCSNPP),
    "edm-imagenet-64x64-cond-adm": dict(img_resolution=64, label_dim=1000, **ADM),
}
TINY = dict(img_resolution=8, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4])


def randomize(net, generator):
    """Replace every weight by a random value of sensible scale, so zero-initialised layers are exercised too."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


@torch.no_grad()
def official_outputs(net, x, sigma, labels, augment):
    out = {"cond": net(x, sigma, labels), "uncond": net(x, sigma)}
    out["cond_augment"] = net(x, sigma, labels, augment_labels=augment)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edm_repo", required=True, help="checkout of https://github.com/NVlabs/edm")
    args = parser.parse_args()
    sys.path.insert(0, args.edm_repo)
    from training import networks
    from training.networks import EDMPrecond

    os.makedirs(os.path.join(TESTS, "manifests"), exist_ok=True)
    for name, kwargs in RELEASED.items():
        with torch.device("meta"):
            net = EDMPrecond(img_channels=3, **kwargs)
        manifest = {k: list(v.shape) for k, v in net.state_dict().items()}
        with open(os.path.join(TESTS, "manifests", f"{name}.json"), "w") as f:
            json.dump(manifest, f, indent=0)
        print(f"{name}: {len(manifest)} keys, {sum(math.prod(s) for s in manifest.values()):,} numbers")

    g = torch.Generator().manual_seed(0)
    # ADM gives a block out_channels // 64 attention heads: 32 base channels put one head at the 4x4 level.
    for arch, kwargs in (("ddpmpp", DDPMPP), ("ncsnpp", NCSNPP), ("adm", dict(ADM, augment_dim=9))):
        torch.manual_seed(0)
        kw = {**kwargs, **TINY, **(dict(model_channels=32, num_blocks=1) if arch == "adm" else {})}
        net = EDMPrecond(img_channels=3, dropout=0, **kw).eval()
        randomize(net, g)
        tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
        x = torch.randn(4, 3, 8, 8, generator=g)
        sigma = torch.tensor([0.002, 0.5, 10.0, 80.0])
        x = x * (1 + sigma.reshape(-1, 1, 1, 1))
        labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 7, 9]), 10).float()
        augment = torch.randn(4, 9, generator=g)
        tensors["input.x"] = x
        tensors["input.sigma"] = sigma
        tensors["input.labels"] = labels
        tensors["input.augment"] = augment
        tensors.update({f"output.{k}": v for k, v in official_outputs(net, x, sigma, labels, augment).items()})
        net64 = copy.deepcopy(net).double()  # the same weights, exactly
        with float64([networks]):
            outputs = official_outputs(net64, *(v.double() for v in (x, sigma, labels, augment)))
        tensors.update({f"output.{k}.f64": v for k, v in outputs.items()})
        path = os.path.join(TESTS, "fixtures", f"edm_{arch}.safetensors")
        tensors = save_fixture(path, tensors, {"generator": "tests/generate/make_edm_fixtures.py", "official": json.dumps(kw)})  # fmt: skip
        report(tensors, f"edm {arch}")


if __name__ == "__main__":
    main()
