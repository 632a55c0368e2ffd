"""Write the SDXL UNet key manifest and golden-parity fixture from diffusers' UNet2DConditionModel and
EulerDiscreteScheduler.

    pip install diffusers   # with requirements-dev.txt
    python tests/generate/make_sdxl_fixtures.py [--keep-float32]

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/sdxl-unet.json   state_dict keys and shapes of the SDXL base 1.0 UNet (unet/config.json of the
                                   release, built on the meta device: no weights)
  tests/fixtures/sdxl_tiny.safetensors
                                   an SDXL-style tiny UNet (three levels, no attention on the first, 1/2/2 transformer
                                   blocks, Linear projections, addition_embed_type "text_time") with random weights
                                   under the real key names, stored in float16 (the values are float16-exact, the
                                   reference outputs were computed in float32); inputs and diffusers' outputs
                                   without and with a text mask, the down-block and mid-block outputs, the
                                   scheduler's alphas_cumprod, 50-step timesteps and sigmas, and a 3-step Euler run
                                   with classifier-free guidance; the metadata holds the UNet's and the scheduler's
                                   config.json
Every output is there twice: from the reference in float32 (`output.eps`) and in float64 on the same weights and
inputs (`output.eps.f64`, see reference64.py: diffusers' float32 timestep features and scheduler run in float64
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
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    class_embed_type=None,
    class_embeddings_concat=False,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=2048,
    cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_only_cross_attention=None,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_attention_heads=None,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False,
    resnet_time_scale_shift="default",
    sample_size=128,
    time_cond_proj_dim=None,
    time_embedding_act_fn=None,
    time_embedding_dim=None,
    time_embedding_type="positional",
    timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)
# scheduler/scheduler_config.json of the release.
SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler",
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)
GUIDANCE = 5.0  # classifier-free guidance of the 3-step Euler run
TINY = dict(
    sample_size=8,
    block_out_channels=[16, 32, 32],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 2],
    attention_head_dim=[1, 2, 4],
    cross_attention_dim=48,
    norm_num_groups=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 20,
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
    """diffusers' UNet and EulerDiscreteScheduler in float64: their float32 islands (the timestep and micro-conditioning
    features, the scheduler's tables, sigmas and step) swapped for float64 copies of the same source."""
    return reference64.float64(
        (diffusers.models.embeddings, "get_timestep_embedding"),
        (EulerDiscreteScheduler, "__init__"),
        (EulerDiscreteScheduler, "set_timesteps"),
        (EulerDiscreteScheduler, "step"),
    )


def run(unet, tensors, x, suffix):
    """diffusers' outputs on the inputs x: without and with the mask, the feature taps, the scheduler's tables and a
    3-step Euler run with guidance, into tensors (names ending in suffix)."""
    features = taps(unet, suffix)
    text, pooled, time_ids = x["input.text"], x["input.pooled"], x["input.time_ids"]
    added = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        tensors["output.eps" + suffix] = unet(x["input.x"], x["input.t"], text, added_cond_kwargs=added).sample
        tensors.update(features)
        masked = unet(x["input.x"], x["input.t"], text, added_cond_kwargs=added, encoder_attention_mask=x["input.mask"])
        tensors["output.eps_masked" + suffix] = masked.sample

        scheduler = EulerDiscreteScheduler.from_config(SCHEDULER)
        tensors["schedule.alphas_cumprod" + suffix] = scheduler.alphas_cumprod
        scheduler.set_timesteps(50)
        if not suffix:
            tensors["schedule.timesteps_50"] = scheduler.timesteps
        tensors["schedule.sigmas_50" + suffix] = scheduler.sigmas
        scheduler.set_timesteps(3)
        latents = x["input.noise"] * scheduler.init_noise_sigma
        # the pipeline's zeros for an empty negative prompt
        null, null_pooled = torch.zeros_like(text), torch.zeros_like(pooled)
        both = {"text_embeds": torch.cat([null_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
        for step in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), step)
            out = unet(model_in, step, torch.cat([null, text]), added_cond_kwargs=both).sample
            uncond, cond = out.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), step, latents).prev_sample
        tensors["output.euler_3" + suffix] = latents
        if not suffix:
            tensors["schedule.timesteps_3"] = scheduler.timesteps
    return scheduler


def main():
    keep_float32 = "--keep-float32" in sys.argv[1:]
    with torch.device("meta"):
        full = UNet2DConditionModel(**SDXL)
    keys = {k: list(v.shape) for k, v in full.state_dict().items()}
    path = os.path.join(TESTS, "manifests", "sdxl-unet.json")
    with open(path, "w") as f:
        json.dump(keys, f, indent=0)
    print(f"{path}: {len(keys)} keys, {sum(math.prod(s) for s in keys.values()):,} numbers")

    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel(**TINY).eval()
    randomize(unet, g)
    tensors = {k: v.half() for k, v in unet.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 981.0])
    text = torch.randn(2, 7, 48, generator=g)
    pooled = torch.randn(2, 20, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 32.0, 1024.0, 896.0]])
    mask = torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3])
    noise = torch.randn(2, 4, 8, 8, generator=g)
    tensors.update({"input.x": x, "input.t": t, "input.text": text, "input.pooled": pooled, "input.mask": mask})
    tensors.update({"input.time_ids": time_ids, "input.noise": noise})

    # The same in float64 below: weights and inputs cast (exactly), then no float32 anywhere.
    unet64, x64 = copy.deepcopy(unet).double(), {k: v.double() for k, v in tensors.items() if k.startswith("input.")}
    scheduler = run(unet, tensors, tensors, "")
    with float64_reference():
        run(unet64, tensors, x64, FLOAT64)

    path = os.path.join(TESTS, "fixtures", "sdxl_tiny.safetensors")
    metadata = {
        "generator": "tests/generate/make_sdxl_fixtures.py",
        "config": unet.to_json_string(),
        "scheduler_config": json.dumps(SCHEDULER),
        "guidance": str(GUIDANCE),
    }
    print(f"euler timesteps {scheduler.timesteps.tolist()}")
    reference64.save_fixture(path, tensors, metadata, keep_float32)


if __name__ == "__main__":
    main()
