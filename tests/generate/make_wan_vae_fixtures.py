"""Write the Wan 2.1 VAE key manifest and golden-parity fixture from diffusers' AutoencoderKLWan.

    pip install diffusers   # with requirements-dev.txt
    python tests/generate/make_wan_vae_fixtures.py [ORIGINAL_VAE_PY]

ORIGINAL_VAE_PY (optional): the original model code, Wan2.1's wan/modules/vae.py or its copy in cosmos-predict2.5
(cosmos_predict2/_src/predict2/tokenizers/wan2pt1.py); given, the original-layout manifest is written too.

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/wan_vae-2.1.json     state_dict keys and shapes of the released Wan 2.1 VAE
                                       (Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae, also Cosmos Predict 2.5's), built from its
                                       config.json values on the meta device
  tests/manifests/wan_vae-2.1-original.json
                                       the same for the original release's layout (Wan2.1_VAE.pth), from the original
                                       model classes on the meta device; checked here to map onto the diffusers
                                       manifest through diffusers' own converter (convert_wan_vae_to_diffusers)
  tests/fixtures/wan_vae_tiny.safetensors
                                       a tiny diffusers AutoencoderKLWan with random weights (under the real key names)
                                       and the real model's level structure; a 13-frame video (first frame + 3 chunks of
                                       4) and a one-frame image; diffusers' posterior mean and log-variance of both, a
                                       posterior sample drawn with a seeded generator, the decoded posterior mean as
                                       diffusers' decode returns it (clamped) and unclamped (its own frame-by-frame loop
                                       without the final clamp); the metadata holds the model's config.json. Each
                                       output `output.X` is there twice: diffusers in float32, and as `output.X.f64`
                                       diffusers in float64 on the same weights and inputs (cast exactly; decoding
                                       the float32 `output.mean` / `output.image_mean`; no `output.decoded.f64`,
                                       which is `output.decoded_raw.f64` clamped), float32 meaning float64
                                       throughout (reference_float64.py)
"""

import json
import math
import os
import sys

import torch
from reference_float64 import float32_is_float64, keep_committed, print_float32_error
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae (the class defaults are these values too).
# fmt: off
WAN21 = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
)
# fmt: on
# The same level structure at a CPU size: spatial-only first transition, then two spatio-temporal ones.
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.5, 2.0, 1.0],
)


def import_diffusers():
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        # A torchvision built for CUDA next to a CPU-only torch cannot load its C++ operators, and its import (which
        # diffusers triggers through transformers) then fails on registering two of them; declaring them lets it load.
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_diffusers.keep = lib  # the declarations live as long as the Library object
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan


def randomize(net, generator):
    """Replace every weight by a random value of sensible scale, so that norm gains and biases are exercised too."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def decode_unclamped(vae, z):
    """diffusers' AutoencoderKLWan._decode (post_quant_conv, then one latent frame at a time through the decoder with
    its feature cache) without the final clamp, so that parity is tested on every output value."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(
            vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
        )
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def float64_outputs(AutoencoderKLWan, vae, tensors):
    """The outputs of the same VAE built in float64 with the same weights, on the fixture's inputs cast to float64;
    decoding starts from the fixture's float32 posterior means (cast), as the tests do; the posterior sample draws its
    noise in float64 (so it differs from the float32 sample by the draw, not by rounding)."""
    with torch.no_grad(), float32_is_float64():
        vae64 = AutoencoderKLWan.from_config(vae.config).eval()
        vae64.load_state_dict(vae.state_dict())
        assert all(v.dtype == torch.float64 for v in vae64.state_dict().values())
        video, image = tensors["input.video"].double(), tensors["input.image"].double()
        mean, image_mean = tensors["output.mean"].double(), tensors["output.image_mean"].double()
        posterior = vae64.encode(video).latent_dist
        out = {
            "output.mean": posterior.mean,
            "output.logvar": posterior.logvar,
            "output.sample": posterior.sample(generator=torch.Generator().manual_seed(7)),  # float64 draws
            "output.decoded_raw": decode_unclamped(vae64, mean),
            "output.image_mean": vae64.encode(image).latent_dist.mean,
            "output.image_decoded_raw": decode_unclamped(vae64, image_mean),
        }
        # output.decoded is output.decoded_raw clamped (checked for float32 below): its float64 twin is not stored
        assert torch.equal(out["output.decoded_raw"].clamp(-1, 1), vae64.decode(mean).sample)
    return {f"{k}.f64": v for k, v in out.items()}


def original_manifest(source_path, diffusers_keys):
    """Keys and shapes of the original WanVAE_ with the released config, built from its source on the meta device."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from torch import nn
    from torch.nn import functional as F

    source = open(source_path).read()
    # Only the model classes (CACHE_T up to the loader helper): the module's imports pull in the rest of its repo.
    source = source[source.index("CACHE_T = 2") : source.index("def _video_vae")]
    namespace = {"torch": torch, "nn": nn, "F": F, "rearrange": None}
    exec(compile(source, source_path, "exec"), namespace)
    config = dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[])
    with torch.device("meta"):
        original = namespace["WanVAE_"](**config, temperal_downsample=[False, True, True], dropout=0.0)
    keys = {k: list(v.shape) for k, v in original.state_dict().items()}
    converted = {k: list(v.shape) for k, v in convert_wan_vae_to_diffusers(original.state_dict()).items()}
    assert converted == diffusers_keys, "diffusers' converter should map the original layout onto AutoencoderKLWan's"
    return keys


def main():
    AutoencoderKLWan = import_diffusers()
    with torch.device("meta"):
        full = AutoencoderKLWan(**WAN21)
    keys = {k: list(v.shape) for k, v in full.state_dict().items()}
    path = os.path.join(TESTS, "manifests", "wan_vae-2.1.json")
    with open(path, "w") as f:
        json.dump(keys, f, indent=0)
    print(f"{path}: {len(keys)} keys, {sum(math.prod(s) for s in keys.values()):,} numbers")
    if len(sys.argv) > 1:
        original = original_manifest(sys.argv[1], keys)
        path = os.path.join(TESTS, "manifests", "wan_vae-2.1-original.json")
        with open(path, "w") as f:
            json.dump(original, f, indent=0)
        print(f"{path}: {len(original)} keys")

    g = torch.Generator().manual_seed(0)
    vae = AutoencoderKLWan(**TINY).eval()
    randomize(vae, g)
    tensors = dict(vae.state_dict())
    video = torch.rand(2, 3, 13, 16, 24, generator=g) * 2 - 1
    image = torch.rand(2, 3, 1, 16, 24, generator=g) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(video).latent_dist
        tensors["input.video"] = video
        tensors["input.image"] = image
        tensors["output.mean"] = posterior.mean
        tensors["output.logvar"] = posterior.logvar
        tensors["output.sample"] = posterior.sample(generator=torch.Generator().manual_seed(7))
        tensors["output.decoded"] = vae.decode(posterior.mean).sample
        tensors["output.decoded_raw"] = decode_unclamped(vae, posterior.mean)
        assert torch.equal(tensors["output.decoded_raw"].clamp(-1, 1), tensors["output.decoded"])
        tensors["output.image_mean"] = vae.encode(image).latent_dist.mean
        tensors["output.image_decoded_raw"] = decode_unclamped(vae, tensors["output.image_mean"])
    path = os.path.join(TESTS, "fixtures", "wan_vae_tiny.safetensors")
    tensors = keep_committed(path, {k: v.contiguous() for k, v in tensors.items()})
    tensors.update(float64_outputs(AutoencoderKLWan, vae, tensors))
    metadata = {"generator": "tests/generate/make_wan_vae_fixtures.py", "config": vae.to_json_string()}
    save_file(keep_committed(path, {k: v.contiguous() for k, v in tensors.items()}), path, metadata=metadata)
    print_float32_error("wan_vae_tiny", tensors)
    raw = tensors["output.decoded_raw"]
    print(
        f"{path}: {os.path.getsize(path) / 1e3:.0f} KB, latents {tuple(posterior.mean.shape)}, video {tuple(raw.shape)}"
    )
    print(f"decoded range [{raw.min():.2f}, {raw.max():.2f}], {(raw.abs() > 1).float().mean():.0%} outside [-1, 1]")


if __name__ == "__main__":
    main()
