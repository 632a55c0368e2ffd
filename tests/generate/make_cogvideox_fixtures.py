"""Write the CogVideoX transformer key manifests and golden-parity fixtures from diffusers.

    pip install diffusers transformers   # with requirements-dev.txt
    python tests/generate/make_cogvideox_fixtures.py

Outputs (committed; the tests need only torch and safetensors):
  tests/manifests/cogvideox-{2b,5b}.json   state_dict keys and shapes of diffusers' CogVideoXTransformer3DModel with the
                                           transformer/config.json values of THUDM/CogVideoX-2b and -5b (meta device)
  tests/fixtures/cogvideox_{2b,5b}.safetensors
                                           a tiny 2b-style (3-D sin-cos positions) or 5b-style (3-D RoPE on the crop
                                           grid, computed as CogVideoXPipeline does) transformer with random weights under
                                           the real key names; inputs (B, T, C, H, W as diffusers takes them), the output,
                                           the video tokens after block 0, and a few CFG DDIM steps of CogVideoXDDIMScheduler
                                           run with this transformer as the pipeline's loop does; the metadata holds the
                                           config.json. Each output `output.X` is there twice: diffusers in float32, and
                                           as `output.X.f64` diffusers in float64 on the same weights and inputs (cast
                                           exactly), float32 meaning float64 throughout (reference_float64.py: the time
                                           embedding, positions, RoPE and the DDIM loop too)
  tests/fixtures/cogvideox_schedule.safetensors
                                           CogVideoXDDIMScheduler's alphas_cumprod for snr_shift_scale 3.0 (2b) and 1.0 (5b)
  tests/fixtures/cogvideox_positions.safetensors
                                           rows of the full-size position tables at some tokens: the 2b's sin-cos table
                                           (13 x 30 x 45 tokens) and the 5b's RoPE cos/sin for 13 x 30 x 45 and for a
                                           wider 13 x 30 x 53 grid (cropped into the 30 x 45 training grid); each table
                                           also as `<key>.f64`, diffusers' functions run in float64
"""

import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import types

import torch
from reference_float64 import float32_is_float64, keep_committed, print_float32_error
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """diffusers' model imports reach transformers, which imports torchvision; none of it is used here. Where the
    installed torchvision does not load (a build for another torch), stand in for it with empty modules."""

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


# transformer/config.json of THUDM/CogVideoX-2b; the 5b differs in width, depth and positions.
REAL_2B = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=64,
    dropout=0.0,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=16,
    max_text_seq_length=226,
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    num_attention_heads=30,
    num_layers=30,
    out_channels=16,
    patch_size=2,
    sample_frames=49,
    sample_height=60,
    sample_width=90,
    spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0,
    text_embed_dim=4096,
    time_embed_dim=512,
    timestep_activation_fn="silu",
    use_rotary_positional_embeddings=False,
)
REAL_5B = dict(REAL_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
PARAMS = {"2b": 1_693_783_872, "5b": 5_570_283_072}

# scheduler/scheduler_config.json of the releases (2b: CogVideoXDDIMScheduler; 5b ships CogVideoXDPMScheduler with the
# same table and snr_shift_scale 1.0).
SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="trailing",
)
SNR_SHIFT = {"2b": 3.0, "5b": 1.0}
# Tokens (t, y, x row-major) whose position rows are stored: corners, row and frame boundaries, some inside.
TOKENS = torch.tensor([0, 1, 44, 45, 52, 53, 1349, 1350, 1351, 7000, 12345, 17549])

# Tiny: non-square latents so that height and width cannot be swapped unnoticed. The 5b-style model's base grid
# (sample 8 x 12 -> 4 x 6 tokens) has another aspect than its 8 x 8 input, so the RoPE crop region is not the whole grid.
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=32,
    num_layers=2,
    sample_width=12,
    sample_height=8,
    sample_frames=9,
    patch_size=2,
    max_text_seq_length=6,
    temporal_compression_ratio=4,
)
CASES = {
    "2b": dict(config=dict(TINY, use_rotary_positional_embeddings=False), size=(8, 12), steps=4),
    "5b": dict(config=dict(TINY, use_rotary_positional_embeddings=True), size=(8, 8), steps=3),
}


def randomize(net, generator):
    """Random weights of sensible scale everywhere, so that norms, biases and gates are exercised."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def main():
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            sys.modules.pop(name)
        sys.meta_path.insert(0, _TorchvisionPlaceholder())
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    for name, config in (("2b", REAL_2B), ("5b", REAL_5B)):
        with torch.device("meta"):
            net = CogVideoXTransformer3DModel(**config)
        keys = {k: list(v.shape) for k, v in net.state_dict().items()}
        assert sum(math.prod(s) for s in keys.values()) == PARAMS[name], name
        path = os.path.join(TESTS, "manifests", f"cogvideox-{name}.json")
        with open(path, "w") as f:
            json.dump(keys, f, indent=0)
        print(f"{path}: {len(keys)} keys, {PARAMS[name]:,} numbers")

    schedule = {}
    for name, shift in SNR_SHIFT.items():
        scheduler = CogVideoXDDIMScheduler(**SCHEDULER, snr_shift_scale=shift)
        schedule[f"alphas_cumprod.{name}"] = scheduler.alphas_cumprod.clone()
    path = os.path.join(TESTS, "fixtures", "cogvideox_schedule.safetensors")
    save_file(schedule, path, metadata={"generator": "tests/generate/make_cogvideox_fixtures.py"})
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB")

    def position_tables(suffix=""):
        net = CogVideoXTransformer3DModel(**dict(REAL_2B, num_attention_heads=1, num_layers=0))
        net.patch_embed.embed_dim = 30 * 64  # the table depends on the width only; built for the real 1920
        table = net.patch_embed._get_positional_embeddings(60, 90, 49)[0, REAL_2B["max_text_seq_length"] :]
        tables = {f"sincos.2b{suffix}": table[TOKENS].float()}
        for grid in ((30, 45), (30, 53)):  # as CogVideoXPipeline._prepare_rotary_positional_embeddings with patch 2
            crop = get_resize_crop_region_for_grid(grid, 90 // 2, 60 // 2)
            cos, sin = get_3d_rotary_pos_embed(64, crop, grid, 13)
            tables[f"rope.{grid[1]}.cos{suffix}"], tables[f"rope.{grid[1]}.sin{suffix}"] = cos[TOKENS], sin[TOKENS]
        return tables

    positions = {"tokens": TOKENS, **position_tables()}
    with float32_is_float64():
        positions.update(position_tables(".f64"))
    assert all(v.dtype == torch.float64 for k, v in positions.items() if k.endswith(".f64"))
    path = os.path.join(TESTS, "fixtures", "cogvideox_positions.safetensors")
    save_file(positions, path, metadata={"generator": "tests/generate/make_cogvideox_fixtures.py"})
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} KB")

    g = torch.Generator().manual_seed(0)
    for name, case in CASES.items():
        net = CogVideoXTransformer3DModel(**case["config"]).eval()
        randomize(net, g)
        B, T, C, (H, W) = 2, 3, 4, case["size"]
        cfg = net.config
        video = torch.randn(B, T, C, H, W, generator=g)
        text = torch.randn(B, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
        negative = torch.randn(B, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
        timestep = torch.tensor([10.0, 937.5])
        noise = torch.randn(B, T, C, H, W, generator=g)
        inputs = {"input.video": video, "input.text": text, "input.negative_text": negative, "input.timestep": timestep,
                  "input.noise": noise}  # fmt: skip
        outputs, timesteps = run(net, inputs, name, case["steps"], CogVideoXDDIMScheduler, get_3d_rotary_pos_embed,
                                 get_resize_crop_region_for_grid)  # fmt: skip
        with torch.no_grad(), float32_is_float64():
            net64 = CogVideoXTransformer3DModel.from_config(net.config).eval()
            net64.load_state_dict(net.state_dict())
            assert all(v.dtype == torch.float64 for v in net64.state_dict().values())
            inputs64 = {k: v.double() for k, v in inputs.items()}
            outputs64, _ = run(net64, inputs64, name, case["steps"], CogVideoXDDIMScheduler, get_3d_rotary_pos_embed,
                               get_resize_crop_region_for_grid)  # fmt: skip

        tensors = dict(net.state_dict())
        tensors.update(inputs)
        tensors.update(outputs)
        tensors.update({f"{k}.f64": v for k, v in outputs64.items()})
        tensors["output.ddim_timesteps"] = timesteps
        path = os.path.join(TESTS, "fixtures", f"cogvideox_{name}.safetensors")
        metadata = {"generator": "tests/generate/make_cogvideox_fixtures.py", "config": net.to_json_string()}
        tensors = keep_committed(path, {k: v.contiguous() for k, v in tensors.items()})
        save_file(tensors, path, metadata=metadata)
        print(
            f"{path}: {os.path.getsize(path) / 1e3:.0f} KB, output {tuple(outputs['output.sample'].shape)}, "
            f"timesteps {timesteps.tolist()}"
        )
        print_float32_error(name, tensors)


def run(net, inputs, name, steps, CogVideoXDDIMScheduler, get_3d_rotary_pos_embed, get_resize_crop_region_for_grid):
    """diffusers' outputs on the inputs: one forward (and the video tokens after block 0), and CogVideoXPipeline's
    denoising loop (guidance_scale 6, no dynamic CFG) with CogVideoXDDIMScheduler from input.noise."""
    video, text, negative, timestep = (inputs[f"input.{k}"] for k in ("video", "text", "negative_text", "timestep"))
    B, T, C, H, W = video.shape
    cfg = net.config
    rotary = None
    if cfg.use_rotary_positional_embeddings:  # CogVideoXPipeline._prepare_rotary_positional_embeddings
        p = cfg.patch_size
        grid = (H // p, W // p)
        crop = get_resize_crop_region_for_grid(grid, cfg.sample_width // p, cfg.sample_height // p)
        rotary = get_3d_rotary_pos_embed(cfg.attention_head_dim, crop, grid, T)
    block0 = []
    hook = net.transformer_blocks[0].register_forward_hook(lambda m, i, out, store=block0: store.append(out[0]))
    with torch.no_grad():
        out = net(video, text, timestep, image_rotary_emb=rotary).sample
    hook.remove()

    scheduler = CogVideoXDDIMScheduler(**SCHEDULER, snr_shift_scale=SNR_SHIFT[name])
    scheduler.set_timesteps(steps)
    latents = inputs["input.noise"].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = net(torch.cat([latents] * 2), torch.cat([negative, text]), t.expand(2 * B), image_rotary_emb=rotary)
            uncond, cond = pred.sample.float().chunk(2)
            latents = scheduler.step(uncond + 6.0 * (cond - uncond), t, latents, return_dict=False)[0]
    outputs = {"output.sample": out, "output.block0": block0[0], "output.ddim": latents}
    return outputs, scheduler.timesteps.clone()


if __name__ == "__main__":
    main()
