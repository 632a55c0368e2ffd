"""models/cosmos_predict2.py: the rectified-flow schedule, key manifests of the 2B and 14B releases, golden parity with
FastGen's port of the official network (text2world, Video2World, padding mask, features), the checkpoint key rule,
strict loading, the Euler sampler with guidance and Video2World conditioning."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import cosmos_predict2 as cp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RELEASED = [name for name, cfg in cp.CONFIGS.items() if cfg.repo]


# Golden parity runs in float64: the model (`.double()`, inputs cast exactly) against FastGen's network run in float64
# on the same weights and inputs (the fixture's `output.*.f64`, tests/generate/reference_float64.py: its time
# embedding, RoPE and use_wan_fp32_strategy casts in float64 too). Measured: at most 4.4e-16 of the output scale (most
# outputs exactly equal), at 1 and 2 threads; float32 sits near 5e-7. The bound leaves room for other machines'
# kernels and is three orders of magnitude below float32's noise.
FLOAT64_BOUND = 1e-10


def load_fixture():
    """(weights under the real key names, all tensors: inputs, FastGen's float32 and float64 outputs) of the FastGen
    fixture."""
    tensors = load_file(os.path.join(HERE, "fixtures", "cosmos_predict2_tiny.safetensors"))
    weights = {k: v for k, v in tensors.items() if k.split(".")[0] not in ("input", "output")}
    return weights, tensors


def fixture_model(dtype=torch.float32):
    """The fixture's model and tensors; for float64 the model and every float tensor cast (exactly) to float64."""
    weights, tensors = load_fixture()
    model = cp.CosmosPredict2(cp.CONFIGS["tiny"]).eval()
    model.load_state_dict(weights, strict=True)
    if dtype == torch.float64:
        model, tensors = model.double(), double(tensors)
    return model, tensors


def double(tensors):
    return {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


# ----------------------------------------------------------------------------
# Schedule


def test_rectified_flow_identities():
    t = torch.tensor([0.0, 0.25, 0.999], dtype=torch.float64)
    assert torch.equal(cp.alpha(t) + cp.sigma(t), torch.ones_like(t))
    assert torch.equal(cp.alpha_prime(t), -torch.ones_like(t)) and torch.equal(cp.sigma_prime(t), torch.ones_like(t))
    assert cp.PRED_TYPE == "flow" and cp.T_MAX == 0.999


@pytest.mark.parametrize("pred_type", ["x0", "eps", "v", "flow"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_prediction_round_trip(pred_type, per_frame):
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(2, 3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([[0.01, 0.5, 0.7, 0.999], [0.3, 0.3, 0.2, 0.1]], dtype=torch.float64)  # (B, T)
    t = t if per_frame else t[:, 1]
    t5 = t[:, None, :, None, None] if per_frame else t.reshape(-1, 1, 1, 1, 1)
    x_t = (1 - t5) * x0 + t5 * eps
    out = cp.from_x0(x_t, x0, t, pred_type)
    assert torch.allclose(cp.to_x0(x_t, out, t, pred_type), x0, atol=1e-9)
    if pred_type == "flow":
        assert torch.allclose(out, eps - x0, atol=1e-9)
    if pred_type == "eps":
        assert torch.allclose(cp.convert(x_t, eps - x0, t, "flow", "eps"), eps, atol=1e-9)
    with pytest.raises(ValueError, match="unknown prediction type"):
        cp.to_x0(x_t, out, t, "score")


def test_default_student_times_are_fastgens_shifted_list():
    """FastGen's Cosmos DMD2 config: t_list [0.999, 0.937, 0.833, 0.624, 0.0], the shift-5 warp of 1, .75, .5, .25, 0."""
    four = cp.t_list(4)
    assert torch.allclose(four, torch.tensor([0.999, 0.9375, 2.5 / 3, 0.625, 0.0], dtype=torch.float64))
    assert torch.allclose(four, torch.tensor([0.999, 0.937, 0.833, 0.624, 0.0], dtype=torch.float64), atol=1.1e-3)
    assert torch.allclose(cp.t_list(2), torch.tensor([0.999, 2.5 / 3, 0.0], dtype=torch.float64))
    assert four.dtype == torch.float64


@pytest.mark.parametrize("kind", ["shifted", "uniform", "logitnormal"])
def test_time_samplers(kind):
    g = torch.Generator().manual_seed(0)
    t = cp.sample_t(20000, kind, generator=g)
    assert t.dtype == torch.float64 and t.min() >= 0.001 and t.max() <= 0.999
    if kind == "shifted":  # the median 1/2 of u maps to 5/6
        assert abs(t.median().item() - (0.001 + 0.998 * 5 / 6)) < 0.01
    if kind == "uniform":
        assert abs(t.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown time sampler"):
        cp.sample_t(4, "lognormal")


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize("name", RELEASED)
def test_full_size_keys_match_the_released_checkpoint(name):
    """Manifests from FastGen's network with the real configs on the meta device (= the official keys, less `net.`)."""
    with open(os.path.join(HERE, "manifests", f"{name}.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = cp.CosmosPredict2(cp.CONFIGS[name])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == manifest
    numel = sum(v.numel() for v in model.state_dict().values())
    assert numel == {"cosmos-predict2.5-2b": 2_059_175_083, "cosmos-predict2.5-14b": 14_368_047_275}[name]


def test_presets():
    cfg = cp.CONFIGS["cosmos-predict2.5-14b"]
    assert (cfg.model_channels // cfg.num_heads, cfg.num_blocks, cfg.crossattn_proj_in_channels) == (128, 36, 28 * 3584)
    assert cfg.file.endswith("_ema_bf16.pt") and cfg.repo == "nvidia/Cosmos-Predict2.5-14B"
    assert cp.CosmosPredict2(cp.CONFIGS["tiny"]).pos_embedder.dim_h == 4  # head 16 -> t 8, h 4, w 4


# ----------------------------------------------------------------------------
# Golden parity with FastGen's CosmosPredict2


def test_text2world_matches_fastgen():
    """float64 against FastGen in float64; bound FLOAT64_BOUND (measured 0)."""
    model, t = fixture_model(torch.float64)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"])
        per_frame = model(t["input.x"], t["input.t"][:, None].expand(2, 3), t["input.text"])
    assert out.shape == (2, 4, 3, 8, 8) and out.dtype == torch.float64
    assert relative_error(out, t["output.t2w.f64"]) < FLOAT64_BOUND
    # one time per frame, all equal = one time per sample: measured 5.5e-16 (float32 3e-7)
    assert relative_error(per_frame, out) < 1e-12


def test_video2world_matches_fastgen():
    """Condition mask channel, first frame replaced by the given latent, that frame at time 0; x0 with the frame kept.
    float64 against FastGen in float64; bound FLOAT64_BOUND (measured 0 and 4.4e-16)."""
    model, t = fixture_model(torch.float64)
    x, text, cond = t["input.x"], t["input.text"], t["input.cond_latents"]
    assert torch.equal(cp.condition_mask(x, 1), t["input.condition_mask"])
    with torch.no_grad():
        out = model(x, t["input.t_frames"], text, cond_latents=cond)
        assert relative_error(out, t["output.v2w.f64"]) < FLOAT64_BOUND
        flow = model(x, t["input.t"], text, cond_latents=cond)
    x0 = cp.replace_frames(cp.to_x0(cp.replace_frames(x, cond), flow, t["input.t"]), cond)
    assert relative_error(x0, t["output.v2w_x0.f64"]) < FLOAT64_BOUND
    assert relative_error(out, t["output.t2w"]) > 0.1  # the conditioning is seen


def test_padding_mask_matches_fastgen():
    """float64 against FastGen in float64; bound FLOAT64_BOUND (measured 0)."""
    model, t = fixture_model(torch.float64)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"], padding_mask=t["input.padding_mask"])
    assert relative_error(out, t["output.padding.f64"]) < FLOAT64_BOUND


def test_float32_stays_within_fastgens_own_float32_error():
    """The float32 model (float32 norms, RoPE, time features and modulation weights, as the released
    use_wan_fp32_strategy) against FastGen's float64 outputs. Bound: 20x FastGen's own float32 error on each output
    (its float32 output against its float64 one, read from the fixture: 2.5e-7 to 5.5e-7 of the scale). Measured at
    1 and 2 threads: 2.8e-7 to 4.6e-7, at most 1.4x the reference's own error."""
    model, t = fixture_model()
    x, time, text, cond = t["input.x"], t["input.t"], t["input.text"], t["input.cond_latents"]
    with torch.no_grad():
        flow = model(x, time, text, cond_latents=cond)
        cases = {
            "t2w": model(x, time, text),
            "v2w": model(x, t["input.t_frames"], text, cond_latents=cond),
            "v2w_x0": cp.replace_frames(cp.to_x0(cp.replace_frames(x, cond), flow, time), cond),
            "padding": model(x, time, text, padding_mask=t["input.padding_mask"]),
        }
        cases["features0"], cases["features1"] = model(x, time, text, feature_indices={0, 1})[1]
    for key, out in cases.items():
        assert out.dtype == torch.float32
        fastgen_float32_error = relative_error(t[f"output.{key}"], t[f"output.{key}.f64"])
        assert relative_error(out, t[f"output.{key}.f64"]) < 20 * fastgen_float32_error, key


def test_feature_taps_match_fastgen():
    """float64 against FastGen in float64; bound FLOAT64_BOUND (measured 0)."""
    model, t = fixture_model(torch.float64)
    x, time, text = t["input.x"], t["input.t"], t["input.text"]
    with torch.no_grad():
        out, features = model(x, time, text, feature_indices={0, 1})
        early = model(x, time, text, feature_indices={0}, features_only=True)
    assert [tuple(f.shape) for f in features] == [(2, 32, 3, 4, 4)] * 2  # (B, D, T, H / 2, W / 2)
    assert relative_error(features[0], t["output.features0.f64"]) < FLOAT64_BOUND
    assert relative_error(features[1], t["output.features1.f64"]) < FLOAT64_BOUND
    assert torch.equal(early[0], features[0]) and torch.equal(out, model(x, time, text))


def test_rope_buffers_equal_fastgens_but_the_angles_come_from_the_config():
    """The checkpoint's RoPE buffers are FastGen's (and the official) values. The angles are computed from the config,
    so a rounded copy of the exponents (a bfloat16 file rounds 1/42 by 0.2%) leaves the output unchanged (float64,
    against FastGen in float64: FLOAT64_BOUND)."""
    model, t = fixture_model()
    weights, _ = load_fixture()
    for name in ("seq", "dim_spatial_range", "dim_temporal_range"):
        assert torch.equal(getattr(model.pos_embedder, name), weights[f"pos_embedder.{name}"])
    model, t = model.double(), double(t)
    with torch.no_grad():
        model.pos_embedder.dim_spatial_range.mul_(1.004)
        model.pos_embedder.dim_temporal_range.mul_(0.996)
        out = model(t["input.x"], t["input.t"], t["input.text"])
    assert relative_error(out, t["output.t2w.f64"]) < FLOAT64_BOUND


def test_forward_backward_finite():
    torch.manual_seed(0)
    model = cp.CosmosPredict2(cp.CONFIGS["tiny"]).train()
    x, text = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 6, 40)
    out = model(x, torch.tensor([0.2, 0.9]), text, cond_latents=x[:, :, :1])
    out.square().mean().backward()
    assert out.isfinite().all()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        model(torch.randn(1, 4, 3, 7, 8), torch.tensor([0.5]), text[:1])
    with pytest.raises(ValueError, match="exceed the 8 RoPE positions"):
        model(torch.randn(1, 4, 9, 8, 8), torch.tensor([0.5]), text[:1])


# ----------------------------------------------------------------------------
# Sampler


def test_guidance_combines_conditional_and_negative():
    """One batch of 2B against two calls, in float64: measured 1.2e-14 (float32: 3.6e-6, batch-size-dependent
    kernels), bound 1e-12."""
    model, t = fixture_model(torch.float64)
    x, time, text = t["input.x"], t["input.t"], t["input.text"]
    neg = torch.zeros_like(text)
    with torch.no_grad():
        c, u = model(x, time, text), model(x, time, neg)
        assert torch.allclose(cp.guided(model, x, time, text, neg, 3.0), u + 3.0 * (c - u), rtol=0, atol=1e-12)
        assert torch.equal(cp.guided(model, x, time, text, neg, 1.0), c)


def test_euler_sampler_runs_and_keeps_the_conditioning_frames():
    model, t = fixture_model()
    noise, text, cond = t["input.x"], t["input.text"], t["input.cond_latents"]
    plain = cp.sample_euler(model, noise, text, torch.zeros_like(text), steps=3, guidance=2.0)
    v2w = cp.sample_euler(model, noise, text, torch.zeros_like(text), steps=3, guidance=2.0, cond_latents=cond)
    assert plain.shape == v2w.shape == noise.shape and plain.isfinite().all() and v2w.isfinite().all()
    assert torch.equal(v2w[:, :, :1], cond)
    assert not torch.allclose(v2w[:, :, 1:], plain[:, :, 1:])


def test_euler_sampler_on_an_exact_flow():
    """Point data mu: the exact flow (x_t - mu) / t is constant along each straight path, so Euler lands on mu from any
    time grid, the shifted one included."""
    model = cp.CosmosPredict2(cp.CONFIGS["tiny"]).eval()
    mu = 0.3

    def point(x, t, text_embeds, cond_latents=None):
        return ((x.double() - mu) / cp._expand(t, x)).to(x.dtype)

    model.forward = point
    noise, text = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64), torch.zeros(2, 1, 40)
    assert torch.allclose(cp.sample_euler(model, noise, text, steps=4), torch.full_like(noise, mu), atol=1e-9)


# ----------------------------------------------------------------------------
# Loading


def official_file(weights):
    """The weights as the official release stores them: `net.` prefix, training counters, Transformer Engine state."""
    state = {f"net.{k}": v for k, v in weights.items()}
    state["net.accum_iteration"] = torch.tensor(1000)
    state["net.accum_train_in_hours"] = torch.tensor(12.5)
    state["net.blocks.0.self_attn.attn_op._extra_state"] = torch.zeros(0, dtype=torch.uint8)
    return state


def test_key_rule_maps_every_key_once():
    weights, _ = load_fixture()
    assert cp.official_to_ours(official_file(weights)).keys() == weights.keys()
    fastgen = {f"transformer.{k}".replace("blocks.1.", "blocks.1._checkpoint_wrapped_module."): v for k, v in weights.items()}  # fmt: skip
    assert "transformer.blocks.1._checkpoint_wrapped_module.mlp.layer1.weight" in fastgen
    assert cp.official_to_ours(fastgen).keys() == weights.keys()
    assert cp.official_to_ours(weights).keys() == weights.keys()
    with pytest.raises(ValueError, match="two entries for t_embedding_norm.weight"):
        cp.official_to_ours({"net.t_embedding_norm.weight": torch.ones(2), "t_embedding_norm.weight": torch.ones(2)})


def test_from_pretrained_reads_the_official_pt_and_safetensors(tmp_path):
    weights, t = load_fixture()
    torch.save(official_file(weights), tmp_path / "81edfebe_ema_bf16.pt")
    save_file(weights, str(tmp_path / "tiny.safetensors"))
    for path in ("81edfebe_ema_bf16.pt", "tiny.safetensors"):
        # the tiny architecture is read from the shapes; loaded in float64, against FastGen in float64
        model = cp.from_pretrained(str(tmp_path / path), dtype=torch.float64)
        assert model.cfg == replace(cp.CONFIGS["tiny"])
        with torch.no_grad():
            out = model(t["input.x"].double(), t["input.t"].double(), t["input.text"].double())
        assert relative_error(out, t["output.t2w.f64"]) < FLOAT64_BOUND
    assert not any(p.is_meta for p in model.parameters())
    bf16 = cp.from_pretrained(str(tmp_path / "tiny.safetensors"), config="tiny", dtype=torch.bfloat16)
    with torch.no_grad():
        out = bf16(t["input.x"].bfloat16(), t["input.t"], t["input.text"].bfloat16())
    # bfloat16 rounding: measured 7.1e-3 of the scale (float32's 5e-7 is nothing next to it)
    assert out.dtype == torch.bfloat16 and relative_error(out.float(), t["output.t2w"]) < 0.1


def test_from_pretrained_local_folder_in_the_hub_layout(tmp_path):
    """config.json and a sharded safetensors index, as the training scripts write large models."""
    weights, t = load_fixture()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(cp.config_to_json(cp.CONFIGS["tiny"]))
    model, t = cp.from_pretrained(str(tmp_path), dtype=torch.float64), double(t)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"])
    assert relative_error(out, t["output.t2w.f64"]) < FLOAT64_BOUND  # float64, against FastGen in float64
    (tmp_path / "config.json").write_text(json.dumps({"model_channels": 32, "depth": 2}))
    with pytest.raises(ValueError, match=r"unknown Config fields \['depth'\]"):
        cp.from_pretrained(str(tmp_path))


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A released name (its .pt by hf_hub_download) and a repo id (a snapshot), from a Hub-layout cache under HF_HOME
    with HF_HUB_OFFLINE=1, in a fresh process (huggingface_hub reads the variables at import)."""
    weights, t = load_fixture()
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, write in (
        ("models--org--tiny-cosmos", lambda d: torch.save(official_file(weights), d / "base" / "x_ema_bf16.pt")),
        ("models--org--tiny-folder", lambda d: save_file(weights, str(d / "model.safetensors"))),
    ):
        (tmp_path / "hub" / repo / "refs").mkdir(parents=True)
        (tmp_path / "hub" / repo / "refs" / "main").write_text(commit)
        snapshot = tmp_path / "hub" / repo / "snapshots" / commit
        (snapshot / "base").mkdir(parents=True)
        write(snapshot)
    (tmp_path / "hub" / "models--org--tiny-folder" / "snapshots" / commit / "config.json").write_text(
        cp.config_to_json(cp.CONFIGS["tiny"])
    )
    io = {k: t[k].double() for k in ("input.x", "input.t", "input.text", "output.t2w.f64")}
    save_file(io, str(tmp_path / "io.safetensors"))
    script = f"""
import torch
from dataclasses import replace
from safetensors.torch import load_file
from models import cosmos_predict2 as cp
io = load_file({str(tmp_path / "io.safetensors")!r})
cp.CONFIGS["tiny-release"] = replace(cp.CONFIGS["tiny"], repo="org/tiny-cosmos", file="base/x_ema_bf16.pt")
for name in ("tiny-release", "org/tiny-folder"):
    model = cp.from_pretrained(name, dtype=torch.float64)
    with torch.no_grad():
        out = model(io["input.x"], io["input.t"], io["input.text"])
    expected = io["output.t2w.f64"]
    print(name, ((out - expected).abs().max() / expected.abs().max()).item())
try:
    cp.from_pretrained("cosmos-predict2.5-2b")
except FileNotFoundError as e:
    print("absent:", e)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # loaded in float64, against FastGen in float64
    assert lines[0].startswith("tiny-release") and float(lines[0].split()[-1]) < FLOAT64_BOUND
    assert lines[1].startswith("org/tiny-folder") and float(lines[1].split()[-1]) < FLOAT64_BOUND
    assert lines[2].startswith("absent: nvidia/Cosmos-Predict2.5-2B is not in the Hugging Face cache")
    assert "hf download nvidia/Cosmos-Predict2.5-2B --include 'base/post-trained/81edfebe" in lines[2]


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    weights, _ = load_fixture()
    weights.pop("blocks.1.cross_attn.k_norm.weight")
    weights["blocks.1.cross_attn.v_norm.weight"] = torch.ones(16)
    weights["crossattn_proj.0.weight"] = weights["crossattn_proj.0.weight"][:, :20]
    torch.save(weights, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as error:
        cp.from_pretrained(str(tmp_path / "bad.pt"), config="tiny")
    message = str(error.value)
    assert "missing:    blocks.1.cross_attn.k_norm.weight (16,)" in message
    assert "unexpected: blocks.1.cross_attn.v_norm.weight (16,)" in message
    assert "shape:      crossattn_proj.0.weight checkpoint (16, 20) != model (16, 40)" in message


class Payload:
    """Anything but tensors and containers must not unpickle."""


def test_from_pretrained_refuses_pickled_objects(tmp_path):
    weights, _ = load_fixture()
    torch.save({**weights, "extra": Payload()}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match="weights_only"):
        cp.from_pretrained(str(tmp_path / "objects.pt"), config="tiny")
    with pytest.raises(ValueError, match="tiny has no released weights"):
        cp.from_pretrained("tiny")
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        cp.from_pretrained(str(tmp_path / "missing.pt"))


def test_smoke_test_runs():
    result = subprocess.run([sys.executable, "models/cosmos_predict2.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tiny: 43,824 parameters, out (2, 4, 3, 8, 8), features (2, 32, 3, 4, 4)" in result.stdout
