"""Write the Cosmos Predict 2.5 key manifests and golden-parity fixture from FastGen's port of the official network.

    git clone https://github.com/NVlabs/FastGen /tmp/fastgen      # checked at 34f30e8
    pip install --target /tmp/oracle-extra einops omegaconf loguru attrs
    PYTHONPATH=/tmp/oracle-extra python tests/generate/make_cosmos_predict2_fixtures.py --fastgen_repo /tmp/fastgen

(needs torch, diffusers, transformers and scipy as FastGen imports them at module level; a torchvision that does not
load is replaced by empty modules, since nothing here uses it.)

FastGen's `CosmosPredict2DiT` re-implements the official `MiniTrainDIT` (cosmos-predict2.5, networks/minimal_v4_dit.py)
with the same module names, so its state dict, less FastGen's `transformer.` prefix, is the official checkpoint's
(which prefixes `net.` and adds training counters and Transformer Engine `_extra_state` entries; see the model file).

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/cosmos-predict2.5-2b.json, cosmos-predict2.5-14b.json
                                  keys and shapes of the full-size networks, built on the meta device with the
                                  configs of fastgen/configs/net.py (logvar head off, as there)
  tests/fixtures/cosmos_predict2_tiny.safetensors
                                  a tiny network with random weights (real key names), fixed inputs, and FastGen's
                                  outputs: text2world flow, video2world flow (condition mask, replaced frames, per-frame
                                  times) and x0 (per-sample times), a given padding mask, and block features
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import types

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
FULL = {  # fastgen/configs/net.py: CosmosPredict2_2B_Config and its 14B override
    "cosmos-predict2.5-2b": dict(model_channels=2048, num_blocks=28, num_heads=16),
    "cosmos-predict2.5-14b": dict(model_channels=5120, num_blocks=36, num_heads=40),
}
TINY = dict(
    model_channels=32,
    num_blocks=2,
    num_heads=2,
    max_img_h=16,
    max_img_w=16,
    max_frames=8,
    in_channels=4,
    out_channels=4,
    crossattn_emb_channels=16,
    crossattn_proj_in_channels=40,
    adaln_lora_dim=8,
)


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """transformers and diffusers probe torchvision at import; where the installed one does not load (a build for
    another torch), stand in for it with empty modules. Nothing used here needs it."""

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


def strip(key):
    assert key.startswith("transformer."), key
    return key[len("transformer.") :]


def randomize(net, generator):
    """Random weights of sensible scale everywhere (FastGen zero-initialises the adaLN up-projections); norm gains
    near 1. The RoPE buffers keep their values."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[1]))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fastgen_repo", default="/tmp/fastgen")
    args = parser.parse_args()
    sys.meta_path.insert(0, _TorchvisionPlaceholder())
    sys.path.insert(0, args.fastgen_repo)
    from fastgen.networks.cosmos_predict2.network import CosmosPredict2

    for name, sizes in FULL.items():
        with torch.device("meta"):
            net = CosmosPredict2(**sizes, enable_logvar_linear=False)
        manifest = {strip(k): list(v.shape) for k, v in net.state_dict().items()}
        with open(os.path.join(TESTS, "manifests", f"{name}.json"), "w") as f:
            json.dump(manifest, f, indent=0)
        print(name, len(manifest), "keys", sum(math.prod(s) for s in manifest.values()), "numbers")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = CosmosPredict2(**TINY, enable_logvar_linear=False).eval()
    randomize(net, g)
    B, C, T, H, W = 2, 4, 3, 8, 8
    x = torch.randn(B, C, T, H, W, generator=g)
    t = torch.tensor([0.3, 0.8])
    text = torch.randn(B, 6, 40, generator=g)
    cond_latents = torch.randn(B, C, 1, H, W, generator=g)
    mask = torch.zeros(B, 1, T, H, W)
    mask[:, :, :1] = 1.0
    t_frames = t[:, None] * (1 - mask[:, 0, :, 0, 0])  # conditioned frames at time 0, as FastGen's sampler
    padding = (torch.rand(B, 1, 2 * H, 2 * W, generator=g) > 0.5).float()  # pixel-sized: resized to the latent
    v2w = {"text_embeds": text, "conditioning_latents": cond_latents, "condition_mask": mask}
    with torch.no_grad():
        out = {
            "output.t2w": net(x, t, text),
            "output.v2w": net(x, t_frames, v2w),
            # x0 with per-sample times: FastGen's conversion does not broadcast per-frame times (B, T) over (B, C, T, H, W)
            "output.v2w_x0": net(x, t, v2w, fwd_pred_type="x0"),
            "output.padding": net(x, t, text, padding_mask=padding),
        }
        flow, features = net(x, t, text, feature_indices={0, 1})
        assert torch.equal(flow, out["output.t2w"])
        out["output.features0"], out["output.features1"] = features
    tensors = {strip(k): v.contiguous() for k, v in net.state_dict().items()}
    tensors.update(
        {
            "input.x": x,
            "input.t": t,
            "input.t_frames": t_frames,
            "input.text": text,
            "input.cond_latents": cond_latents,
            "input.condition_mask": mask,
            "input.padding_mask": padding,
            **out,
        }
    )
    path = os.path.join(TESTS, "fixtures", "cosmos_predict2_tiny.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"config": json.dumps(TINY)})
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
