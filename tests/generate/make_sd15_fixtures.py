"""Write the SD1.5 UNet key manifest and golden-parity fixture from diffusers' UNet2DConditionModel and DDIMScheduler.

    pip install diffusers   # with requirements-dev.txt
    python tests/generate/make_sd15_fixtures.py [--keep-float32]

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/sd15-unet.json   state_dict keys and shapes of the SD1.5 UNet (unet/config.json of the release, built
                                   on the meta device: no weights)
  tests/fixtures/sd15_tiny.safetensors
                                   an SD1.5-style tiny UNet (three levels, attention on the first two, two ResNets per
                                   level) with random weights under the real key names, stored in float16 (the values
                                   are float16-exact, the reference outputs were computed in float32); inputs and
                                   diffusers' outputs without and with a text mask, on an odd-sized latent, the
                                   down-block and mid-block outputs (FastGen's feature taps), the scheduler's
                                   alphas_cumprod and 50-step timesteps, and a 3-step DDIM run with classifier-free
                                   guidance; the metadata holds the UNet's and the scheduler's config.json
Every output is there twice: from the reference in float32 (`output.eps`) and in float64 on the same weights and
inputs (`output.eps.f64`, see reference64.py: diffusers' float32 timestep features and scheduler table run in float64
there). --keep-float32 adds the float64 outputs to the committed fixture and keeps everything else as committed.
"""

import copy
import json
import math
import os
import sys

import reference64
import torch
from reference64 import FLOAT64

# transformers (imported by diffusers' UNet loaders) pulls in torchvision when it finds one; a torchvision built for
# another torch fails to import. None in sys.modules makes it look absent.
try:
    import torchvision  # noqa: F401
except Exception:
    sys.modules["torchvision"] = None

import diffusers.models.embeddings  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# unet/config.json of runwayml/stable-diffusion-v1-5 (same file in stable-diffusion-v1-5/stable-diffusion-v1-5).
SD15 = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# scheduler/scheduler_config.json of the release; pipelines build a DDIMScheduler from it.
SCHEDULER = dict(
    _class_name="PNDMScheduler",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
)
GUIDANCE = 7.5  # classifier-free guidance of the 3-step DDIM run
TINY = dict(
    sample_size=8,
    block_out_channels=[16, 32, 32],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=24,
    attention_head_dim=[2, 4, 4],
    norm_num_groups=4,
)


def randomize(net, generator):
    """Random float16-exact weights of sensible scale everywhere, so norms and biases are exercised too."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            p.copy_(p.half().float())


def taps(unet, suffix):
    """Forward hooks that record each down block's and the mid block's output (FastGen's feature indices)."""
    out = {}
    for i, block in enumerate(unet.down_blocks):
        block.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f"output.feature.{i}{suffix}", o[0]))
    unet.mid_block.register_forward_hook(lambda m, a, o: out.__setitem__("output.feature.mid" + suffix, o))
    return out


def float64_reference():
    """diffusers' UNet and DDIMScheduler in float64: their float32 islands (the timestep features, the scheduler's
    beta table) swapped for float64 copies of the same source."""
    return reference64.float64(
        (diffusers.models.embeddings, "get_timestep_embedding"),
        (DDIMScheduler, "__init__"),
    )


def run(unet, tensors, x, suffix):
    """diffusers' outputs on the inputs x: without and with the mask, on the odd latent, the feature taps, the
    scheduler's table and a 3-step DDIM run with guidance, into tensors (names ending in suffix)."""
    features = taps(unet, suffix)
    with torch.no_grad():
        tensors["output.eps" + suffix] = unet(x["input.x"], x["input.t"], x["input.text"]).sample
        tensors.update(features)
        masked = unet(x["input.x"], x["input.t"], x["input.text"], encoder_attention_mask=x["input.mask"]).sample
        tensors["output.eps_masked" + suffix] = masked
        t_odd = torch.tensor([500.0], dtype=x["input.odd"].dtype)
        tensors["output.eps_odd" + suffix] = unet(x["input.odd"], t_odd, x["input.text"][:1]).sample

        scheduler = DDIMScheduler.from_config(SCHEDULER)
        tensors["schedule.alphas_cumprod" + suffix] = scheduler.alphas_cumprod
        scheduler.set_timesteps(50)
        if not suffix:
            tensors["schedule.timesteps_50"] = scheduler.timesteps
        scheduler.set_timesteps(3)
        latents = x["input.noise"] * scheduler.init_noise_sigma
        null, text = x["input.null"], x["input.text"]
        for step in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), step)
            uncond, cond = unet(model_in, step, torch.cat([null, text])).sample.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), step, latents).prev_sample
        tensors["output.ddim_3" + suffix] = latents
        if not suffix:
            tensors["schedule.timesteps_3"] = scheduler.timesteps
    return scheduler


def main():
    keep_float32 = "--keep-float32" in sys.argv[1:]
    with torch.device("meta"):
        full = UNet2DConditionModel(**SD15)
    keys = {k: list(v.shape) for k, v in full.state_dict().items()}
    path = os.path.join(TESTS, "manifests", "sd15-unet.json")
    with open(path, "w") as f:
        json.dump(keys, f, indent=0)
    print(f"{path}: {len(keys)} keys, {sum(math.prod(s) for s in keys.values()):,} numbers")

    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel(**TINY).eval()
    randomize(unet, g)
    tensors = {k: v.half() for k, v in unet.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 981.0])
    text = torch.randn(2, 7, 24, generator=g)
    mask = torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3])
    odd = torch.randn(1, 4, 10, 6, generator=g)
    null = torch.randn(1, 7, 24, generator=g).expand(2, 7, 24)  # stands in for the empty prompt's embeddings
    noise = torch.randn(2, 4, 8, 8, generator=g)
    tensors.update({"input.x": x, "input.t": t, "input.text": text, "input.mask": mask, "input.odd": odd})
    tensors.update({"input.null": null.contiguous(), "input.noise": noise})

    # The same in float64 below: weights and inputs cast (exactly), then no float32 anywhere.
    unet64, x64 = copy.deepcopy(unet).double(), {k: v.double() for k, v in tensors.items() if k.startswith("input.")}
    scheduler = run(unet, tensors, dict(tensors, **{"input.null": null}), "")
    with float64_reference():
        run(unet64, tensors, x64, FLOAT64)

    path = os.path.join(TESTS, "fixtures", "sd15_tiny.safetensors")
    metadata = {
        "generator": "tests/generate/make_sd15_fixtures.py",
        "config": unet.to_json_string(),
        "scheduler_config": json.dumps(SCHEDULER),
        "guidance": str(GUIDANCE),
    }
    print(f"ddim timesteps {scheduler.timesteps.tolist()}")
    reference64.save_fixture(path, tensors, metadata, keep_float32)


if __name__ == "__main__":
    main()
