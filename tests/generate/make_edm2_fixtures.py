"""Write the EDM2 key manifests and the golden-parity fixture from the official NVlabs/edm2 code.

    git clone https://github.com/NVlabs/edm2 /tmp/edm2
    python tests/generate/make_edm2_fixtures.py --edm2_repo /tmp/edm2

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/edm2-img64-{s,m,l,xl}-fid.json
                        state_dict keys (in order) and shapes of the official Precond for each released checkpoint,
                        0-dim gains written as [1] (what download.py's converted checkpoint holds)
  tests/fixtures/edm2_tiny.safetensors
                        the official Precond at models/edm2.py's "tiny" config (half width) with random weights under the real key
                        names (stored as float16 and rounded to it before the official run, so they are exact; gains as
                        [1]), inputs `input.*`, the official float32 outputs `output.*` (x0 and logvar, with and
                        without labels, at two sigma pairs), and `forced_norm.<key>`: the row norms of every MPConv
                        weight after the official forced weight normalisation (one training-mode forward); and each
                        output again as `<key>.f64`, from the same official code run in float64 on the same weights
                        and inputs (see fixture_tools.py)
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

# The official options behind each released ImageNet-64 pickle (NVlabs/edm2 train_edm2.py presets edm2-img64-*;
# dropout does not change the keys).
COMMON = dict(img_resolution=64, img_channels=3, label_dim=1000)
RELEASED = {
    "edm2-img64-s-fid": dict(COMMON, model_channels=192),
    "edm2-img64-m-fid": dict(COMMON, model_channels=256),
    "edm2-img64-l-fid": dict(COMMON, model_channels=320),
    "edm2-img64-xl-fid": dict(COMMON, model_channels=384),
}
# models/edm2.py CONFIGS["tiny"] at half its width (model_channels 8, not 16; 4 heads of 4 channels), which keeps the
# committed file under 200 KB (the full tiny width gives 390 KB) and runs the same code paths.
TINY = dict(
    img_resolution=8, img_channels=3, label_dim=10, model_channels=8, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[4], channels_per_head=4,
)  # fmt: skip


def randomize(net, generator):
    """Random weights with random row scales (exercising the normalisation), non-zero gains, all float16-exact."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:  # out_gain, emb_gain: zero in the official init, which would hide whole branches
                p.copy_(0.3 + 0.7 * torch.rand([], generator=generator))
            else:
                rows = torch.exp(0.5 * torch.randn([p.shape[0]] + [1] * (p.ndim - 1), generator=generator))
                p.copy_(torch.randn(p.shape, generator=generator) * rows)
        for p in net.state_dict().values():
            p.copy_(p.half().float())


@torch.no_grad()
def official_outputs(net, x, sigma, labels):
    cond, logvar = net(x, sigma, labels, return_logvar=True)
    return {"cond": cond, "uncond": net(x, sigma), "logvar": logvar.reshape(-1, 1)}


@torch.no_grad()
def forced_norms(trained, x, sigma, labels, MPConv):
    trained(x, sigma, labels, return_logvar=True)
    return {f"forced_norm.{n}.weight": m.weight.flatten(1).norm(dim=1) for n, m in trained.named_modules() if isinstance(m, MPConv)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edm2_repo", required=True, help="checkout of https://github.com/NVlabs/edm2")
    args = parser.parse_args()
    sys.path.insert(0, args.edm2_repo)
    from training import networks_edm2
    from training.networks_edm2 import MPConv, Precond

    os.makedirs(os.path.join(TESTS, "manifests"), exist_ok=True)
    for name, kwargs in RELEASED.items():
        with torch.device("meta"):
            net = Precond(**kwargs)
        manifest = {k: list(v.shape) or [1] for k, v in net.state_dict().items()}
        with open(os.path.join(TESTS, "manifests", f"{name}.json"), "w") as f:
            json.dump(manifest, f, indent=0)
        print(f"{name}: {len(manifest)} keys, {sum(math.prod(s) for s in manifest.values()):,} numbers")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = Precond(use_fp16=False, dropout=0, **TINY).eval()
    randomize(net, g)
    tensors = {k: v.reshape(v.shape or [1]).half().contiguous() for k, v in net.state_dict().items()}

    labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    net64 = copy.deepcopy(net).double()  # the same weights, exactly
    for suffix, sigma in (("", [0.5, 10.0]), ("2", [0.002, 80.0])):
        sigma = torch.tensor(sigma)
        x = torch.randn(2, 3, 8, 8, generator=g) * 0.5 + torch.randn(2, 3, 8, 8, generator=g) * sigma.reshape(-1, 1, 1, 1)  # fmt: skip
        tensors[f"input.x{suffix}"] = x
        tensors[f"input.sigma{suffix}"] = sigma
        tensors.update({f"output.{k}{suffix}": v for k, v in official_outputs(net, x, sigma, labels).items()})
        with float64([networks_edm2]):
            outputs = official_outputs(net64, x.double(), sigma.double(), labels.double())
        tensors.update({f"output.{k}{suffix}.f64": v for k, v in outputs.items()})
    tensors["input.labels"] = labels

    # Forced weight normalisation as the official code does it: inside MPConv.forward in training mode.
    x, sigma = tensors["input.x"], tensors["input.sigma"]
    tensors.update(forced_norms(copy.deepcopy(net).train(), x, sigma, labels, MPConv))
    trained64 = copy.deepcopy(net64).train()
    with float64([networks_edm2]):
        norms = forced_norms(trained64, x.double(), sigma.double(), labels.double(), MPConv)
    tensors.update({f"{k}.f64": v for k, v in norms.items()})

    path = os.path.join(TESTS, "fixtures", "edm2_tiny.safetensors")
    tensors = save_fixture(path, tensors, {"generator": "tests/generate/make_edm2_fixtures.py", "official": json.dumps(TINY)})  # fmt: skip
    report({k: v for k, v in tensors.items() if k.startswith("output.")}, "edm2 outputs")
    report({k: v for k, v in tensors.items() if k.startswith("forced_norm.")}, "edm2 forced norms")


if __name__ == "__main__":
    main()
