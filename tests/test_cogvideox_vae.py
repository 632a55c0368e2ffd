"""models/cogvideox_vae.py: the key manifest of the released VAEs, golden parity with diffusers' AutoencoderKLCogVideoX
(frame-batched encode and decode, tiling off), causality, frame-count rules, config.json mapping and strict loading
from the Hub cache and local files."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import cogvideox_vae as cv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"


# Golden parity runs in float64: the VAE (`.double()`, inputs cast exactly) against diffusers' AutoencoderKLCogVideoX
# run in float64 on the same weights and inputs (the fixtures' `output.*.f64`, tests/generate/reference_float64.py;
# posterior samples draw float64 noise, as the VAE does in float64). Measured: 0 (the same operations in the same
# order), at 1 and 2 threads; float32 sits near 1e-6. The bound leaves room for other machines' kernels and is four
# orders of magnitude below float32's noise.
FLOAT64_BOUND = 1e-10


def load_fixture():
    """Weights under the real key names, the other tensors (inputs, diffusers' float32 and float64 outputs), and the
    config.json text."""
    with safe_open(os.path.join(HERE, "fixtures", "cogvideox_vae_tiny.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config_json = f.metadata()["config"]
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    return weights, tensors, config_json


def fixture_model(dtype=torch.float32):
    """The fixture's VAE and tensors; for float64 the VAE and every float tensor cast (exactly) to float64."""
    weights, tensors, config_json = load_fixture()
    model = cv.AutoencoderKLCogVideoX(cv.config_from_diffusers(json.loads(config_json))).eval()
    model.load_state_dict(weights, strict=True)
    if dtype == torch.float64:
        model, tensors = model.double(), double(tensors)
    return model, tensors


def double(tensors):
    return {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}


def load_tiled(dtype=torch.float32):
    with safe_open(os.path.join(HERE, "fixtures", "cogvideox_vae_tiny_tiled.safetensors"), framework="pt") as f:
        tiled = {k: f.get_tensor(k) for k in f.keys()}
    return double(tiled) if dtype == torch.float64 else tiled


@pytest.fixture(scope="module")
def fixture():
    return fixture_model()


@pytest.fixture(scope="module")
def fixture64():
    return fixture_model(torch.float64)


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def write_vae_folder(folder, weights, config_json):
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config_json)


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize("name", ["cogvideox-2b", "cogvideox-5b"])
def test_full_size_keys_match_the_released_checkpoint(name):
    """CogVideoX-2b and -5b share one VAE layout (the generator checks this); 215.6M parameters."""
    with open(os.path.join(HERE, "manifests", "cogvideox_vae.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = cv.AutoencoderKLCogVideoX(cv.CONFIGS[name])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest
    assert sum(p.numel() for p in model.parameters()) == 215_583_907


def test_presets_carry_the_released_latent_scaling():
    assert cv.CONFIGS["cogvideox-2b"].scaling_factor == 1.15258426
    assert cv.CONFIGS["cogvideox-5b"].scaling_factor == 0.7
    assert (cv.CONFIGS["cogvideox-2b"].repo, cv.CONFIGS["cogvideox-5b"].repo) == (
        "THUDM/CogVideoX-2b",
        "THUDM/CogVideoX-5b",
    )
    assert {c.subfolder for c in cv.CONFIGS.values()} == {"vae"}


# ----------------------------------------------------------------------------
# Golden parity with diffusers


@pytest.mark.parametrize("name", ["video", "image"])
def test_matches_diffusers_outputs(fixture64, name):
    """A 17-frame video (encoder batches of 9 and 8 frames, decoder batches of 3 and 2 latent frames) and one frame.
    float64 against diffusers in float64; bound FLOAT64_BOUND (measured 0)."""
    model, t = fixture64
    with torch.no_grad():
        posterior = model.posterior(t[f"input.{name}"])
        cases = {
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "sample": posterior.sample(torch.Generator().manual_seed(7)),  # diffusers drew with this generator
            "decoded": model.decode_raw(posterior.mean),
        }
    for case, out in cases.items():
        expected = t[f"output.{name}.{case}.f64"]
        assert out.shape == expected.shape and out.dtype == torch.float64
        err = relative_error(out, expected)
        assert err < FLOAT64_BOUND, f"{name} {case}: max abs error {err:.2e} of output scale"


def test_float32_stays_within_diffusers_own_float32_error(fixture):
    """The float32 VAE against diffusers' float64 outputs, untiled and tiled. Bound: 20x diffusers' own float32 error
    on each output (its float32 output against its float64 one, read from the fixtures: 5.1e-7 to 4.2e-6 of the
    scale). Measured at 1 and 2 threads: 5.4e-7 to 4.2e-6, at most 1.1x the reference's own error. Posterior samples
    draw float32 noise, other numbers than the float64 draws: they are held against diffusers' float32 samples, within
    20x diffusers' float32 error of the mean and log-variance (measured up to 5.2e-7)."""
    model, t = fixture
    tiled = load_tiled()
    cases = {}
    with torch.no_grad():
        for name in ("video", "image"):
            posterior = model.posterior(t[f"input.{name}"])
            cases[f"{name}.mean"], cases[f"{name}.logvar"] = posterior.mean, posterior.logvar
            cases[f"{name}.decoded"] = model.decode_raw(posterior.mean)
            sample = posterior.sample(torch.Generator().manual_seed(7))
            errors = [relative_error(t[f"output.{name}.{c}"], t[f"output.{name}.{c}.f64"]) for c in ("mean", "logvar")]
            assert sample.dtype == torch.float32
            assert relative_error(sample, t[f"output.{name}.sample"]) < 20 * max(errors), name
        tiled_cases = {
            "mean": model.posterior(tiled["input.video"], tiled=True).mean,
            "decoded": model.decode_raw(tiled["output.mean"], tiled=True),
        }
    for expected, outputs in ((t, cases), (tiled, tiled_cases)):
        for case, out in outputs.items():
            assert out.dtype == torch.float32
            diffusers_float32_error = relative_error(expected[f"output.{case}"], expected[f"output.{case}.f64"])
            assert relative_error(out, expected[f"output.{case}.f64"]) < 20 * diffusers_float32_error, case


def test_frame_batches_and_the_cache_are_what_makes_it_match(fixture):
    """Each frame batch is group-normalised on its own and sees the previous one only through the conv cache: running
    the whole clip at once, or the batches without the cache, gives clearly different latents and frames."""
    model, t = fixture
    x, mean, decoded = t["input.video"], t["output.video.mean"], t["output.video.decoded"]
    assert cv.frame_batches(17, 8) == [(0, 9), (9, 17)] and cv.frame_batches(5, 2) == [(0, 3), (3, 5)]
    assert cv.frame_batches(49, 8) == [(0, 9), (9, 17), (17, 25), (25, 33), (33, 41), (41, 49)]
    assert cv.frame_batches(13, 2) == [(0, 3)] + [(k, k + 2) for k in range(3, 13, 2)]
    assert cv.frame_batches(1, 8) == [(0, 1)]
    with torch.no_grad():
        whole = model.encoder(x, {}).chunk(2, dim=1)[0]
        cacheless = torch.cat([model.encoder(x[:, :, a:b], {}) for a, b in [(0, 9), (9, 17)]], 2).chunk(2, dim=1)[0]
        assert relative_error(whole, mean) > 0.05 and relative_error(cacheless, mean) > 0.05
        whole = model.decoder(mean, {})
        cacheless = torch.cat([model.decoder(mean[:, :, a:b], {}) for a, b in [(0, 3), (3, 5)]], 2)
        assert relative_error(whole, decoded) > 0.05 and relative_error(cacheless, decoded) > 0.05


def test_encode_and_decode_scale_the_latents(fixture64):
    """In float64 against diffusers in float64 (FLOAT64_BOUND)."""
    model, t = fixture64
    scale = model.cfg.scaling_factor
    with torch.no_grad():
        latents = model.encode(t["input.video"], sample=False)
        sampled = model.encode(t["input.video"], generator=torch.Generator().manual_seed(7))
        video = model.decode(latents)
    assert relative_error(latents, t["output.video.mean.f64"] * scale) < FLOAT64_BOUND
    assert relative_error(sampled, t["output.video.sample.f64"] * scale) < FLOAT64_BOUND
    assert relative_error(video, t["output.video.decoded.f64"].clamp(-1, 1)) < FLOAT64_BOUND
    assert video.abs().max() <= 1.0


def test_later_frames_never_change_earlier_latents_or_frames(fixture):
    """Causality across frame batches: frames 9.. are the second encoder batch, latents 3.. the second decoder batch."""
    model, t = fixture
    x, z = t["input.video"], t["output.video.mean"]
    x2, z2 = x.clone(), z.clone()
    x2[:, :, 9:] = torch.randn_like(x2[:, :, 9:])
    z2[:, :, 3:] = torch.randn_like(z2[:, :, 3:])
    with torch.no_grad():
        a, b = model.posterior(x).mean, model.posterior(x2).mean
        assert torch.equal(a[:, :, :3], b[:, :, :3]) and not torch.allclose(a[:, :, 3:], b[:, :, 3:])
        a, b = model.decode_raw(z), model.decode_raw(z2)
        assert torch.equal(a[:, :, :9], b[:, :, :9]) and not torch.allclose(a[:, :, 9:], b[:, :, 9:])


def test_shapes_of_a_49_frame_clip_and_backward_on_tiny():
    """49 frames (six encoder batches) -> 13 latent frames (seven decoder batches) -> 49 frames; gradients are finite."""
    torch.manual_seed(0)
    model = cv.AutoencoderKLCogVideoX(cv.CONFIGS["tiny"])
    x = torch.rand(1, 3, 49, 16, 8) * 2 - 1
    latents = model.encode(x, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 13, 2, 1)
    out = model.decode_raw(latents)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("frames", [2, 5, 8, 13, 16, 48])
def test_bad_frame_counts_are_refused(frames):
    model = cv.AutoencoderKLCogVideoX(cv.CONFIGS["tiny"])
    with pytest.raises(ValueError, match=rf"encodes 1 \+ 8k frames \(1, 9, 17, ..., 49\), got {frames}"):
        model.encode(torch.zeros(1, 3, frames, 16, 16))


def test_bad_latent_counts_and_shapes_are_refused():
    model = cv.AutoencoderKLCogVideoX(cv.CONFIGS["tiny"])
    with pytest.raises(ValueError, match=r"decodes an odd number of latent frames \(1 \+ 2k\), got 4"):
        model.decode(torch.zeros(1, 4, 4, 2, 2))
    with pytest.raises(ValueError, match=r"frame sides \(16, 12\) must be multiples of 8"):
        model.encode(torch.zeros(1, 3, 9, 16, 12))
    with pytest.raises(ValueError, match=r"expected videos \(B, C, T, H, W\), got a tensor of shape \(1, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected latents \(B, C, T, H, W\)"):
        model.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="at least 3 levels to compress time 4x"):
        cv.AutoencoderKLCogVideoX(replace(cv.CONFIGS["tiny"], block_out_channels=(8, 16)))


def test_tiled_encode_and_decode_match_diffusers(fixture64):
    """diffusers with enable_tiling(): a 56 x 48 video in 2 x 2 tiles of 48 x 40 pixels (6 x 5 latents) whose last row
    and column are partial, each tile cross-faded into its upper and left neighbours. Tiles are normalised on their
    own, so tiling changes the result; frames no larger than a tile are not tiled. float64 against diffusers in
    float64; bound FLOAT64_BOUND (measured 0)."""
    model, t = fixture64
    tiled = load_tiled(torch.float64)
    with torch.no_grad():
        mean = model.posterior(tiled["input.video"], tiled=True).mean
        assert relative_error(mean, tiled["output.mean.f64"]) < FLOAT64_BOUND
        assert relative_error(model.posterior(tiled["input.video"]).mean, tiled["output.mean.f64"]) > 0.05
        decoded = model.decode_raw(tiled["output.mean"], tiled=True)
        assert relative_error(decoded, tiled["output.decoded.f64"]) < FLOAT64_BOUND
        assert relative_error(model.decode_raw(tiled["output.mean"]), tiled["output.decoded.f64"]) > 0.05
        small = t["output.video.mean"]  # 4 x 3 latents, inside one 6 x 5 tile
        assert torch.equal(model.decode_raw(small, tiled=True), model.decode_raw(small))


def test_tiles_of_the_released_vae_are_diffusers_defaults():
    """480 x 720 training size: tiles of 240 x 360 pixels / 30 x 45 latents, strides 200 x 288 / 25 x 36, cross-fades
    over 1/6 and 1/5 of a tile; the kept parts (25 x 36 latents, 200 x 288 pixels) equal the strides, so the tiles
    meet exactly."""
    with torch.device("meta"):
        model = cv.AutoencoderKLCogVideoX(cv.CONFIGS["cogvideox-5b"])
    assert model._tiling(decoding=False) == ([240, 360], [200, 288], [5, 9], [25, 36])
    assert model._tiling(decoding=True) == ([30, 45], [25, 36], [40, 72], [200, 288])
    tiny = cv.AutoencoderKLCogVideoX(replace(cv.CONFIGS["tiny"], sample_height=16, sample_width=8))
    assert tiny.decode(torch.zeros(1, 4, 1, 4, 4)).shape == (1, 3, 1, 32, 32)  # untiled needs no tiles
    with pytest.raises(ValueError, match=r"tiles of \[1, 0\] every \[0, 0\] keeping \[7, 4\] do not line up"):
        tiny.decode(torch.zeros(1, 4, 1, 4, 4), tiled=True)
    uneven = cv.AutoencoderKLCogVideoX(replace(cv.CONFIGS["tiny"], sample_height=64, sample_width=80))
    with pytest.raises(ValueError, match=r"tiles of \[32, 40\] every \[26, 32\] keeping \[4, 4\] do not line up"):
        uneven.encode(torch.zeros(1, 3, 1, 64, 64), tiled=True)


# ----------------------------------------------------------------------------
# config.json


def test_config_json_of_diffusers_maps_to_the_config():
    cfg = cv.config_from_diffusers(json.loads(load_fixture()[2]))
    expected = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    assert cfg == replace(cv.Config(), **expected, sample_height=96, sample_width=80)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"act_fn": "gelu"}, "act_fn='gelu'; only 'silu'"),
        ({"temporal_compression_ratio": 8}, "temporal_compression_ratio=8; only 4"),
        ({"use_quant_conv": True}, "use_quant_conv=True; only False"),
        ({"invert_scale_latents": True}, "invert_scale_latents=True; only False"),
        ({"shift_factor": 0.1}, "shift_factor=0.1; only None"),
        ({"up_block_types": ["CogVideoXUpBlock3D"] * 3 + ["UpDecoderBlock2D"]}, "only 4 x CogVideoXUpBlock3D"),
        ({"spatial_norm": True}, r"does not know: \['spatial_norm'\]"),
        ({"_class_name": "AutoencoderKLWan"}, "not an AutoencoderKLCogVideoX"),
    ],
)
def test_config_json_with_unknown_values_is_refused(edit, message):
    d = {**json.loads(load_fixture()[2]), **edit}
    with pytest.raises(ValueError, match=message):
        cv.config_from_diffusers(d)


# ----------------------------------------------------------------------------
# Loading


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A Hub-layout cache under HF_HOME, read with HF_HUB_OFFLINE=1 in a fresh process (huggingface_hub reads the
    variables at import)."""
    weights, t, config_json = load_fixture()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-cogvideox"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_vae_folder(str(repo / "snapshots" / commit / "vae"), weights, config_json)
    io = {"image": t["input.image"].double(), "decoded": t["output.image.decoded.f64"]}
    save_file(io, str(tmp_path / "io.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
from models import cogvideox_vae as cv
io = load_file({str(tmp_path / "io.safetensors")!r})
model = cv.from_pretrained("org/tiny-cogvideox", dtype=torch.float64)
with torch.no_grad():
    out = model.decode_raw(model.posterior(io["image"]).mean)
print("decoded error", ((out - io["decoded"]).abs().max() / io["decoded"].abs().max()).item())
try:
    cv.from_pretrained("cogvideox-2b")
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
    assert lines[1].startswith("absent: THUDM/CogVideoX-2b is not in the Hugging Face cache")
    assert "hf download THUDM/CogVideoX-2b --include 'vae/*'" in lines[1]


def test_from_pretrained_local_directory_single_file_and_shards(tmp_path, fixture64):
    """Loaded in float64 and checked against diffusers in float64 (FLOAT64_BOUND)."""
    _, t = fixture64
    weights, _, config_json = load_fixture()
    write_vae_folder(str(tmp_path / "pipeline" / "vae"), weights, config_json)
    # The same weights split over two shards with a diffusers index, in a second folder.
    shards = tmp_path / "sharded"
    shards.mkdir()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, str(shards / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (shards / (WEIGHTS + ".index.json")).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (shards / "config.json").write_text(config_json)

    sources = (tmp_path / "pipeline", tmp_path / "pipeline" / "vae", tmp_path / "pipeline" / "vae" / WEIGHTS, shards)
    for source in sources:
        model = cv.from_pretrained(str(source), dtype=torch.float64)
        assert not any(p.is_meta or p.requires_grad for p in model.parameters())
        with torch.no_grad():
            mean = model.posterior(t["input.image"]).mean
        assert relative_error(mean, t["output.image.mean.f64"]) < FLOAT64_BOUND

    save_file(weights, str(tmp_path / "bare.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json next to"):
        cv.from_pretrained(str(tmp_path / "bare.safetensors"))
    cfg = cv.config_from_diffusers(json.loads(config_json))
    assert cv.from_pretrained(str(tmp_path / "bare.safetensors"), config=cfg).cfg == cfg
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        cv.from_pretrained(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="tiny has no released weights"):
        cv.from_pretrained("tiny")


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    """The tiny weights under the tiny preset (4 latent channels, width 8 throughout the first levels) and with keys
    dropped or added: every difference is listed."""
    weights, _, config_json = load_fixture()
    wrong = cv.config_from_diffusers(json.loads(config_json))
    wrong = replace(wrong, latent_channels=8)
    save_file(weights, str(tmp_path / "vae.safetensors"))
    with pytest.raises(ValueError) as info:
        cv.from_pretrained(str(tmp_path / "vae.safetensors"), config=wrong)
    message = str(info.value)
    assert "shape:      encoder.conv_out.conv.weight checkpoint (8, 16, 3, 3, 3) != model (16, 16, 3, 3, 3)" in message
    assert (
        "shape:      decoder.norm_out.conv_y.conv.weight checkpoint (8, 4, 1, 1, 1) != model (8, 8, 1, 1, 1)" in message
    )

    changed = {k: v for k, v in weights.items() if k != "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"}
    changed["decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight"] = torch.zeros(8, 16, 1, 1, 1)
    save_file(changed, str(tmp_path / "renamed.safetensors"))
    with torch.device("meta"):
        model = cv.AutoencoderKLCogVideoX(cv.config_from_diffusers(json.loads(config_json)))
    with pytest.raises(ValueError) as info:
        cv.load_checkpoint(model, str(tmp_path / "renamed.safetensors"))
    message = str(info.value)
    assert "missing:    decoder.up_blocks.2.resnets.0.conv_shortcut.weight (8, 16, 1, 1, 1)" in message
    assert "unexpected: decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight (8, 16, 1, 1, 1)" in message


def test_smoke_test_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "models/cogvideox_vae.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "cogvideox_vae tiny" in result.stdout and "parameters" in result.stdout
    assert "(1, 3, 9, 32, 32) -> (1, 4, 3, 4, 4) -> (1, 3, 9, 32, 32)" in result.stdout
