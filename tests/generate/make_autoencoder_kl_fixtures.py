"""Write the AutoencoderKL key manifests and golden-parity fixtures from diffusers' AutoencoderKL.

    pip install diffusers   # with requirements-dev.txt
    python tests/generate/make_autoencoder_kl_fixtures.py [--keep-float32]

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/autoencoder_kl-sd.json     state_dict keys and shapes of the SD1.5 autoencoder, which are also those of
                                             SDXL's, sdxl-vae-fp16-fix and sd-vae-ft-ema/-mse (checked here for SDXL)
  tests/manifests/autoencoder_kl-flux.json   the same for FLUX.1's 16-channel autoencoder
  tests/fixtures/autoencoder_kl_{sd,flux}.safetensors
                                             a tiny diffusers AutoencoderKL with random weights (under the real key names),
                                             an input image and diffusers' posterior mean and log-variance, a posterior
                                             sample drawn with a seeded generator, and the decoded posterior mean; the
                                             metadata holds the model's config.json
Every output is there twice: from the reference in float32 (`output.mean`) and in float64 on the same weights and
input (`output.mean.f64`, see reference64.py; diffusers' AutoencoderKL has no float32 islands, the posterior sample
is drawn in float64 there). --keep-float32 adds the float64 outputs to the committed fixtures and keeps everything
else as committed.
"""

import copy
import json
import math
import os
import sys

import reference64
import torch
from reference64 import FLOAT64

# transformers (imported by diffusers' model loaders) pulls in torchvision when it finds one; a torchvision built for
# another torch fails to import. None in sys.modules makes it look absent.
try:
    import torchvision  # noqa: F401
except Exception:
    sys.modules["torchvision"] = None

from diffusers import AutoencoderKL  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# The config.json values of the released autoencoders (vae/config.json of each repo).
SD = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
SDXL = dict(SD, sample_size=1024, scaling_factor=0.13025)
FLUX = dict(
    SD,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# Tiny random-weight networks: SD-style with quant convs (three levels, two ResNets per level) and Flux-style without.
TINY = {
    "sd": dict(
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 16, 32],
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    ),
    "flux": dict(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


def manifest(config):
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    return {k: list(v.shape) for k, v in vae.state_dict().items()}


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


def run(vae, tensors, image, suffix):
    """diffusers' posterior mean, log-variance and a seeded sample of image, and the decoded mean, into tensors."""
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
        tensors["output.mean" + suffix] = posterior.mean
        tensors["output.logvar" + suffix] = posterior.logvar
        tensors["output.sample" + suffix] = posterior.sample(generator=torch.Generator().manual_seed(7))
        tensors["output.decoded" + suffix] = vae.decode(posterior.mean).sample
    return posterior


def main():
    keep_float32 = "--keep-float32" in sys.argv[1:]
    sd = manifest(SD)
    assert manifest(SDXL) == sd, "SDXL's autoencoder should have the SD1.5 layout"
    for name, keys in (("sd", sd), ("flux", manifest(FLUX))):
        path = os.path.join(TESTS, "manifests", f"autoencoder_kl-{name}.json")
        with open(path, "w") as f:
            json.dump(keys, f, indent=0)
        print(f"{path}: {len(keys)} keys, {sum(math.prod(s) for s in keys.values()):,} numbers")

    g = torch.Generator().manual_seed(0)
    for name, config in TINY.items():
        vae = AutoencoderKL(**config).eval()
        randomize(vae, g)
        tensors = dict(vae.state_dict())
        image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        tensors["input.image"] = image
        posterior = run(vae, tensors, image, "")
        vae64, image64 = copy.deepcopy(vae).double(), image.double()  # weights and input exact in float64
        with reference64.float64():  # no float32 anywhere
            run(vae64, tensors, image64, FLOAT64)
        path = os.path.join(TESTS, "fixtures", f"autoencoder_kl_{name}.safetensors")
        metadata = {"generator": "tests/generate/make_autoencoder_kl_fixtures.py", "config": vae.to_json_string()}
        print(f"latents {tuple(posterior.mean.shape)}")
        reference64.save_fixture(path, tensors, metadata, keep_float32)


if __name__ == "__main__":
    main()
