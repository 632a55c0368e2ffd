"""models/sd15.py: key manifest of the released UNet, golden parity with diffusers' UNet2DConditionModel (text mask,
odd latent sides, feature taps), the sd schedule against diffusers' DDIMScheduler, DDIM sampling with guidance,
config.json mapping and strict loading from local folders and the Hub cache."""

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

from models import sd15

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"

# Golden parity bounds (relative to the output scale). The generator ran diffusers in float32 and in float64 on the
# same weights and inputs (exact in float64; tests/generate/reference64.py lifts diffusers' float32 islands); the
# float64 outputs are stored as NAME.f64. Our model in float64 against them: measured <= 2e-15 (1 and 2 threads),
# whatever the kernels' order of summation; FLOAT64_BOUND leaves 1e4x room and still catches any real difference.
FLOAT64_BOUND = 1e-10
# Our model in float32 against the float32 outputs sits on the float32 noise floor, which moves with the CPU and its
# kernels: bounded by FLOAT32_FACTOR times the reference's own float32-vs-float64 error on the same output (measured
# ratio of ours to that: <= 0.8).
FLOAT32_FACTOR = 20

# unet/config.json of the release.
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def load_fixture():
    """Weights (stored as float16-exact values) under the real key names, the other tensors, and the metadata."""
    with safe_open(os.path.join(HERE, "fixtures", "sd15_tiny.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    weights = {k: v.float() for k, v in tensors.items() if not k.startswith(("input.", "output.", "schedule."))}
    return weights, tensors, metadata


@pytest.fixture(scope="module")
def fixture():
    weights, tensors, metadata = load_fixture()
    model = sd15.UNet(sd15.config_from_diffusers(json.loads(metadata["config"]))).eval()
    model.load_state_dict(weights, strict=True)
    return model, tensors


@pytest.fixture(scope="module")
def fixture64(fixture):
    """The model in float64 and the inputs cast to float64 (exact), with the expected outputs."""
    model, tensors = fixture
    inputs = {k: v.double() for k, v in tensors.items() if k.startswith("input.")}
    return copy.deepcopy(model).double(), {**tensors, **inputs}


def relative_error(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def outputs(model, t):
    """The model on the fixture's inputs without and with the text mask, and on a 10x6 latent."""
    with torch.no_grad():
        return {
            "eps": model(t["input.x"], t["input.t"], t["input.text"]),
            "eps_masked": model(t["input.x"], t["input.t"], t["input.text"], text_mask=t["input.mask"]),
            "eps_odd": model(t["input.odd"], 500.0, t["input.text"][:1]),
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
# Checkpoint layout


def test_full_size_keys_match_the_released_checkpoint():
    with open(os.path.join(HERE, "manifests", "sd15-unet.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = sd15.UNet(sd15.CONFIGS["sd15"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest
    assert sum(p.numel() for p in model.parameters()) == 859_520_964  # the published size


def test_released_config_json_maps_to_the_preset():
    assert sd15.config_from_diffusers(SD15_CONFIG_JSON) == replace(sd15.CONFIGS["sd15"], repo="")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"act_fn": "gelu"}, "act_fn='gelu'; only 'silu'"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "only the mirror"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "only CrossAttnDownBlock2D / DownBlock2D"),
        ({"attention_head_dim": [8, 8]}, "attention_head_dim|num_attention_heads for 2 levels"),
        ({"some_new_field": 1}, r"does not know: \['some_new_field'\]"),
        ({"_class_name": "UNet2DModel"}, "not a UNet2DConditionModel"),
    ],
)
def test_config_json_with_unknown_values_is_refused(edit, message):
    with pytest.raises(ValueError, match=message):
        sd15.config_from_diffusers({**SD15_CONFIG_JSON, **edit})


# ----------------------------------------------------------------------------
# Golden parity with diffusers


def test_matches_diffusers_outputs(fixture64):
    """Without and with the text mask FastGen passes, and on a 10x6 latent whose sides do not halve evenly. Reference
    in float64, bound FLOAT64_BOUND (measured <= 2e-15, mostly 0: the same order of operations)."""
    model, t = fixture64
    cases = outputs(model, t)
    assert cases["eps_odd"].shape == (1, 4, 10, 6)
    assert relative_error(cases["eps_masked"], cases["eps"]) > 1e-2  # the mask matters
    for case, out in cases.items():
        err = relative_error(out, t[f"output.{case}.f64"])
        assert out.dtype == torch.float64 and err < FLOAT64_BOUND, f"{case}: max abs error {err:.2e} of output scale"


def test_matches_diffusers_outputs_in_float32(fixture):
    """The float32 path (time features in float32, as diffusers computes them) against the reference in float32,
    bound FLOAT32_FACTOR x the reference's own float32 error on each output (9.6e-7 to 1.3e-6)."""
    model, t = fixture
    for case, out in outputs(model, t).items():
        key = "output." + case
        err, bound = relative_error(out, t[key]), FLOAT32_FACTOR * relative_error(t[key], t[key + ".f64"])
        assert out.dtype == torch.float32 and err < bound, (
            f"{case}: max abs error {err:.2e} of output scale > {bound:.2e}"
        )


def test_feature_taps_are_the_down_and_mid_block_outputs(fixture64):
    """Reference in float64, bound FLOAT64_BOUND (measured 0)."""
    model, t = fixture64
    names = ["0", "1", "2", "mid"]
    with torch.no_grad():
        out, features = model(t["input.x"], t["input.t"], t["input.text"], feature_indices={0, 1, 2, 3})
        early = model(t["input.x"], t["input.t"], t["input.text"], feature_indices={1}, features_only=True)
        mid_only = model(t["input.x"], t["input.t"], t["input.text"], feature_indices={3}, features_only=True)
    assert relative_error(out, t["output.eps.f64"]) < FLOAT64_BOUND
    for name, feature in zip(names, features):
        assert relative_error(feature, t[f"output.feature.{name}.f64"]) < FLOAT64_BOUND, name
    assert len(early) == 1 and torch.equal(early[0], features[1])
    assert len(mid_only) == 1 and torch.equal(mid_only[0], features[3])


def test_forward_and_backward_on_tiny():
    torch.manual_seed(0)
    model = sd15.UNet(sd15.CONFIGS["tiny"])
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    out = model(x, torch.tensor([10.0, 500.0]), text)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------
# Schedule


def test_schedule_table_matches_diffusers(fixture):
    """Against DDIMScheduler's table built in float64 (its float32 one is up to 9.3e-7 off), bound 1e-12 relative
    (measured 0: the same formula)."""
    _, t = fixture
    ours, theirs = sd15.alphas_cumprod(), t["schedule.alphas_cumprod.f64"]
    assert ((ours - theirs).abs() / ours).max() < 1e-12
    assert abs(ours[0].item() - 0.99915) < 1e-5 and abs(ours[999].item() - 0.0046600) < 1e-6  # networks.md Sec. 2.3
    assert torch.equal(sd15.leading_timesteps(50), t["schedule.timesteps_50"].double())
    assert torch.equal(sd15.leading_timesteps(3), t["schedule.timesteps_3"].double())


def test_alpha_and_sigma_interpolate_the_table():
    steps = torch.arange(1000, dtype=torch.float64)
    abar = sd15.alphas_cumprod()
    assert torch.allclose(sd15.alpha(steps), abar.sqrt(), rtol=1e-12)
    assert torch.allclose(sd15.sigma(steps), (1 - abar).sqrt(), rtol=1e-12)
    t = torch.linspace(0, 999, 777, dtype=torch.float64)
    assert torch.allclose(sd15.alpha(t) ** 2 + sd15.sigma(t) ** 2, torch.ones_like(t))
    mid = torch.tensor([749.25], dtype=torch.float64)  # a 4-step student time: between the table's neighbours
    assert abar[750].sqrt() < sd15.alpha(mid) < abar[749].sqrt()
    h = 1e-6
    for f, df in ((sd15.alpha, sd15.alpha_prime), (sd15.sigma, sd15.sigma_prime)):
        numeric = (f(t[1:-1] + h) - f(t[1:-1] - h)) / (2 * h)
        assert torch.allclose(df(t[1:-1]), numeric, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("pred_type", ["x0", "eps", "v", "flow"])
def test_prediction_types_round_trip(pred_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g).double(), torch.randn(3, 4, 2, 2, generator=g).double()
    t = torch.tensor([1.0, 400.5, 999.0], dtype=torch.float64)
    x_t = sd15.alpha(t)[:, None, None, None] * x0 + sd15.sigma(t)[:, None, None, None] * eps
    out = sd15.from_x0(x_t, x0, t, pred_type)
    assert torch.allclose(sd15.to_x0(x_t, out, t, pred_type), x0, atol=1e-9)
    assert torch.allclose(sd15.convert(x_t, eps, t, "eps", "x0"), x0, atol=1e-9)
    if pred_type == "v":  # alpha^2 + sigma^2 = 1: v = alpha eps - sigma x0 (Salimans & Ho 2022)
        a, s = sd15.alpha(t)[:, None, None, None], sd15.sigma(t)[:, None, None, None]
        assert torch.allclose(out, a * eps - s * x0, atol=1e-9)


def test_time_lists_and_samplers_of_t():
    assert sd15.t_list(1).tolist() == [999.0, 0.0]
    assert sd15.t_list(4).tolist() == [999.0, 749.25, 499.5, 249.75, 0.0]
    g = torch.Generator().manual_seed(0)
    for kind in ("logitnormal", "uniform"):
        t = sd15.sample_t(4000, kind, t_min=1.0, t_max=999.0, generator=g)
        assert t.dtype == torch.float64 and t.min() >= 1.0 and t.max() <= 999.0
        assert abs(t.mean().item() - 500) < 25
    discrete = sd15.sample_t(4000, "discrete", generator=g)
    assert torch.equal(discrete, discrete.round()) and discrete.min() == 0 and discrete.max() == 999
    with pytest.raises(ValueError, match="unknown time sampler 'lognormal'"):
        sd15.sample_t(4, "lognormal")


# ----------------------------------------------------------------------------
# Samplers


def test_ddim_with_guidance_matches_diffusers(fixture64):
    """Three DDIM steps (timesteps 667, 334, 1, then 0) with guidance 7.5, as diffusers' DDIMScheduler runs them.
    Reference in float64 (UNet and scheduler), bound FLOAT64_BOUND (measured 1.1e-15)."""
    model, t = fixture64
    latents = sd15.sample_ddim(
        model, t["input.noise"], dict(text=t["input.text"]), dict(text=t["input.null"]), steps=3, guidance=7.5
    )
    assert relative_error(latents, t["output.ddim_3.f64"]) < FLOAT64_BOUND


def test_guidance_is_one_batched_call_of_both_halves(fixture64):
    """Batched and separate calls of our own model in float64 agree to rounding, bound FLOAT64_BOUND."""
    model, t = fixture64
    cond = dict(text=t["input.text"], text_mask=t["input.mask"])
    uncond = dict(text=t["input.null"], text_mask=torch.ones_like(t["input.mask"]))
    x, steps = t["input.x"], t["input.t"]
    with torch.no_grad():
        c, u = model(x, steps, **cond), model(x, steps, **uncond)
        assert relative_error(sd15.guided(model, x, steps, cond, uncond, 3.0), u + 3.0 * (c - u)) < FLOAT64_BOUND
        assert torch.equal(sd15.guided(model, x, steps, cond, uncond, 1.0), c)
    with pytest.raises(ValueError, match="same keys"):
        sd15.guided(model, x, steps, cond, dict(text=t["input.null"]), 3.0)


def test_euler_and_student_samplers_run(fixture):
    model, t = fixture
    noise, cond = t["input.noise"], dict(text=t["input.text"])
    euler = sd15.sample_euler(model, noise, cond, dict(text=t["input.null"]), steps=3)
    student = sd15.sample_student(model, noise, cond, steps=2, generator=torch.Generator().manual_seed(0))
    assert euler.shape == student.shape == noise.shape and euler.isfinite().all() and student.isfinite().all()


# ----------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_local_pipeline_folder(tmp_path, fixture, shards):
    weights, t, metadata = load_fixture()
    write_unet_folder(str(tmp_path / "pipeline" / "unet"), weights, metadata["config"], shards)
    x, text = t["input.x"].double(), t["input.text"].double()
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "unet"):
        model = sd15.from_pretrained(str(source), dtype=torch.float64)
        assert not any(p.is_meta for p in model.parameters()) and not model.training
        with torch.no_grad():  # reference in float64
            assert relative_error(model(x, t["input.t"], text), t["output.eps.f64"]) < FLOAT64_BOUND


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A Hub-layout cache under HF_HOME, read with HF_HUB_OFFLINE=1 in a fresh process (huggingface_hub reads the
    variables at import)."""
    weights, _, metadata = load_fixture()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_unet_folder(str(repo / "snapshots" / commit / "unet"), weights, metadata["config"])
    script = """
from models import sd15
model = sd15.from_pretrained("org/tiny-sd")
print("loaded", sum(p.numel() for p in model.parameters()))
try:
    sd15.from_pretrained("org/absent-sd")
except FileNotFoundError as e:
    print("absent:", e)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"loaded {sum(v.numel() for v in weights.values())}"
    assert lines[1].startswith("absent: org/absent-sd is not in the Hugging Face cache")
    assert "hf download org/absent-sd --include 'unet/*'" in lines[1]


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    weights, _, metadata = load_fixture()
    broken = dict(weights)
    del broken["mid_block.attentions.0.proj_in.weight"]
    broken["mid_block.extra.weight"] = torch.zeros(2)
    broken["conv_in.weight"] = torch.zeros(16, 4, 1, 1)
    write_unet_folder(str(tmp_path / "unet"), broken, metadata["config"])
    with pytest.raises(ValueError) as info:
        sd15.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert "missing:    mid_block.attentions.0.proj_in.weight (32, 32, 1, 1)" in message
    assert "unexpected: mid_block.extra.weight (2,)" in message
    assert "shape:      conv_in.weight checkpoint (16, 4, 1, 1) != model (16, 4, 3, 3)" in message


def test_missing_files_and_names_are_clear_errors(tmp_path):
    weights, _, metadata = load_fixture()
    save_file(weights, str(tmp_path / "bare.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json next to"):
        sd15.from_pretrained(str(tmp_path / "bare.safetensors"))
    cfg = sd15.config_from_diffusers(json.loads(metadata["config"]))
    assert sd15.from_pretrained(str(tmp_path / "bare.safetensors"), config=cfg).cfg == cfg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        sd15.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        sd15.from_pretrained(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="tiny has no released weights"):
        sd15.from_pretrained("tiny")


def test_smoke_test_runs():
    result = subprocess.run(
        [sys.executable, "models/sd15.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr
    assert "sd15 tiny: 792,964 parameters" in result.stdout  # diffusers' count for the same config (networks.md)
