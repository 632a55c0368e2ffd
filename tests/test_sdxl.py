"""models/sdxl.py: key manifest of the released UNet, golden parity with diffusers' UNet2DConditionModel with the
text-time micro-conditioning (text mask, feature taps), the sdxl schedule against diffusers' EulerDiscreteScheduler,
Euler sampling with guidance, config.json mapping, strict loading from local folders, and the presets."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import sdxl

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"

# Golden parity bounds (relative to the output scale). The generator ran diffusers in float32 and in float64 on the
# same weights and inputs (exact in float64; tests/generate/reference64.py lifts diffusers' float32 islands); the
# float64 outputs are stored as NAME.f64. Our model in float64 against them: measured <= 7e-16 (1 and 2 threads),
# whatever the kernels' order of summation; FLOAT64_BOUND leaves 1e4x room and still catches any real difference.
FLOAT64_BOUND = 1e-10
# Our model in float32 against the float32 outputs sits on the float32 noise floor, which moves with the CPU and its
# kernels: bounded by FLOAT32_FACTOR times the reference's own float32-vs-float64 error on the same output (measured
# ratio of ours to that: <= 0.9).
FLOAT32_FACTOR = 20

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def load_fixture():
    """Weights (stored as float16-exact values) under the real key names, the other tensors, and the metadata."""
    with safe_open(os.path.join(HERE, "fixtures", "sdxl_tiny.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    weights = {k: v.float() for k, v in tensors.items() if not k.startswith(("input.", "output.", "schedule."))}
    return weights, tensors, metadata


@pytest.fixture(scope="module")
def fixture():
    weights, tensors, metadata = load_fixture()
    model = sdxl.UNet(sdxl.config_from_diffusers(json.loads(metadata["config"]))).eval()
    model.load_state_dict(weights, strict=True)
    return model, tensors


@pytest.fixture(scope="module")
def fixture64(fixture):
    """The model in float64 and the inputs cast to float64 (exact), with the expected outputs."""
    model, tensors = fixture
    inputs = {k: v.double() for k, v in tensors.items() if k.startswith("input.")}
    return copy.deepcopy(model).double(), {**tensors, **inputs}


def conditioning(t, null=False):
    if null:  # the SDXL pipeline's zeros for an empty negative prompt
        return dict(text=torch.zeros_like(t["input.text"]), pooled=torch.zeros_like(t["input.pooled"]),
                    time_ids=t["input.time_ids"])  # fmt: skip
    return dict(text=t["input.text"], pooled=t["input.pooled"], time_ids=t["input.time_ids"])


def relative_error(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def outputs(model, t):
    """Two different micro-conditionings in one batch, without and with a text mask."""
    with torch.no_grad():
        return {
            "eps": model(t["input.x"], t["input.t"], **conditioning(t)),
            "eps_masked": model(t["input.x"], t["input.t"], **conditioning(t), text_mask=t["input.mask"]),
        }


def write_unet_folder(folder, weights, config_json, shards=1):
    """The Hub layout: config.json and one safetensors file, or `shards` files and their index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config_json)
    if shards == 1:
        save_file(weights, os.path.join(folder, WEIGHTS))
        return
    keys, weight_map = sorted(weights), {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: weights[k] for k in part}, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, WEIGHTS + ".index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


# ----------------------------------------------------------------------------
# Checkpoint layout and presets


def test_full_size_keys_match_the_released_checkpoint():
    with open(os.path.join(HERE, "manifests", "sdxl-unet.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = sdxl.UNet(sdxl.CONFIGS["sdxl"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684  # the published size
    assert "down_blocks.0.attentions.0.norm.weight" not in manifest  # the first level has no attention
    assert manifest["add_embedding.linear_1.weight"] == [1280, 2816]


def test_released_config_json_maps_to_the_preset():
    assert sdxl.config_from_diffusers(SDXL_CONFIG_JSON) == replace(sdxl.CONFIGS["sdxl"], repo="")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"addition_embed_type": None}, "addition_embed_type=None; only 'text_time'"),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block for 2 levels"),
        ({"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}, "only the mirror"),
    ],
)
def test_config_json_with_unknown_values_is_refused(edit, message):
    with pytest.raises(ValueError, match=message):
        sdxl.config_from_diffusers({**SDXL_CONFIG_JSON, **edit})


def test_mid_preset_keeps_the_sdxl_layout_at_a_fraction_of_the_size():
    with torch.device("meta"):
        mid = sdxl.UNet(sdxl.CONFIGS["mid"])
    n = sum(p.numel() for p in mid.parameters())
    assert 50e6 < n < 300e6, n
    assert mid.add_embedding.linear_1.in_features == 2816 and mid.mid_block.attentions[0].proj_in.in_features == 512
    assert len(mid.down_blocks[2].attentions[0].transformer_blocks) == 2 and mid.down_blocks[0].attentions is None


# ----------------------------------------------------------------------------
# Golden parity with diffusers


def test_matches_diffusers_outputs(fixture64):
    """Two different micro-conditionings in one batch, without and with a text mask. Reference in float64, bound
    FLOAT64_BOUND (measured 0: the same order of operations)."""
    model, t = fixture64
    cases = outputs(model, t)
    for case, out in cases.items():
        err = relative_error(out, t[f"output.{case}.f64"])
        assert out.dtype == torch.float64 and err < FLOAT64_BOUND, f"{case}: max abs error {err:.2e} of output scale"
    assert relative_error(cases["eps_masked"], cases["eps"]) > 1e-2


def test_matches_diffusers_outputs_in_float32(fixture):
    """The float32 path (time and micro-conditioning features in float32, as diffusers computes them) against the
    reference in float32, bound FLOAT32_FACTOR x the reference's own float32 error on each output (1.1e-6, 1.6e-6)."""
    model, t = fixture
    for case, out in outputs(model, t).items():
        key = "output." + case
        err, bound = relative_error(out, t[key]), FLOAT32_FACTOR * relative_error(t[key], t[key + ".f64"])
        assert out.dtype == torch.float32 and err < bound, (
            f"{case}: max abs error {err:.2e} of output scale > {bound:.2e}"
        )


def test_micro_conditioning_changes_the_output(fixture64):
    """Row 0 keeps its (default) ids: the same output to float64 rounding, bound FLOAT64_BOUND."""
    model, t = fixture64
    cond = conditioning(t)
    with torch.no_grad():
        eps = model(t["input.x"], t["input.t"], **cond)
        other = model(t["input.x"], t["input.t"], **dict(cond, time_ids=sdxl.add_time_ids(batch=2).double()))
    assert relative_error(other[0], eps[0]) < FLOAT64_BOUND  # row 0 already had the default ids
    assert relative_error(other[1], eps[1]) > 1e-3


def test_add_time_ids():
    ids = sdxl.add_time_ids((768, 512), (16, 32), (1024, 896), batch=3)
    assert ids.shape == (3, 6) and ids[2].tolist() == [768, 512, 16, 32, 1024, 896] and ids.dtype == torch.float32
    assert sdxl.add_time_ids().tolist() == [[1024, 1024, 0, 0, 1024, 1024]]  # FastGen's fixed value


def test_feature_taps_are_the_down_and_mid_block_outputs(fixture64):
    """Reference in float64, bound FLOAT64_BOUND (measured 0)."""
    model, t = fixture64
    with torch.no_grad():
        out, features = model(t["input.x"], t["input.t"], **conditioning(t), feature_indices={0, 1, 2, 3})
        early = model(t["input.x"], t["input.t"], **conditioning(t), feature_indices={0}, features_only=True)
    assert relative_error(out, t["output.eps.f64"]) < FLOAT64_BOUND
    for name, feature in zip(["0", "1", "2", "mid"], features):
        assert relative_error(feature, t[f"output.feature.{name}.f64"]) < FLOAT64_BOUND, name
    assert len(early) == 1 and torch.equal(early[0], features[0])


def test_forward_and_backward_on_tiny():
    torch.manual_seed(0)
    model = sdxl.UNet(sdxl.CONFIGS["tiny"])
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([10.0, 500.0]), torch.randn(2, 7, 64), torch.randn(2, 32), sdxl.add_time_ids(batch=2))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------
# Schedule and samplers


def test_schedule_matches_diffusers_euler_scheduler(fixture):
    """The same table as SD1.5; the release's leading spacing with steps_offset 1, and Euler's noise levels. Against
    EulerDiscreteScheduler run in float64 (its float32 table and levels are up to 2.4e-6 off), bound 1e-12 relative
    (measured <= 3e-16)."""
    _, t = fixture
    ours = sdxl.alphas_cumprod()
    assert ((ours - t["schedule.alphas_cumprod.f64"]).abs() / ours).max() < 1e-12
    steps = sdxl.leading_timesteps(50)
    assert torch.equal(steps, t["schedule.timesteps_50"].double())
    assert torch.equal(sdxl.leading_timesteps(3), t["schedule.timesteps_3"].double())
    levels = sdxl.sigma(steps) / sdxl.alpha(steps)
    assert torch.allclose(levels, t["schedule.sigmas_50.f64"][:-1], rtol=1e-12, atol=0)
    assert t["schedule.sigmas_50.f64"][-1] == 0


def test_euler_with_guidance_matches_diffusers(fixture64):
    """Three Euler steps (timesteps 667, 334, 1, then noise level 0) with guidance 5, as EulerDiscreteScheduler.
    Reference in float64 (UNet and scheduler), bound FLOAT64_BOUND (measured 6.5e-16)."""
    model, t = fixture64
    latents = sdxl.sample_euler(model, t["input.noise"], conditioning(t), conditioning(t, null=True), 3, guidance=5.0)
    assert relative_error(latents, t["output.euler_3.f64"]) < FLOAT64_BOUND


def test_ddim_and_student_samplers_run(fixture):
    model, t = fixture
    noise = t["input.noise"]
    ddim = sdxl.sample_ddim(model, noise, conditioning(t), conditioning(t, null=True), steps=2, guidance=5.0)
    student = sdxl.sample_student(model, noise, conditioning(t), times=sdxl.t_list(2))
    assert ddim.shape == student.shape == noise.shape and ddim.isfinite().all() and student.isfinite().all()


# ----------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("shards", [1, 2])
def test_from_pretrained_local_pipeline_folder(tmp_path, shards):
    weights, t, metadata = load_fixture()
    write_unet_folder(str(tmp_path / "sdxl" / "unet"), weights, metadata["config"], shards)
    model = sdxl.from_pretrained(str(tmp_path / "sdxl"), dtype=torch.float64)
    assert not any(p.is_meta for p in model.parameters())
    t = {k: v.double() if k.startswith("input.") else v for k, v in t.items()}
    with torch.no_grad():  # reference in float64
        assert relative_error(model(t["input.x"], t["input.t"], **conditioning(t)), t["output.eps.f64"]) < FLOAT64_BOUND


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    """SD1.5-style weights under no add_embedding: the strict check lists what is missing."""
    weights, _, metadata = load_fixture()
    broken = {k: v for k, v in weights.items() if not k.startswith("add_embedding.")}
    write_unet_folder(str(tmp_path / "unet"), broken, metadata["config"])
    with pytest.raises(ValueError) as info:
        sdxl.from_pretrained(str(tmp_path))
    assert "missing:    add_embedding.linear_1.weight (64, 68)" in str(info.value)
    assert "missing:    add_embedding.linear_2.bias (64,)" in str(info.value)


def test_smoke_test_runs():
    result = subprocess.run(
        [sys.executable, "models/sdxl.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr
    assert "sdxl tiny: 1,360,740 parameters" in result.stdout  # diffusers' count for the same config (networks.md)
