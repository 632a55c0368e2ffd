"""models/cogvideox.py: key manifests of CogVideoX-2b/5b, golden parity with diffusers' CogVideoXTransformer3DModel
(sin-cos and RoPE), the zero-SNR v schedule against CogVideoXDDIMScheduler, CFG DDIM, feature taps, strict loading from
local Hub-layout folders (sharded) and the Hub cache, and the smoke test."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import cogvideox as cv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"


# Golden parity runs in float64: the model (`.double()`, inputs cast exactly) against diffusers run in float64 on the
# same weights and inputs (the fixtures' `output.*.f64`, tests/generate/reference_float64.py: its time embedding,
# positions, RoPE and DDIM loop in float64 too). Measured: at most 3.7e-15 of the output scale (forward 0 to 3.7e-16,
# 3 or 4 DDIM steps 2.1e-15 and 3.7e-15), at 1 and 2 threads; float32 sits near 1e-6. The bound leaves four orders of
# magnitude to other machines and kernels and is four below float32's noise.
FLOAT64_BOUND = 1e-10


def load_fixture(name):
    """Weights under the real key names, the other tensors (inputs, diffusers' float32 and float64 outputs), and the
    config.json text."""
    with safe_open(os.path.join(HERE, "fixtures", f"cogvideox_{name}.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config_json = f.metadata()["config"]
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    return weights, tensors, config_json


def fixture_model(name, dtype=torch.float32):
    """The fixture's model and tensors; for float64 the model and every float tensor cast (exactly) to float64."""
    weights, tensors, config_json = load_fixture(name)
    model = cv.CogVideoXTransformer(cv.config_from_diffusers(json.loads(config_json))).eval()
    model.load_state_dict(weights, strict=True)
    if dtype == torch.float64:
        model, tensors = model.double(), double(tensors)
    return model, tensors


def double(tensors):
    return {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}


def ours(video):
    """diffusers' (B, T, C, H, W) -> this project's (B, C, T, H, W); the inverse permutation is the same."""
    return video.permute(0, 2, 1, 3, 4)


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def write_sharded(folder, weights, config_json, scheduler_shift=None):
    """A Hub-layout transformer folder with the weights in two shards and their index (as the 5b is released)."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(weights)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
    for shard, names in shards.items():
        save_file({k: weights[k] for k in names}, os.path.join(folder, shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    with open(os.path.join(folder, WEIGHTS + ".index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config_json)
    if scheduler_shift is not None:
        os.makedirs(os.path.join(folder, "..", "scheduler"), exist_ok=True)
        with open(os.path.join(folder, "..", "scheduler", "scheduler_config.json"), "w") as f:
            json.dump({"_class_name": "CogVideoXDDIMScheduler", "snr_shift_scale": scheduler_shift}, f)


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize("name", ["2b", "5b"])
def test_full_size_keys_match_the_released_checkpoint(name):
    with open(os.path.join(HERE, "manifests", f"cogvideox-{name}.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = cv.CogVideoXTransformer(cv.CONFIGS[f"cogvideox-{name}"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_presets_carry_the_released_schedule_and_positions():
    two, five = cv.CONFIGS["cogvideox-2b"], cv.CONFIGS["cogvideox-5b"]
    assert (two.repo, two.snr_shift_scale, two.use_rotary_positional_embeddings) == ("THUDM/CogVideoX-2b", 3.0, False)
    assert (five.repo, five.snr_shift_scale, five.use_rotary_positional_embeddings) == ("THUDM/CogVideoX-5b", 1.0, True)
    assert two.subfolder == five.subfolder == "transformer" and two.max_text_seq_length == 226


# ----------------------------------------------------------------------------
# Golden parity with diffusers


@pytest.mark.parametrize("name", ["2b", "5b"])
def test_matches_diffusers_outputs_and_block_features(name):
    """2b: sin-cos table on an 8 x 12 latent. 5b: RoPE on an 8 x 8 latent whose grid is cropped into a 4 x 6 base
    grid (crop columns 1..5), computed as CogVideoXPipeline does. float64 against diffusers in float64; bound
    FLOAT64_BOUND (measured 2b 0 and 0, 5b 3.7e-16 and 1e-16)."""
    model, t = fixture_model(name, torch.float64)
    with torch.no_grad():
        out, features = model(ours(t["input.video"]), t["input.timestep"], t["input.text"], feature_indices={0})
        early = model(ours(t["input.video"]), t["input.timestep"], t["input.text"], {0}, features_only=True)
    assert out.dtype == torch.float64
    assert relative_error(out, ours(t["output.sample.f64"])) < FLOAT64_BOUND
    B, C, T, H, W = out.shape
    expected = model.unpatchify(t["output.block0.f64"], T, H // 2, W // 2)  # diffusers' video tokens after block 0
    assert features[0].shape == (B, model.dim // 4, T, H, W)
    assert relative_error(features[0], expected) < FLOAT64_BOUND
    assert torch.equal(early[0], features[0])


@pytest.mark.parametrize("name", ["2b", "5b"])
def test_ddim_with_guidance_matches_the_pipeline_loop(name):
    """CogVideoXPipeline's loop with CogVideoXDDIMScheduler and guidance 6: 4 trailing steps on the 2b (999, 749, 499,
    249), 3 on the 5b (999, 666, 332, where the scheduler steps to 333 and 0 before evaluating at 332 and -1).
    float64 against the loop in float64; bound FLOAT64_BOUND (measured 2.1e-15 and 3.7e-15)."""
    model, t = fixture_model(name, torch.float64)
    steps = len(t["output.ddim_timesteps"])
    assert cv.ddim_timesteps(steps) == t["output.ddim_timesteps"].tolist()
    noise = ours(t["input.noise"])
    latents = cv.sample_ddim(model, noise, t["input.text"], t["input.negative_text"], steps=steps, guidance=6.0)
    assert latents.dtype == torch.float64 and relative_error(latents, ours(t["output.ddim.f64"])) < FLOAT64_BOUND


@pytest.mark.parametrize("name", ["2b", "5b"])
def test_float32_stays_within_diffusers_own_float32_error(name):
    """The float32 model (float32 time features as the original, float64 angles for the positions and RoPE rounded
    to float32) against diffusers' float64 outputs: forward, block-0 features and the DDIM loop. Bound: 20x diffusers'
    own float32 error on each output (its float32 output against its float64 one, read from the fixture: 3.8e-7 to
    3.6e-6 of the scale). Measured at 1 and 2 threads: 3.3e-7 to 3.6e-6, at most 1.4x the reference's own error."""
    model, t = fixture_model(name)
    steps = len(t["output.ddim_timesteps"])
    with torch.no_grad():
        out, features = model(ours(t["input.video"]), t["input.timestep"], t["input.text"], feature_indices={0})
    noise, text, negative = ours(t["input.noise"]), t["input.text"], t["input.negative_text"]
    B, C, T, H, W = out.shape
    cases = {
        "sample": (out, ours),
        "block0": (features[0], lambda tokens: model.unpatchify(tokens, T, H // 2, W // 2)),
        "ddim": (cv.sample_ddim(model, noise, text, negative, steps=steps, guidance=6.0), ours),
    }
    for key, (got, layout) in cases.items():
        assert got.dtype == torch.float32
        exact = layout(t[f"output.{key}.f64"])
        diffusers_float32_error = relative_error(layout(t[f"output.{key}"]), exact)
        assert relative_error(got, exact) < 20 * diffusers_float32_error, key


def test_full_size_position_tables_match_diffusers():
    """The 2b's sin-cos table and the 5b's RoPE at the released 13 x 30 x 45 token grid (49 frames at 480 x 720), and
    RoPE for a wider 30 x 53 grid cropped into the training grid, at stored tokens. In float64 against diffusers'
    functions run in float64 (`*.f64`): measured at most 3.6e-15, bound 1e-12 (float32 rounds at 6e-8; diffusers'
    float32 tables are 1.4e-6 off theirs). The float32 tables are the float64 ones, rounded."""
    with safe_open(os.path.join(HERE, "fixtures", "cogvideox_positions.safetensors"), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    tokens = t["tokens"]
    with torch.device("meta"):
        two = cv.CogVideoXTransformer(cv.CONFIGS["cogvideox-2b"])
        five = cv.CogVideoXTransformer(cv.CONFIGS["cogvideox-5b"])
    table, _ = two.positions(13, 30, 45, "cpu", torch.float64)
    assert table.dtype == torch.float64 and (table[tokens] - t["sincos.2b.f64"]).abs().max() < 1e-12
    assert torch.equal(two.positions(13, 30, 45, "cpu")[0], table.float())
    for width in (45, 53):
        _, (cos, sin) = five.positions(13, 30, width, "cpu", torch.float64)
        assert (cos[tokens] - t[f"rope.{width}.cos.f64"]).abs().max() < 1e-12
        assert (sin[tokens] - t[f"rope.{width}.sin.f64"]).abs().max() < 1e-12
        cos32, sin32 = five.positions(13, 30, width, "cpu")[1]
        assert torch.equal(cos32, cos.float()) and torch.equal(sin32, sin.float())


def test_rope_crop_region_and_tables():
    assert cv.crop_region(30, 45, 30, 45) == ((0, 0), (30, 45))  # 480 x 720: the whole training grid
    assert cv.crop_region(4, 4, 4, 6) == ((0, 1), (4, 5))  # square input in a wide grid: centred columns
    assert cv.crop_region(6, 4, 4, 6) == ((0, 2), (4, 5))  # tall input: full height, round(8 / 3) = 3 columns
    cos, sin = cv.rope_3d(64, 13, 30, 45, 30, 45)
    assert cos.shape == sin.shape == (13 * 30 * 45, 64)
    assert torch.allclose(cos**2 + sin**2, torch.ones(()), atol=1e-6)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2])  # each frequency rotates one (even, odd) pair
    assert torch.equal(cos[0], torch.ones(64))  # the first token sits at position (0, 0, 0)


# ----------------------------------------------------------------------------
# Schedule


@pytest.mark.parametrize("name, shift", [("2b", 3.0), ("5b", 1.0)])
def test_alphas_cumprod_equals_the_scheduler(name, shift):
    with safe_open(os.path.join(HERE, "fixtures", "cogvideox_schedule.safetensors"), framework="pt") as f:
        expected = f.get_tensor(f"alphas_cumprod.{name}")
    abar = cv.alphas_cumprod(shift)
    assert abar.dtype == torch.float64 and torch.allclose(abar, expected, rtol=0, atol=1e-15)
    assert abar[-1] == 0 and abar[0] > 0.997
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(cv.alpha(t, shift) ** 2, abar, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_schedule_identities_and_derivatives(shift):
    t = torch.tensor([0.0, 0.3, 10.5, 500.0, 998.7, 999.0], dtype=torch.float64)
    a, s = cv.alpha(t, shift), cv.sigma(t, shift)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t), atol=1e-12)
    assert (a[-1], s[-1]) == (0.0, 1.0)
    assert (a[1:] < a[:-1]).all()
    inner = torch.tensor([0.3, 10.5, 500.25, 998.7], dtype=torch.float64)  # between knots: exact central differences
    h = 1e-4
    for f, df in ((cv.alpha, cv.alpha_prime), (cv.sigma, cv.sigma_prime)):
        numeric = (f(inner + h, shift) - f(inner - h, shift)) / (2 * h)
        assert torch.allclose(df(inner, shift), numeric, rtol=1e-5, atol=1e-10)


def test_snr_shift_divides_the_snr_before_the_zero_snr_rescale():
    """abar_shifted / (1 - abar_shifted) = SNR / s, and the rescale makes both end at 0; 5b (s = 1) has the higher
    SNR everywhere before the end."""
    two, five = cv.alphas_cumprod(3.0), cv.alphas_cumprod(1.0)
    assert (two[:-1] < five[:-1]).all()
    assert abs(five[0].item() - 0.99915) < 1e-5  # SD's first abar, kept by the rescale


@pytest.mark.parametrize("src", ["x0", "eps", "v", "flow"])
@pytest.mark.parametrize("dst", ["x0", "eps", "v", "flow"])
def test_prediction_type_round_trips(src, dst):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 4, 4, generator=g).double(), torch.randn(3, 4, 2, 4, 4, generator=g).double()
    t = torch.tensor([3.2, 400.0, 960.5], dtype=torch.float64)
    a, s = (cv._expand(f(t, 3.0), x0) for f in (cv.alpha, cv.sigma))
    da, ds = (cv._expand(f(t, 3.0), x0) for f in (cv.alpha_prime, cv.sigma_prime))
    x_t = a * x0 + s * eps
    truth = {"x0": x0, "eps": eps, "v": a * eps - s * x0, "flow": da * x0 + ds * eps}
    assert torch.allclose(cv.convert(x_t, truth[src], t, src, dst, 3.0), truth[dst], atol=1e-8)


def test_time_lists_and_samplers():
    assert cv.t_list(1).tolist() == [999.0, 0.0]
    assert cv.t_list(4).tolist() == [999.0, 749.25, 499.5, 249.75, 0.0]
    assert cv.ddim_timesteps(50)[:3] == [999, 979, 959] and cv.ddim_timesteps(50)[-1] == 19
    g = torch.Generator().manual_seed(0)
    for kind in ("logitnormal", "uniform"):
        t = cv.sample_t(4096, kind, generator=g)
        assert t.dtype == torch.float64 and t.min() >= 1.0 and t.max() <= 999.0 and abs(t.mean().item() - 500) < 25
    d = cv.sample_t(4096, "discrete", t_min=0, t_max=999, generator=g)
    assert torch.equal(d, d.round()) and d.min() == 0 and d.max() == 999
    with pytest.raises(ValueError, match="unknown time sampler 'lognormal'"):
        cv.sample_t(4, "lognormal")


# ----------------------------------------------------------------------------
# Tiny model, guidance, student sampler


@pytest.mark.parametrize("name", ["tiny-2b", "tiny-5b"])
def test_forward_and_backward_on_tiny(name):
    """Any text length (the 2b in diffusers needs exactly max_text_seq_length tokens) and sizes the table/grid were
    not built for."""
    torch.manual_seed(0)
    model = cv.CogVideoXTransformer(cv.CONFIGS[name])
    x, text = torch.randn(2, 4, 2, 6, 10), torch.randn(2, 5, 32)
    out = model(x, torch.tensor([0.0, 999.0]), text)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    with pytest.raises(ValueError, match=r"latent sides \(7, 10\) must be multiples of the patch size 2"):
        model(torch.randn(1, 4, 2, 7, 10), 5.0, text[:1])


def test_guidance_and_student_sampling():
    """Guidance in one batch of 2B against two calls, in float64: measured 6e-15 (float32: 3.6e-6 of a scale of 3.7,
    batch-size-dependent kernels), bound 1e-12."""
    model, t = fixture_model("5b", torch.float64)
    x, text, negative = ours(t["input.noise"]), t["input.text"], t["input.negative_text"]
    with torch.no_grad():
        cond, uncond = model(x, 500.0, text), model(x, 500.0, negative)
        guided = cv.guided(model, x, 500.0, text, negative, 4.0)
        assert torch.allclose(guided, uncond + 4 * (cond - uncond), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="guidance needs negative_text"):
        cv.guided(model, x, 500.0, text, guidance=4.0)
    one = cv.sample_student(model, x, text)
    with torch.no_grad():  # one step from t = 999, where alpha = 0: x0 = -v (measured: exact)
        assert torch.allclose(one, -model(x, 999.0, text), atol=1e-12)
    two = cv.sample_student(model, x, text, steps=2, generator=torch.Generator().manual_seed(0))
    assert two.shape == x.shape and two.isfinite().all()


# ----------------------------------------------------------------------------
# config.json and loading


def test_config_json_of_diffusers_maps_to_the_config():
    cfg = cv.config_from_diffusers(json.loads(load_fixture("5b")[2]))
    assert cfg == cv.CONFIGS["tiny-5b"]
    assert cv.config_from_diffusers(json.loads(load_fixture("2b")[2])) == cv.CONFIGS["tiny-2b"]
    assert cv.config_from_diffusers(json.loads(load_fixture("5b")[2]), snr_shift_scale=2.0).snr_shift_scale == 2.0


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"patch_size_t": 2}, "patch_size_t=2; only None"),
        ({"use_learned_positional_embeddings": True}, "use_learned_positional_embeddings"),
        ({"ofs_embed_dim": 512}, "ofs_embed_dim"),
        ({"new_field": 1}, r"does not know: \['new_field'\]"),
        ({"_class_name": "WanTransformer3DModel"}, "not a CogVideoXTransformer3DModel"),
    ],
)
def test_config_json_with_unknown_values_is_refused(edit, message):
    d = {**json.loads(load_fixture("2b")[2]), **edit}
    with pytest.raises(ValueError, match=message):
        cv.config_from_diffusers(d)


def test_from_pretrained_local_sharded_folder_and_file(tmp_path):
    weights, t, config_json = load_fixture("5b")
    write_sharded(str(tmp_path / "repo" / "transformer"), weights, config_json, scheduler_shift=1.5)
    index = tmp_path / "repo" / "transformer" / (WEIGHTS + ".index.json")
    for source in (tmp_path / "repo", tmp_path / "repo" / "transformer", index):
        model = cv.from_pretrained(str(source), dtype=torch.float64)
        assert not any(p.is_meta for p in model.parameters())
        assert model.cfg.snr_shift_scale == 1.5  # from ../scheduler/scheduler_config.json
        with torch.no_grad():
            out = model(ours(t["input.video"].double()), t["input.timestep"], t["input.text"].double())
        assert relative_error(out, ours(t["output.sample.f64"])) < FLOAT64_BOUND  # against diffusers in float64

    save_file(weights, str(tmp_path / "bare.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json next to"):
        cv.from_pretrained(str(tmp_path / "bare.safetensors"))
    model = cv.from_pretrained(str(tmp_path / "bare.safetensors"), config="tiny-5b", dtype=torch.bfloat16)
    assert model.proj_out.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        cv.from_pretrained(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="tiny-2b has no released weights"):
        cv.from_pretrained("tiny-2b")


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    """5b-style weights under a config with a third block and wider time embedding; and an extra key."""
    weights, _, config_json = load_fixture("5b")
    wrong = json.loads(config_json)
    wrong.update(num_layers=3, time_embed_dim=24)
    write_sharded(str(tmp_path / "transformer"), weights, json.dumps(wrong))
    with pytest.raises(ValueError) as info:
        cv.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert "missing:    transformer_blocks.2.attn1.norm_q.weight (16,)" in message
    assert "shape:      time_embedding.linear_2.weight checkpoint (16, 16) != model (24, 24)" in message

    extra = dict(weights, **{"transformer.logvar_linear.weight": torch.zeros(1, 512)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected: transformer.logvar_linear.weight \(1, 512\)"):
        cv.from_pretrained(str(tmp_path / "extra.safetensors"), config="tiny-5b")


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A Hub-layout cache under HF_HOME (sharded transformer + scheduler config), read with HF_HUB_OFFLINE=1 in a fresh
    process (huggingface_hub reads the variables at import)."""
    weights, t, config_json = load_fixture("2b")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-cogvideox"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_sharded(str(repo / "snapshots" / commit / "transformer"), weights, config_json, scheduler_shift=3.0)
    io = {k: t[k].double() for k in ("input.video", "input.timestep", "input.text", "output.sample.f64")}
    save_file(io, str(tmp_path / "io.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
from models import cogvideox as cv
io = load_file({str(tmp_path / "io.safetensors")!r})
model = cv.from_pretrained("org/tiny-cogvideox", dtype=torch.float64)
with torch.no_grad():
    out = model(io["input.video"].transpose(1, 2), io["input.timestep"], io["input.text"]).transpose(1, 2)
expected = io["output.sample.f64"]
print("error", ((out - expected).abs().max() / expected.abs().max()).item())
try:
    cv.from_pretrained("org/absent")
except FileNotFoundError as e:
    print("absent:", e)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert float(lines[0].split()[-1]) < FLOAT64_BOUND  # loaded in float64, against diffusers in float64
    assert lines[1].startswith("absent: org/absent is not in the Hugging Face cache")
    assert "hf download org/absent --include 'transformer/*'" in lines[1]


def test_smoke_test_runs():
    result = subprocess.run(
        [sys.executable, "models/cogvideox.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "tiny-2b" in result.stdout and "tiny-5b" in result.stdout and "parameters" in result.stdout
