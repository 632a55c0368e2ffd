"""Write the FLUX.1 key manifests and golden-parity fixtures from diffusers' FluxTransformer2DModel, FluxPipeline and
FlowMatchEulerDiscreteScheduler.

    pip install diffusers transformers   # with requirements-dev.txt
    python tests/generate/make_flux_fixtures.py [--keep-float32]

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/flux-dev.json, flux-schnell.json
        state_dict keys and shapes of the released transformers (built on the meta device from the real config.json
        values; schnell lacks the guidance embedder)
  tests/fixtures/flux_tiny.safetensors
        a tiny guidance-distilled transformer (2 double, 2 single blocks, 2 heads of 16) with random weights under the
        real key names; inputs (latents (B, 16, H, W), T5-like states, pooled vector, t, guidance) with the image and
        text ids FluxPipeline builds; diffusers' output unpacked to (B, 16, H, W); the image tokens after every block
        (hooks, FastGen's discriminator taps); a 3-step Euler run of the pipeline's loop with true CFG on negative
        embeddings; calculate_shift values and the scheduler's shifted sigmas for a few step counts and sequence lengths
  tests/fixtures/flux_tiny_schnell.safetensors
        the same for a 1 + 1 block transformer without guidance embedding: weights, inputs, output
Every output is there twice: from the reference in float32 (`output.flow`) and in float64 on the same weights and
inputs (`output.flow.f64`, see reference64.py: diffusers' float32 timestep features, RoPE and scheduler run in float64
there). --keep-float32 adds the float64 outputs to the committed fixtures and keeps everything else as committed.
The metadata of each fixture holds the model's config.json.
"""

import copy
import json
import math
import os
import sys

import numpy as np
import reference64
import torch
from reference64 import FLOAT64


def import_diffusers():
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        pass  # absent: transformers and diffusers do without it
    except RuntimeError:
        # A torchvision built for CUDA next to a CPU-only torch fails to register two operators; diffusers' loaders
        # import transformers, which imports torchvision. Declaring the two operators lets the import through.
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_diffusers.keep = lib
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    import diffusers
    import diffusers.models.transformers.transformer_flux  # noqa: F401
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

    return diffusers, FluxPipeline, calculate_shift


HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# transformer/config.json of black-forest-labs/FLUX.1-dev; schnell differs only in guidance_embeds.
DEV = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
SCHNELL = dict(DEV, guidance_embeds=False)
# scheduler/scheduler_config.json of FLUX.1-dev
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
TINY = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)
TINY_SCHNELL = dict(TINY, num_layers=1, num_single_layers=1, guidance_embeds=False)


def randomize(net, generator):
    """Random weights of sensible scale everywhere (the adaLN layers included), norms near 1."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def inputs(config, generator, batch=2, height=8, width=12, text_len=7):
    return {
        "input.latents": torch.randn(batch, 16, height, width, generator=generator),
        "input.text": torch.randn(batch, text_len, config["joint_attention_dim"], generator=generator),
        "input.pooled": torch.randn(batch, config["pooled_projection_dim"], generator=generator),
        "input.t": torch.tensor([0.3, 0.85]),
        "input.guidance": torch.tensor([3.5, 5.0]),
    }


def float64_reference(diffusers):
    """diffusers' Flux in float64: its float32 islands (timestep features, RoPE tables and rotation, the position
    ids, the scheduler's tables, sigmas and step) swapped for float64 copies of the same source."""
    embeddings, flux = diffusers.models.embeddings, diffusers.models.transformers.transformer_flux
    return reference64.float64(
        (embeddings, "get_timestep_embedding"),
        (flux, "get_1d_rotary_pos_embed"),
        (flux, "apply_rotary_emb"),
        (flux.FluxPosEmbed, "forward"),
        (diffusers.FlowMatchEulerDiscreteScheduler, "__init__"),
        (diffusers.FlowMatchEulerDiscreteScheduler, "set_timesteps"),
        (diffusers.FlowMatchEulerDiscreteScheduler, "step"),
    )


def given(tensors, dtype):
    """The fixture's inputs (input.*, sample.*) in dtype, float32 values exact in float64."""
    return {k: v.to(dtype) for k, v in tensors.items() if k.startswith(("input.", "sample."))}


def forward(net, tensors, x, FluxPipeline, suffix, features):
    """The transformer on the inputs x: the unpacked output and (features) the image tokens after every block, into
    tensors."""
    B, C, H, W = x["input.latents"].shape
    guidance = x["input.guidance"] if net.config.guidance_embeds else None
    taps = []
    hooks = [
        block.register_forward_hook(lambda m, args, out, taps=taps: taps.append(out[1].detach().clone()))
        for block in list(net.transformer_blocks) + list(net.single_transformer_blocks)
    ]
    with torch.no_grad():
        packed = FluxPipeline._pack_latents(x["input.latents"], B, C, H, W)
        out = net(
            packed, x["input.text"], x["input.pooled"], x["input.t"], x["input.img_ids"], x["input.txt_ids"], guidance
        ).sample
    tensors["output.flow" + suffix] = FluxPipeline._unpack_latents(out, H * 8, W * 8, 8)  # the pipeline passes pixels
    for hook in hooks:
        hook.remove()
    if features:
        for i, tokens in enumerate(taps):  # image tokens (B, N, D) after block i
            tensors[f"output.features.{i}{suffix}"] = tokens


def main():
    keep_float32 = "--keep-float32" in sys.argv[1:]
    diffusers, FluxPipeline, calculate_shift = import_diffusers()
    Model = diffusers.FluxTransformer2DModel

    for name, config in (("flux-dev", DEV), ("flux-schnell", SCHNELL)):
        with torch.device("meta"):
            net = Model(**config)
        keys = {k: list(v.shape) for k, v in net.state_dict().items()}
        path = os.path.join(TESTS, "manifests", f"{name}.json")
        with open(path, "w") as f:
            json.dump(keys, f, indent=0)
        print(f"{path}: {len(keys)} keys, {sum(math.prod(s) for s in keys.values()):,} numbers")

    g = torch.Generator().manual_seed(0)
    for name, config in (("flux_tiny", TINY), ("flux_tiny_schnell", TINY_SCHNELL)):
        net = Model(**config).eval()
        randomize(net, g)
        tensors = dict(net.state_dict())
        x = inputs(config, g)
        tensors.update(x)
        B, C, H, W = x["input.latents"].shape
        L = x["input.text"].shape[1]
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
        txt_ids = torch.zeros(L, 3)
        tensors["input.img_ids"], tensors["input.txt_ids"] = img_ids, txt_ids

        if name == "flux_tiny":
            sample_inputs(tensors, g)
        forward(net, tensors, given(tensors, torch.float32), FluxPipeline, "", features=name == "flux_tiny")
        if name == "flux_tiny":
            sample_run(net, tensors, given(tensors, torch.float32), FluxPipeline, calculate_shift, diffusers, "")
            schedule_values(tensors, calculate_shift, diffusers, torch.float32, "")
        # The same in float64: weights and inputs cast (exactly), then no float32 anywhere.
        net64, x64 = copy.deepcopy(net).double(), given(tensors, torch.float64)
        with float64_reference(diffusers):
            forward(net64, tensors, x64, FluxPipeline, FLOAT64, features=name == "flux_tiny")
            if name == "flux_tiny":
                sample_run(net64, tensors, x64, FluxPipeline, calculate_shift, diffusers, FLOAT64)
                schedule_values(tensors, calculate_shift, diffusers, torch.float64, FLOAT64)

        path = os.path.join(TESTS, "fixtures", f"{name}.safetensors")
        metadata = {"generator": "tests/generate/make_flux_fixtures.py", "config": net.to_json_string()}
        reference64.save_fixture(path, tensors, metadata, keep_float32)


def sample_inputs(tensors, g):
    tensors["sample.noise"] = torch.randn(2, 16, 8, 12, generator=g)
    tensors["sample.neg_text"] = torch.randn(2, 7, 32, generator=g)
    tensors["sample.neg_pooled"] = torch.randn(2, 16, generator=g)


def sample_run(net, tensors, x, FluxPipeline, calculate_shift, diffusers, suffix):
    """FluxPipeline.__call__'s denoising loop (3 steps, guidance 3.5, true CFG 2 on negative embeddings) without the
    text encoders and the autoencoder: the same transformer calls and scheduler steps, on the inputs x."""
    noise, neg_text, neg_pooled = x["sample.noise"], x["sample.neg_text"], x["sample.neg_pooled"]
    text, pooled, img_ids, txt_ids = x["input.text"], x["input.pooled"], x["input.img_ids"], x["input.txt_ids"]
    B, C, H, W = noise.shape
    latents = FluxPipeline._pack_latents(noise, B, C, H, W)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    steps = 3
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(latents.shape[1], 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    guidance = torch.full([1], 3.5, dtype=noise.dtype).expand(B)
    with torch.no_grad():
        for t in scheduler.timesteps:
            timestep = t.expand(B)
            cond = net(latents, text, pooled, timestep / 1000, img_ids, txt_ids, guidance, return_dict=False)[0]
            neg = net(latents, neg_text, neg_pooled, timestep / 1000, img_ids, txt_ids, guidance, return_dict=False)[0]
            flow = neg + 2.0 * (cond - neg)
            latents = scheduler.step(flow, t, latents, return_dict=False)[0]
    tensors["sample.times" + suffix] = scheduler.sigmas
    tensors["sample.latents" + suffix] = FluxPipeline._unpack_latents(latents, H * 8, W * 8, 8)


def schedule_values(tensors, calculate_shift, diffusers, dtype, suffix):
    seq_lens = [16, 256, 1024, 4096, 6000]
    if not suffix:
        tensors["schedule.seq_lens"] = torch.tensor(seq_lens, dtype=torch.float64)
    tensors["schedule.mu" + suffix] = torch.tensor(
        [calculate_shift(n, 256, 4096, 0.5, 1.15) for n in seq_lens], dtype=dtype
    )
    for steps, seq_len in ((1, 256), (4, 1024), (28, 4096), (50, 6000)):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
        tensors[f"schedule.sigmas.{steps}.{seq_len}{suffix}"] = scheduler.sigmas


if __name__ == "__main__":
    main()
