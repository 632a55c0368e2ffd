"""models/flux.py: key manifests of FLUX.1-dev and -schnell, golden parity with diffusers' FluxTransformer2DModel (with
and without the guidance embedding, feature taps), the rf schedule and resolution shift against FluxPipeline and
FlowMatchEulerDiscreteScheduler, the Euler sampler with true CFG, the original BFL key table, and strict loading."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import flux

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"
NON_WEIGHTS = ("input.", "output.", "sample.", "schedule.")  # expected outputs: float32, and float64 as NAME.f64

# Golden parity bounds (relative to the output scale). The generator ran diffusers in float32 and in float64 on the
# same weights and inputs (exact in float64; tests/generate/reference64.py lifts diffusers' float32 islands).
# Our model in float64 against the float64 outputs: measured <= 5e-15 (1 and 2 threads), whatever the kernels' order
# of summation; FLOAT64_BOUND leaves 1e4x room and still catches any real difference.
FLOAT64_BOUND = 1e-10
# Our model in float32 against the float32 outputs sits on the float32 noise floor, which moves with the CPU and its
# kernels: bounded by FLOAT32_FACTOR times the reference's own float32-vs-float64 error on the same output (measured
# ratio of ours to that: <= 0.7).
FLOAT32_FACTOR = 20


def load_fixture(name):
    """Weights under the real key names, the other tensors (inputs, diffusers' outputs), and the config.json text."""
    with safe_open(os.path.join(HERE, "fixtures", f"{name}.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config_json = f.metadata()["config"]
    weights = {k: v for k, v in tensors.items() if not k.startswith(NON_WEIGHTS)}
    return weights, tensors, config_json


def fixture_model(name="flux_tiny", dtype=torch.float32):
    weights, tensors, config_json = load_fixture(name)
    model = flux.FluxModel(flux.config_from_diffusers(json.loads(config_json))).eval()
    model.load_state_dict(weights, strict=True)
    return model.to(dtype), tensors


def relative_error(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def float32_bound(t, key):
    """FLOAT32_FACTOR times the reference's own float32 error on output `key`."""
    return FLOAT32_FACTOR * relative_error(t[key], t[key + ".f64"])


def run_fixture(model, t, **kwargs):
    """The model on the fixture's inputs, cast (exactly) to the model's dtype."""
    dtype = model.x_embedder.weight.dtype
    x, time, text, pooled = (t[f"input.{k}"].to(dtype) for k in ("latents", "t", "text", "pooled"))
    guidance = t["input.guidance"].to(dtype) if model.cfg.guidance_embeds else None
    with torch.no_grad():
        return model(x, time, text, pooled, guidance, **kwargs)


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_full_size_keys_match_the_released_checkpoint(name):
    with open(os.path.join(HERE, "manifests", f"{name}.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = flux.FluxModel(flux.CONFIGS[name])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest
    n = sum(math.prod(s) for s in manifest.values())
    assert n == (11_901_408_320 if name == "flux-dev" else 11_891_178_560)
    assert any("guidance_embedder" in k for k in manifest) == (name == "flux-dev")


def test_mid_preset_is_768_wide():
    with torch.device("meta"):
        model = flux.FluxModel(flux.CONFIGS["mid"])
    assert model.x_embedder.weight.shape == (768, 64) and model.num_blocks == 12


# ----------------------------------------------------------------------------
# Golden parity with diffusers


@pytest.mark.parametrize("name", ["flux_tiny", "flux_tiny_schnell"])
def test_matches_diffusers_outputs(name):
    """Reference in float64, bound FLOAT64_BOUND (measured <= 9e-16)."""
    model, t = fixture_model(name, torch.float64)
    out = run_fixture(model, t)
    err = relative_error(out, t["output.flow.f64"])
    assert out.dtype == torch.float64 and err < FLOAT64_BOUND, f"{name}: max abs error {err:.2e} of output scale"


@pytest.mark.parametrize("name", ["flux_tiny", "flux_tiny_schnell"])
def test_matches_diffusers_outputs_in_float32(name):
    """The float32 path (time features, RoPE tables and rotation in float32, as diffusers computes them) against the
    reference in float32, bound FLOAT32_FACTOR x the reference's own float32 error (2.2e-5 dev, 7.8e-6 schnell)."""
    model, t = fixture_model(name)
    out = run_fixture(model, t)
    err, bound = relative_error(out, t["output.flow"]), float32_bound(t, "output.flow")
    assert out.dtype == torch.float32 and err < bound, f"{name}: max abs error {err:.2e} of output scale > {bound:.2e}"


def test_ids_and_packing_are_the_pipelines():
    _, t = fixture_model()
    assert torch.equal(flux.image_ids(4, 6), t["input.img_ids"])
    assert torch.equal(flux.text_ids(7), t["input.txt_ids"])
    x = torch.randn(2, 16, 6, 10)
    tokens = flux.pack(x)
    assert tokens.shape == (2, 15, 64) and torch.equal(flux.unpack(tokens, 6, 10), x)
    # token 1 is the patch at (row 0, col 1); its channels are ordered (c, dy, dx)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0:2, 2:4].flatten())
    with pytest.raises(ValueError, match="must be even"):
        flux.pack(torch.zeros(1, 16, 5, 4))


def test_feature_taps_are_the_image_tokens_after_each_block():
    """Reference in float64, bound FLOAT64_BOUND (measured <= 3e-16)."""
    model, t = fixture_model(dtype=torch.float64)
    out, features = run_fixture(model, t, feature_indices={0, 1, 2, 3})
    assert relative_error(out, t["output.flow.f64"]) < FLOAT64_BOUND
    for i, feature in enumerate(features):
        assert feature.shape == (2, 32, 4, 6)
        assert relative_error(feature.flatten(2).transpose(1, 2), t[f"output.features.{i}.f64"]) < FLOAT64_BOUND
    early = run_fixture(model, t, feature_indices=[1], features_only=True)
    assert len(early) == 1 and torch.equal(early[0], features[1])
    assert run_fixture(model, t, feature_indices=(), features_only=True) == []


def test_guidance_and_time_conventions():
    """t in [0, 1] and the guidance scale as given (the model multiplies both by 1000); guidance None means 3.5;
    schnell refuses a guidance value."""
    model, t = fixture_model()
    x, text, pooled = t["input.latents"][:1], t["input.text"][:1], t["input.pooled"][:1]
    with torch.no_grad():
        default = model(x, 0.3, text, pooled)
        assert torch.equal(default, model(x, torch.tensor([0.3]), text, pooled, guidance=3.5))
        assert not torch.allclose(default, model(x, 0.3, text, pooled, guidance=5.0))
    schnell, _ = fixture_model("flux_tiny_schnell")
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell(x, 0.3, text, pooled, guidance=3.5)


def test_forward_and_backward_on_tiny():
    torch.manual_seed(0)
    model = flux.FluxModel(flux.CONFIGS["tiny"])
    x, text, pooled = torch.randn(2, 16, 4, 6), torch.randn(2, 5, 32), torch.randn(2, 16)
    out = model(x, torch.tensor([0.2, 0.7]), text, pooled, torch.tensor([2.0, 4.0]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_rope_axes_must_sum_to_the_head_dim():
    with pytest.raises(ValueError, match="must sum to the head dim"):
        flux.FluxModel(flux.Config(num_layers=1, num_single_layers=1, axes_dims_rope=(16, 56, 48)))


# ----------------------------------------------------------------------------
# Schedule


def test_rf_schedule_identities_and_conversions():
    t = torch.tensor([0.0, 0.25, 0.5, 0.999], dtype=torch.float64)
    assert torch.equal(flux.alpha(t) + flux.sigma(t), torch.ones(4, dtype=torch.float64))
    x0, eps = torch.randn(4, 16, 2, 2, dtype=torch.float64), torch.randn(4, 16, 2, 2, dtype=torch.float64)
    tt = t[1:]
    x_t = (1 - tt)[:, None, None, None] * x0[1:] + tt[:, None, None, None] * eps[1:]
    flow = eps[1:] - x0[1:]
    assert torch.allclose(flux.to_x0(x_t, flow, tt, "flow"), x0[1:], atol=1e-10)
    assert torch.allclose(flux.convert(x_t, flow, tt, "flow", "eps"), eps[1:], atol=1e-10)
    assert torch.allclose(flux.from_x0(x_t, x0[1:], tt, "flow"), flow, atol=1e-10)
    assert flux.PRED_TYPE == "flow"


def test_shift_and_sampling_times_match_diffusers():
    """Against calculate_shift and FlowMatchEulerDiscreteScheduler run in float64 (its float32 sigmas are 7e-8 off),
    bound 1e-12 (measured <= 3e-16)."""
    _, t = fixture_model()
    assert torch.allclose(flux.shift_mu(t["schedule.seq_lens"]), t["schedule.mu.f64"], rtol=0, atol=1e-12)
    assert flux.shift_mu(256) == 0.5 and abs(flux.shift_mu(4096) - 1.15) < 1e-12
    keys = [k for k in t if k.startswith("schedule.sigmas.") and k.endswith(".f64")]
    assert len(keys) == 4
    for key in keys:
        steps, seq_len = map(int, key.split(".")[2:4])
        times = flux.sampling_times(steps, seq_len)
        assert times.dtype == torch.float64 and times[0] == 1.0 and times[-1] == 0.0
        assert torch.allclose(times, t[key], rtol=0, atol=1e-12), key


def test_time_shift_and_t_list():
    assert torch.allclose(flux.time_shift(torch.tensor([0.0, 1.0]), 1.15), torch.tensor([0.0, 1.0]).double())
    assert abs(flux.time_shift(0.5, math.log(3.0)).item() - 0.75) < 1e-12  # e^mu = 3: SD3's shift 3 at t = 0.5
    assert torch.allclose(flux.t_list(4), torch.tensor([0.999, 0.74925, 0.4995, 0.24975, 0.0], dtype=torch.float64))
    shifted = flux.t_list(2, mu=1.0)
    assert shifted[0] > 0.999 - 1e-3 and 0.4995 < shifted[1] < 0.999 and shifted[-1] == 0


@pytest.mark.parametrize("kind", ["uniform", "logitnormal", "shifted"])
def test_sample_t_kinds(kind):
    g = torch.Generator().manual_seed(0)
    t = flux.sample_t(20000, kind, generator=g)
    assert t.dtype == torch.float64 and t.min() >= 0.001 and t.max() <= 0.999
    expected_mean = {"uniform": 0.5, "logitnormal": 0.5, "shifted": None}[kind]
    if expected_mean is not None:
        assert abs(t.mean().item() - expected_mean) < 0.01
    else:  # s u / (1 + (s - 1) u) with s = 3 pushes the mass towards 1
        assert t.mean().item() > 0.65
    shifted = flux.sample_t(20000, kind, mu=1.15, generator=torch.Generator().manual_seed(0))
    assert (shifted >= t - 1e-12).all() and shifted.mean() > t.mean() + 0.05
    with pytest.raises(ValueError, match="unknown time sampler"):
        flux.sample_t(2, "polynomial")


# ----------------------------------------------------------------------------
# Samplers


def test_euler_sampler_with_true_cfg_matches_the_pipeline_loop():
    """FluxPipeline's loop (3 steps, guidance 3.5, true CFG 2 with negative embeddings) run by the generator. Reference
    in float64 (model and scheduler), bounds 1e-12 on the times (measured 2e-16) and FLOAT64_BOUND on the latents
    (measured <= 5e-15)."""
    model, t = fixture_model(dtype=torch.float64)
    assert torch.allclose(flux.sampling_times(3, 24), t["sample.times.f64"], rtol=0, atol=1e-12)
    out = flux.sample_euler(
        model,
        t["sample.noise"].double(),
        t["input.text"].double(),
        t["input.pooled"].double(),
        steps=3,
        guidance=3.5,
        neg_text=t["sample.neg_text"].double(),
        neg_pooled=t["sample.neg_pooled"].double(),
        true_cfg=2.0,
    )
    err = relative_error(out, t["sample.latents.f64"])
    assert err < FLOAT64_BOUND, f"sampler: max abs error {err:.2e} of output scale"


def test_student_sampler_one_step_is_the_x0_prediction():
    """Two routes through our own model in float64: they agree to rounding, bound FLOAT64_BOUND."""
    model, t = fixture_model("flux_tiny_schnell", torch.float64)
    noise, text, pooled = t["input.latents"].double(), t["input.text"].double(), t["input.pooled"].double()
    with torch.no_grad():
        one = flux.sample_student(model, noise, text, pooled, steps=1)
        x_t = noise * 0.999
        expected = x_t - 0.999 * model(x_t, torch.tensor(0.999, dtype=torch.float64), text, pooled)
    assert relative_error(one, expected) < FLOAT64_BOUND
    four = flux.sample_student(model, noise, text, pooled, steps=4, generator=torch.Generator().manual_seed(0))
    assert four.shape == noise.shape and four.isfinite().all()


# ----------------------------------------------------------------------------
# Original BFL key table


def test_original_key_table_maps_every_key_once():
    for name, n_original in (("tiny", None), ("flux-dev", 780), ("flux-schnell", 776)):
        cfg = flux.CONFIGS[name]
        with torch.device("meta"):
            ours = set(flux.FluxModel(cfg).state_dict())
        table = flux.original_key_table(cfg)
        targets = [k for group in table.values() for k in group]
        assert len(targets) == len(set(targets)) and set(targets) == ours, name
        if n_original:
            assert len(table) == n_original  # tensors in flux1-dev.safetensors / flux1-schnell.safetensors
    table = flux.original_key_table(flux.CONFIGS["flux-dev"])
    assert table["double_blocks.3.img_attn.qkv.weight"] == [f"transformer_blocks.3.attn.to_{c}.weight" for c in "qkv"]
    assert table["single_blocks.0.linear1.bias"][-1] == "single_transformer_blocks.0.proj_mlp.bias"
    assert table["single_blocks.37.norm.key_norm.scale"] == ["single_transformer_blocks.37.attn.norm_k.weight"]


def test_original_shapes_of_the_full_size_model():
    """The fused shapes of flux1-dev.safetensors: qkv (9216, 3072), linear1 (21504, 3072), linear2 (3072, 15360)."""
    cfg = flux.CONFIGS["flux-dev"]
    with torch.device("meta"):
        state = flux.FluxModel(cfg).state_dict()
    original = flux.to_original(state, cfg)
    assert len(original) == 780
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    assert original["single_blocks.0.linear1.weight"].shape == (21504, 3072)
    assert original["single_blocks.0.linear2.weight"].shape == (3072, 15360)
    assert original["final_layer.adaLN_modulation.1.weight"].shape == (6144, 3072)
    assert flux.config_from_original(original) == flux.Config()


def test_original_layout_round_trips_and_loads(tmp_path):
    weights, t, _ = load_fixture("flux_tiny")
    cfg = flux.config_from_diffusers(json.loads(load_fixture("flux_tiny")[2]))
    original = flux.to_original(weights, cfg)
    assert not set(original) & set(weights) and "double_blocks.1.txt_attn.qkv.bias" in original
    back = flux.from_original(original, cfg)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    # the final adaLN halves are swapped: original (shift, scale), diffusers (scale, shift)
    dim = weights["norm_out.linear.bias"].shape[0] // 2
    assert torch.equal(original["final_layer.adaLN_modulation.1.bias"][:dim], weights["norm_out.linear.bias"][dim:])

    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, str(tmp_path / "flux1-tiny.safetensors"))
    model = flux.from_pretrained(str(tmp_path / "flux1-tiny.safetensors"), config=cfg, dtype=torch.float64)
    assert relative_error(run_fixture(model, t), t["output.flow.f64"]) < FLOAT64_BOUND  # reference in float64


def test_config_is_read_from_the_original_shapes(tmp_path):
    """A full-head-dim (128) file carries its architecture in its shapes; a tiny one needs config=."""
    cfg = flux.Config(num_layers=1, num_single_layers=2, num_attention_heads=1, joint_attention_dim=8)
    cfg = replace(cfg, pooled_projection_dim=4, guidance_embeds=False)
    torch.manual_seed(0)
    model = flux.FluxModel(cfg)
    save_file(flux.to_original(model.state_dict(), cfg), str(tmp_path / "flux1-small.safetensors"))
    loaded = flux.from_pretrained(str(tmp_path / "flux1-small.safetensors"))
    assert loaded.cfg == cfg and torch.equal(loaded.proj_out.weight, model.proj_out.weight)
    weights, _, _ = load_fixture("flux_tiny")
    save_file(flux.to_original(weights, flux.CONFIGS["tiny"]), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(ValueError, match="head dim 16: give config="):
        flux.from_pretrained(str(tmp_path / "tiny.safetensors"))


# ----------------------------------------------------------------------------
# Loading


def write_sharded(folder, weights, config_json, shards=3):
    """A diffusers transformer folder: config.json, N shards and their index, as in FLUX.1-dev/transformer."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(weights)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: weights[k] for k in part}, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, WEIGHTS + ".index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config_json)


def test_from_pretrained_sharded_local_folder(tmp_path):
    weights, t, config_json = load_fixture("flux_tiny")
    write_sharded(str(tmp_path / "FLUX.1-tiny" / "transformer"), weights, config_json)
    for source in (tmp_path / "FLUX.1-tiny", tmp_path / "FLUX.1-tiny" / "transformer"):
        model = flux.from_pretrained(str(source), dtype=torch.float64)
        assert not any(p.is_meta for p in model.parameters())
        assert relative_error(run_fixture(model, t), t["output.flow.f64"]) < FLOAT64_BOUND  # reference in float64

    os.remove(tmp_path / "FLUX.1-tiny" / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors")
    with pytest.raises(
        FileNotFoundError, match=r"shard diffusion_pytorch_model-00002-of-00003.safetensors \(\d+ tensors\)"
    ):
        flux.from_pretrained(str(tmp_path / "FLUX.1-tiny"))


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A Hub-layout cache under HF_HOME with a sharded transformer, read with HF_HUB_OFFLINE=1 in a fresh process
    (huggingface_hub reads the variables at import)."""
    weights, t, config_json = load_fixture("flux_tiny_schnell")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-flux"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_sharded(str(repo / "snapshots" / commit / "transformer"), weights, config_json, shards=2)
    save_file({k: v for k, v in t.items() if k.startswith(("input.", "output."))}, str(tmp_path / "io.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
from models import flux
io = {{k: v.double() for k, v in load_file({str(tmp_path / "io.safetensors")!r}).items()}}
model = flux.from_pretrained("org/tiny-flux", dtype=torch.float64)
with torch.no_grad():
    out = model(io["input.latents"], io["input.t"], io["input.text"], io["input.pooled"])
print("error", ((out - io["output.flow.f64"]).abs().max() / io["output.flow.f64"].abs().max()).item())
try:
    flux.from_pretrained("org/absent-flux")
except FileNotFoundError as e:
    print("absent:", e)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert float(lines[0].split()[-1]) < FLOAT64_BOUND  # reference in float64
    assert lines[1].startswith("absent: org/absent-flux is not in the Hugging Face cache")
    assert "hf download org/absent-flux --include 'transformer/*'" in lines[1]


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    """dev weights under a schnell config.json: the guidance embedder is unexpected; a dropped key is missing."""
    weights, _, config_json = load_fixture("flux_tiny")
    schnell = dict(json.loads(config_json), guidance_embeds=False)
    weights = {k: v for k, v in weights.items() if k != "proj_out.bias"}
    os.makedirs(tmp_path / "transformer")
    save_file(weights, str(tmp_path / "transformer" / WEIGHTS))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(schnell))
    with pytest.raises(ValueError) as info:
        flux.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert "unexpected: time_text_embed.guidance_embedder.linear_1.weight (32, 256)" in message
    assert "missing:    proj_out.bias (64,)" in message


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"patch_size": 2}, "only 1"),
        ({"out_channels": 32}, "out_channels=32"),
        ({"num_layers_extra": 3}, r"does not know: \['num_layers_extra'\]"),
        ({"_class_name": "SD3Transformer2DModel"}, "not a FluxTransformer2DModel"),
    ],
)
def test_config_json_with_unknown_values_is_refused(edit, message):
    d = {**json.loads(load_fixture("flux_tiny")[2]), **edit}
    with pytest.raises(ValueError, match=message):
        flux.config_from_diffusers(d)


def test_config_json_of_the_released_model_maps_to_the_preset():
    released = {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": 128,
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
        "axes_dims_rope": [16, 56, 56],
    }
    assert flux.config_from_diffusers(released) == flux.Config()
    with pytest.raises(ValueError, match="tiny has no released weights"):
        flux.from_pretrained("tiny")


def test_smoke_test_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "models/flux.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "flux tiny" in result.stdout and "parameters" in result.stdout
