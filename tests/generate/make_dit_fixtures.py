"""Write the DiT/SiT key manifests and golden-parity fixtures from the official DiT and SiT code.

    git clone https://github.com/facebookresearch/DiT /tmp/DiT     # checked at ed81ce2
    git clone https://github.com/willisma/SiT /tmp/SiT             # checked at 947f95b
    pip install timm torchdiffeq
    python tests/generate/make_dit_fixtures.py --dit_repo /tmp/DiT --sit_repo /tmp/SiT

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/<name>.json     state_dict keys and shapes of the official network behind each released checkpoint
  tests/fixtures/dit_tiny.safetensors
                                  a tiny official DiT with random weights (under the real key names), inputs, its
                                  forward and forward_with_cfg outputs, DDIM and DDPM samples of its diffusion code
                                  (5 respaced steps), and that code's beta and alphas_cumprod tables
  tests/fixtures/sit_tiny.safetensors
                                  the same for SiT in SiT's own time convention, with its Euler and Heun ODE samples
Each official output `output.<name>` (float32, as the official code runs) comes again as `output.<name>.f64`: the same
official code (network, diffusion and ODE samplers) run in float64 on the same weights and inputs (see
fixture_tools.py); DDPM's fresh noise is then drawn in float64 from the same seed.
"""

import argparse
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import types

import torch
from fixture_tools import float64, modules_under, report, save_fixture

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
RELEASED = {  # name -> (official family, constructor, latent size)
    "DiT-XL-2-256x256": ("dit", "DiT_XL_2", 32),
    "DiT-XL-2-512x512": ("dit", "DiT_XL_2", 64),
    "SiT-XL-2-256x256": ("sit", "SiT_XL_2", 32),
}
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """timm imports torchvision at module level for data transforms and a frozen batch norm, none of which DiT uses.
    Where the installed torchvision does not load (a build for another torch), stand in for it with empty modules."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        from unittest import mock

        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: mock.MagicMock(name=f"{spec.name}.{attr}")
        return module

    def exec_module(self, module):
        pass


def import_file(name, path):
    """Import an official models.py under its own name (this project has a `models` package too)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(net, generator):
    """Random weights of sensible scale everywhere, so the zero-initialised adaLN and output layers are exercised.
    pos_embed keeps its fixed sin-cos values (the tests compare ours with it)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "pos_embed":
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit_repo", required=True, help="checkout of https://github.com/facebookresearch/DiT")
    parser.add_argument("--sit_repo", required=True, help="checkout of https://github.com/willisma/SiT")
    args = parser.parse_args()
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.modules.pop("torchvision", None)
        sys.meta_path.insert(0, _TorchvisionPlaceholder())
    official = {
        "dit": import_file("official_dit_models", os.path.join(args.dit_repo, "models.py")),
        "sit": import_file("official_sit_models", os.path.join(args.sit_repo, "models.py")),
    }
    sys.path[:0] = [args.dit_repo, args.sit_repo]
    from diffusion import create_diffusion  # DiT's diffusion/
    from transport import Sampler, create_transport  # SiT's transport/

    os.makedirs(os.path.join(TESTS, "manifests"), exist_ok=True)
    for name, (family, constructor, size) in RELEASED.items():
        with torch.device("meta"):
            net = getattr(official[family], constructor)(input_size=size)
        manifest = {k: list(v.shape) for k, v in net.state_dict().items()}
        with open(os.path.join(TESTS, "manifests", f"{name}.json"), "w") as f:
            json.dump(manifest, f, indent=0)
        print(f"{name}: {len(manifest)} keys, {sum(math.prod(s) for s in manifest.values()):,} numbers")

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 3, 10, 9])  # 10 = the null class
    official_code = modules_under(args.dit_repo, args.sit_repo) + list(official.values())

    # DiT: t is the DDPM timestep, an integer in [0, 999].
    torch.manual_seed(0)
    net = official["dit"].DiT(**TINY).eval()
    randomize(net, g)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(4, 4, 8, 8, generator=g)
    full = create_diffusion("")  # all 1000 steps
    five = create_diffusion("5")  # the respacing that sample.py's --num-sampling-steps 5 uses
    tensors.update({f"output.{k}": v for k, v in dit_outputs(net, x, t, labels, noise, five).items()})
    net64 = copy.deepcopy(net).double()  # the same weights, exactly
    with float64(official_code):
        outputs = dit_outputs(net64, x.double(), t, labels, noise.double(), five)
    tensors.update({f"output.{k}.f64": v for k, v in outputs.items()})
    tensors.update({"input.x": x, "input.t": t, "input.labels": labels, "input.noise": noise})
    tensors["schedule.betas"] = torch.from_numpy(full.betas)
    tensors["schedule.alphas_cumprod"] = torch.from_numpy(full.alphas_cumprod)
    write("dit_tiny", tensors, TINY)

    # SiT: t in [0, 1] with t = 0 noise and t = 1 data; the network predicts the velocity data - noise.
    torch.manual_seed(0)
    net = official["sit"].SiT(**TINY).eval()
    randomize(net, g)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])  # exact in float32, and so is 1 - t
    noise = torch.randn(4, 4, 8, 8, generator=g)
    sampler = Sampler(create_transport("Linear", "velocity"))
    tensors.update({f"output.{k}": v for k, v in sit_outputs(net, x, t, labels, noise, sampler).items()})
    net64 = copy.deepcopy(net).double()
    with float64(official_code):
        outputs = sit_outputs(net64, x.double(), t.double(), labels, noise.double(), sampler)
    tensors.update({f"output.{k}.f64": v for k, v in outputs.items()})
    tensors.update({"input.x": x, "input.t": t, "input.labels": labels, "input.noise": noise})
    write("sit_tiny", tensors, TINY)


@torch.no_grad()
def dit_outputs(net, x, t, labels, noise, five):
    out = {"forward": net(x, t, labels)}
    # forward_with_cfg guides the first half of a doubled batch: [x, labels] and [x, null].
    doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 10)]))
    out["cfg"] = net.forward_with_cfg(*doubled, 4.0)[:4]
    kw = dict(clip_denoised=False, model_kwargs=dict(y=labels), device="cpu")
    out["ddim"] = five.ddim_sample_loop(net.forward, noise.shape, noise, **kw)
    torch.manual_seed(7)  # p_sample draws its noise with torch.randn_like from the global generator
    out["ddpm"] = five.p_sample_loop(net.forward, noise.shape, noise, **kw)
    return out


@torch.no_grad()
def sit_outputs(net, x, t, labels, noise, sampler):
    out = {"forward": net(x, t, labels)}
    doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 10)]))
    out["cfg"] = net.forward_with_cfg(*doubled, 4.0)[:4]
    for method in ("euler", "heun2"):  # 5 fixed steps from t = 0 to t = 1
        ode = sampler.sample_ode(sampling_method=method, num_steps=6)  # its time grid in the default dtype
        out[method] = ode(noise, net.forward, y=labels)[-1]
    return out


def write(name, tensors, config):
    path = os.path.join(TESTS, "fixtures", f"{name}.safetensors")
    metadata = {"generator": "tests/generate/make_dit_fixtures.py", "official": json.dumps(config)}
    tensors = save_fixture(path, tensors, metadata)
    # DDPM's float64 run draws other noise (float64 normals from the same seed): not a rounding difference.
    report({k: v for k, v in tensors.items() if k.startswith("output.")}, name, exclude=["output.ddpm"])


if __name__ == "__main__":
    main()
