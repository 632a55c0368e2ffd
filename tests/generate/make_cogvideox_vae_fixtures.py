"""Write the CogVideoX VAE key manifest and golden-parity fixture from diffusers' AutoencoderKLCogVideoX.

    pip install diffusers   # with requirements-dev.txt
    python tests/generate/make_cogvideox_vae_fixtures.py

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/cogvideox_vae.json        state_dict keys and shapes of the CogVideoX-2b VAE, which are also those of
                                            CogVideoX-5b's (checked here; the two differ only in scaling_factor)
  tests/fixtures/cogvideox_vae_tiny.safetensors
                                            a tiny diffusers AutoencoderKLCogVideoX with random weights (real key names,
                                            four levels like the released one, so time is compressed 4x and space 8x),
                                            a 17-frame video (two frame batches in the encoder, two in the decoder, so
                                            the causal-conv cache is carried between batches) and a one-frame video,
                                            diffusers' posterior mean, log-variance and a seeded sample, and the decoded
                                            posterior means (tiling off); the metadata holds the model's config.json
  tests/fixtures/cogvideox_vae_tiny_tiled.safetensors
                                            the same model with tiling on (enable_tiling() defaults: tiles of half the
                                            sample size): a 9-frame 56 x 48 video (2 x 2 tiles, the last ones partial),
                                            the tiled encoder's posterior mean and the tiled decoding of that mean
Each output `output.X` is there twice: diffusers in float32, and as `output.X.f64` diffusers in float64 on the same
weights and inputs (cast exactly; the tiled decoding starts from the float32 `output.mean`, as the tests do; posterior
samples draw float64 noise), float32 meaning float64 throughout (reference_float64.py).
"""

import contextlib
import math
import os
import sys

import torch
from reference_float64 import float32_is_float64, keep_committed, print_float32_error
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# The config.json values of the released VAEs (THUDM/CogVideoX-{2b,5b}, subfolder vae).
COGVIDEOX_2B = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["CogVideoXDownBlock3D"] * 4,
    up_block_types=["CogVideoXUpBlock3D"] * 4,
    block_out_channels=[128, 256, 256, 512],
    latent_channels=16,
    layers_per_block=3,
    act_fn="silu",
    norm_eps=1e-6,
    norm_num_groups=32,
    temporal_compression_ratio=4,
    sample_height=480,
    sample_width=720,
    scaling_factor=1.15258426,
)
COGVIDEOX_5B = dict(COGVIDEOX_2B, scaling_factor=0.7)

# The width changes between levels (as 128 -> 256 and 256 -> 512 do), so the 1x1x1 skip convs are exercised.
TINY = dict(
    down_block_types=["CogVideoXDownBlock3D"] * 4,
    up_block_types=["CogVideoXUpBlock3D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    temporal_compression_ratio=4,
    sample_height=96,  # tiles of 48 x 40 pixels, 6 x 5 latents (as 480 x 720 gives 240 x 360, 30 x 45)
    sample_width=80,
    scaling_factor=1.15258426,
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
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX


def randomize(net, generator):
    """Replace every weight by a random value of sensible scale, so that norms and biases are exercised too."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def main():
    AutoencoderKLCogVideoX = import_diffusers()

    def manifest(config):
        with torch.device("meta"):
            vae = AutoencoderKLCogVideoX(**config)
        return {k: list(v.shape) for k, v in vae.state_dict().items()}

    keys = manifest(COGVIDEOX_2B)
    assert manifest(COGVIDEOX_5B) == keys, "CogVideoX-5b's VAE should have the 2b layout"
    path = os.path.join(TESTS, "manifests", "cogvideox_vae.json")
    with open(path, "w") as f:
        json_text = "{\n" + ",\n".join(f'"{k}": {v}' for k, v in keys.items()) + "\n}\n"
        f.write(json_text)
    print(f"{path}: {len(keys)} keys, {sum(math.prod(s) for s in keys.values()):,} numbers")

    g = torch.Generator().manual_seed(0)
    vae = AutoencoderKLCogVideoX(**TINY).eval()
    randomize(vae, g)
    with torch.no_grad(), float32_is_float64():
        vae64 = AutoencoderKLCogVideoX.from_config(vae.config).eval()
        vae64.load_state_dict(vae.state_dict())
        assert all(v.dtype == torch.float64 for v in vae64.state_dict().values())
    tensors = dict(vae.state_dict())
    videos = {
        "video": torch.rand(2, 3, 17, 32, 24, generator=g) * 2 - 1,  # (B, C, T, H, W), T = 1 + 8 * 2
        "image": torch.rand(1, 3, 1, 32, 24, generator=g) * 2 - 1,  # a single frame
    }
    for name, x in videos.items():
        tensors[f"input.{name}"] = x
        for net, cast, suffix, context in ((vae, same, "", torch.no_grad), (vae64, double, ".f64", in_float64)):
            with context():
                posterior = net.encode(cast(x)).latent_dist
                tensors[f"output.{name}.mean{suffix}"] = posterior.mean
                tensors[f"output.{name}.logvar{suffix}"] = posterior.logvar
                sample = posterior.sample(generator=torch.Generator().manual_seed(7))
                tensors[f"output.{name}.sample{suffix}"] = sample
                tensors[f"output.{name}.decoded{suffix}"] = net.decode(posterior.mean).sample
        print(f"{name}: {tuple(x.shape)} -> latents {tuple(posterior.mean.shape)}")
    metadata = {"generator": "tests/generate/make_cogvideox_vae_fixtures.py", "config": vae.to_json_string()}
    path = os.path.join(TESTS, "fixtures", "cogvideox_vae_tiny.safetensors")
    tensors = keep_committed(path, {k: v.contiguous() for k, v in tensors.items()})
    save_file(tensors, path, metadata=metadata)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB")
    print_float32_error("cogvideox_vae_tiny", tensors)

    vae.enable_tiling()
    vae64.enable_tiling()
    video = torch.rand(1, 3, 9, 56, 48, generator=g) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(video).latent_dist.mean
        tiled = {"input.video": video, "output.mean": mean, "output.decoded": vae.decode(mean).sample}
    path = os.path.join(TESTS, "fixtures", "cogvideox_vae_tiny_tiled.safetensors")
    tiled = keep_committed(path, {k: v.contiguous() for k, v in tiled.items()})
    with in_float64():  # the tiled decoding starts from the (kept) float32 mean, as the tests decode it
        tiled["output.mean.f64"] = vae64.encode(video.double()).latent_dist.mean
        tiled["output.decoded.f64"] = vae64.decode(tiled["output.mean"].double()).sample
    tiled = keep_committed(path, {k: v.contiguous() for k, v in tiled.items()})
    save_file(tiled, path, metadata=metadata)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB, tiled latents {tuple(mean.shape)}")
    print_float32_error("cogvideox_vae_tiny_tiled", tiled)


def same(x):
    return x


def double(x):
    return x.double()


@contextlib.contextmanager
def in_float64():
    with torch.no_grad(), float32_is_float64():
        yield


if __name__ == "__main__":
    main()
