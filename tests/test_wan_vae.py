"""models/wan_vae.py: key manifests of the released Wan 2.1 VAE (diffusers and original layouts), golden parity with
diffusers' AutoencoderKLWan (chunked with the causal cache and in one pass), frame-count rules, latent normalisation,
config.json mapping, and strict loading from the Hub cache, local folders, single files and the original .pth."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import wan_vae as wv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"


# Golden parity runs in float64: the VAE (`.double()`, inputs cast exactly) against diffusers' AutoencoderKLWan run in
# float64 on the same weights and inputs (the fixture's `output.*.f64`, tests/generate/reference_float64.py; its
# posterior sample draws float64 noise, as the model does in float64). Measured: at most 3.4e-15 of the output scale,
# chunked or not, at 1 and 2 threads; float32 sits near 1e-6. The bound leaves five orders of magnitude to other
# machines and kernels and is four below float32's noise.
FLOAT64_BOUND = 1e-10


def load_fixture():
    """Weights under the real key names, the other tensors (inputs, diffusers' float32 and float64 outputs), and the
    config.json text."""
    with safe_open(os.path.join(HERE, "fixtures", "wan_vae_tiny.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config_json = f.metadata()["config"]
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    return weights, tensors, config_json


def fixture_model(dtype=torch.float32):
    """The fixture's VAE and tensors; for float64 the VAE and every float tensor cast (exactly) to float64."""
    weights, tensors, config_json = load_fixture()
    model = wv.WanVAE(wv.config_from_diffusers(json.loads(config_json))).eval()
    model.load_state_dict(weights, strict=True)
    if dtype == torch.float64:
        model, tensors = model.double(), double(tensors)
    return model, tensors


def double(tensors):
    return {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def write_vae_folder(folder, weights, config_json):
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config_json)


def read_manifest(name):
    with open(os.path.join(HERE, "manifests", f"wan_vae-{name}.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# Checkpoint layout


def test_full_size_keys_match_the_released_checkpoint():
    with torch.device("meta"):
        model = wv.WanVAE(wv.CONFIGS["wan2.1"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == read_manifest("2.1")
    assert sum(p.numel() for p in model.parameters()) == 126_892_531


def test_original_layout_maps_every_key_once():
    """The original release's keys (Wan2.1_VAE.pth, manifest from the original model classes) rename one to one onto
    the diffusers keys, with the same shapes."""
    original = read_manifest("2.1-original")
    assert "encoder.downsamples.0.residual.0.gamma" in original and "decoder.upsamples.11.resample.1.weight" in original
    renamed = wv.original_to_diffusers(original, wv.CONFIGS["wan2.1"])
    assert len(renamed) == len(original)
    assert renamed == read_manifest("2.1")


def test_presets_carry_the_released_latent_statistics():
    cfg = wv.CONFIGS["wan2.1"]
    assert (cfg.z_dim, len(cfg.latents_mean), len(cfg.latents_std)) == (16, 16, 16)
    assert (cfg.latents_mean[0], cfg.latents_mean[-1], cfg.latents_std[0], cfg.latents_std[-1]) == (
        -0.7571,
        -0.2921,
        2.8184,
        1.9160,
    )
    assert cfg.repo == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and cfg.subfolder == "vae"


# ----------------------------------------------------------------------------
# Golden parity with diffusers


@pytest.mark.parametrize("chunked", [True, False])
def test_matches_diffusers_outputs(chunked):
    """A 13-frame video (the first frame, then 3 chunks of 4) and a one-frame image. Chunked runs go through the
    causal cache as diffusers does; one pass over the whole video must give the same numbers. float64 against
    diffusers in float64; bound FLOAT64_BOUND (measured at most 3.4e-15)."""
    model, t = fixture_model(torch.float64)
    with torch.no_grad():
        posterior = model.posterior(t["input.video"], chunked=chunked)
        cases = {
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "sample": posterior.sample(torch.Generator().manual_seed(7)),  # diffusers drew with this generator
            "decoded_raw": model.decode_raw(t["output.mean"], chunked=chunked),
            "image_mean": model.posterior(t["input.image"], chunked=chunked).mean,
            "image_decoded_raw": model.decode_raw(t["output.image_mean"], chunked=chunked),
        }
    assert cases["mean"].shape == (2, 4, 4, 2, 3) and cases["decoded_raw"].shape == (2, 3, 13, 16, 24)
    for case, out in cases.items():
        err = relative_error(out, t[f"output.{case}.f64"])
        assert err < FLOAT64_BOUND, f"{case} (chunked={chunked}): max abs error {err:.2e} of output scale"


def test_float32_stays_within_diffusers_own_float32_error():
    """The float32 VAE against diffusers' float64 outputs. Bound: 20x diffusers' own float32 error on each output (its
    float32 output against its float64 one, read from the fixture: 5.8e-7 to 2.2e-6 of the scale). Measured: 6.4e-7 to
    1.5e-6 at 1 thread, 7.2e-7 to 1.7e-6 at 2, at most 1.25x the reference's own error. The sample draws float32 noise,
    other numbers than the float64 draw: it is held against diffusers' float32 sample, within 20x diffusers' float32
    error of the mean and log-variance (measured 1.9e-7 and 4.1e-7)."""
    model, t = fixture_model()
    with torch.no_grad():
        posterior = model.posterior(t["input.video"])
        cases = {
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "decoded_raw": model.decode_raw(t["output.mean"]),
            "image_mean": model.posterior(t["input.image"]).mean,
            "image_decoded_raw": model.decode_raw(t["output.image_mean"]),
        }
        sample = posterior.sample(torch.Generator().manual_seed(7))
    diffusers_float32_error = {c: relative_error(t[f"output.{c}"], t[f"output.{c}.f64"]) for c in cases}
    for case, out in cases.items():
        assert out.dtype == torch.float32
        assert relative_error(out, t[f"output.{case}.f64"]) < 20 * diffusers_float32_error[case], case
    bound = 20 * max(diffusers_float32_error["mean"], diffusers_float32_error["logvar"])
    assert sample.dtype == torch.float32 and relative_error(sample, t["output.sample"]) < bound


def test_chunked_passes_see_one_chunk_at_a_time(monkeypatch):
    """The memory claim: chunked encode feeds the encoder the first frame, then 4 frames at a time, and chunked decode
    feeds the decoder one latent frame at a time (the parity test above shows that the results are exact)."""
    model, t = fixture_model()
    seen = {"encoder": [], "decoder": []}
    for name in seen:
        part = getattr(model, name)
        monkeypatch.setattr(
            part, "forward", lambda x, cache=None, f=part.forward, n=name: seen[n].append(x.shape[2]) or f(x, cache)
        )
    with torch.no_grad():
        model.decode_raw(model.posterior(t["input.video"]).mean)
    assert seen == {"encoder": [1, 4, 4, 4], "decoder": [1, 1, 1, 1]}


def test_encode_and_decode_normalise_the_latents():
    """FastGen's WanVideoEncoder and diffusers' Wan pipelines: latents = (z - latents_mean) / latents_std per channel;
    decode undoes it and clamps to [-1, 1] (diffusers' decode clamps too). In float64 against diffusers in float64
    (FLOAT64_BOUND); decoded from diffusers' posterior mean, as its float64 decode was."""
    model, t = fixture_model(torch.float64)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        latents = model.encode(t["input.video"], sample=False)
        sampled = model.encode(t["input.video"], generator=torch.Generator().manual_seed(7))
        video = model.decode((t["output.mean"] - mean) / std)
    assert latents.dtype == torch.float64
    assert relative_error(latents, (t["output.mean.f64"] - mean) / std) < FLOAT64_BOUND
    assert relative_error(sampled, (t["output.sample.f64"] - mean) / std) < FLOAT64_BOUND
    # diffusers' decode is its unclamped decode, clamped (checked in the generator)
    assert relative_error(video, t["output.decoded_raw.f64"].clamp(-1, 1)) < FLOAT64_BOUND
    assert video.abs().max() <= 1.0


# ----------------------------------------------------------------------------
# Shapes and frame counts


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_frame_counts_one_plus_four_k(frames):
    torch.manual_seed(0)
    model = wv.WanVAE(wv.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        latents = model.encode(torch.rand(1, 3, frames, 16, 32) * 2 - 1, sample=False)
        assert latents.shape == (1, 4, 1 + (frames - 1) // 4, 2, 4)
        assert model.decode(latents).shape == (1, 3, frames, 16, 32)


@pytest.mark.parametrize("frames", [2, 4, 6, 8])
def test_bad_frame_counts_and_sides_are_refused(frames):
    model = wv.WanVAE(wv.CONFIGS["tiny"])
    with pytest.raises(
        ValueError, match=f"a video of {frames} frames cannot be encoded: the frame count must be 1 \\+ 4k"
    ):
        model.encode(torch.zeros(1, 3, frames, 16, 16))
    with pytest.raises(ValueError, match=r"video sides \(12, 16\) must be multiples of 8"):
        model.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match=r"expected a video \(B, C, T, H, W\), got shape \(1, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 16, 16))


def test_forward_and_backward_on_tiny():
    torch.manual_seed(0)
    model = wv.WanVAE(wv.CONFIGS["tiny"])
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = model.encode(x, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 2, 2, 2)
    (model.decode_raw(latents).square().mean() + model(x).square().mean()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_bfloat16_stays_close_to_float32():
    """A bfloat16 VAE runs end to end (its norms normalise in float32) and stays near diffusers' float32 outputs:
    measured 0.016 (mean) and 0.033 (decoded) of the output scale (diffusers' own float32 error, 1e-6, is nothing
    next to it)."""
    model, t = fixture_model()
    with torch.no_grad():
        mean = model.to(torch.bfloat16).posterior(t["input.video"].to(torch.bfloat16)).mean
        video = model.decode_raw(t["output.mean"].to(torch.bfloat16))
    assert mean.dtype == video.dtype == torch.bfloat16
    assert relative_error(mean.float(), t["output.mean"]) < 0.06
    assert relative_error(video.float(), t["output.decoded_raw"]) < 0.06


# ----------------------------------------------------------------------------
# config.json


def test_config_json_of_diffusers_maps_to_the_config():
    cfg = wv.config_from_diffusers(json.loads(load_fixture()[2]))
    assert cfg == replace(wv.CONFIGS["tiny"], repo="", subfolder="vae")
    released = {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4]}
    released.update(dropout=0.0, num_res_blocks=2, temperal_downsample=[False, True, True], z_dim=16)
    released.update(latents_mean=list(wv.WAN21_LATENTS_MEAN), latents_std=list(wv.WAN21_LATENTS_STD))
    assert wv.config_from_diffusers(released) == replace(wv.CONFIGS["wan2.1"], repo="")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"is_residual": True}, "is_residual=True; only False"),
        ({"patch_size": 2}, "patch_size=2; only None"),
        ({"attn_scales": [0.5]}, r"attn_scales=\[0.5\]; only \[\]"),
        ({"decoder_base_dim": 16}, "decoder_base_dim=16; only None"),
        ({"scale_factor_spatial": 16}, "scale_factor_spatial=16, but its levels give 8"),
        ({"clip_output": True}, r"does not know: \['clip_output'\]"),
        ({"_class_name": "AutoencoderKLCogVideoX"}, "not an AutoencoderKLWan"),
    ],
)
def test_config_json_with_unknown_values_is_refused(edit, message):
    d = {**json.loads(load_fixture()[2]), **edit}
    with pytest.raises(ValueError, match=message):
        wv.config_from_diffusers(d)


# ----------------------------------------------------------------------------
# Loading


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A Hub-layout cache under HF_HOME with sharded weights, read with HF_HUB_OFFLINE=1 in a fresh process
    (huggingface_hub reads the variables at import)."""
    weights, t, config_json = load_fixture()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-wan" / "snapshots" / commit / "vae"
    repo.mkdir(parents=True)
    (tmp_path / "hub" / "models--org--tiny-wan" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-wan" / "refs" / "main").write_text(commit)
    names = sorted(weights)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = names[1::2]
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(repo / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (repo / (WEIGHTS + ".index.json")).write_text(json.dumps(index))
    (repo / "config.json").write_text(config_json)
    save_file({"video": t["input.video"], "mean": t["output.mean.f64"]}, str(tmp_path / "io.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
from models import wan_vae as wv
io = load_file({str(tmp_path / "io.safetensors")!r})
model = wv.from_pretrained("org/tiny-wan", dtype=torch.float64)
with torch.no_grad():
    out = model.posterior(io["video"].double()).mean
print("mean error", ((out - io["mean"]).abs().max() / io["mean"].abs().max()).item())
try:
    wv.from_pretrained("org/absent-wan")
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
    assert lines[1].startswith("absent: org/absent-wan is not in the Hugging Face cache")
    assert "hf download org/absent-wan --include 'vae/*'" in lines[1]


def test_from_pretrained_local_directory_and_single_file(tmp_path):
    """Loaded in float64 and checked against diffusers in float64 (FLOAT64_BOUND)."""
    weights, t, config_json = load_fixture()
    write_vae_folder(str(tmp_path / "pipeline" / "vae"), weights, config_json)
    t = double(t)
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "vae", tmp_path / "pipeline" / "vae" / WEIGHTS):
        model = wv.from_pretrained(str(source), dtype=torch.float64)
        assert not any(p.is_meta or p.requires_grad for p in model.parameters())
        with torch.no_grad():
            out = model.decode_raw(t["output.mean"])
        assert relative_error(out, t["output.decoded_raw.f64"]) < FLOAT64_BOUND

    save_file(weights, str(tmp_path / "bare.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json next to"):
        wv.from_pretrained(str(tmp_path / "bare.safetensors"))
    assert wv.from_pretrained(str(tmp_path / "bare.safetensors"), config="tiny").cfg == wv.CONFIGS["tiny"]
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        wv.from_pretrained(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="tiny has no released weights"):
        wv.from_pretrained("tiny")


def to_original(state, cfg):
    """The inverse renaming, diffusers -> original layout, to write an original-style .pth of the tiny weights."""
    table = {new: old for old, new in wv.original_key_table(cfg).items()}
    inner = {new: old for old, new in wv._ORIGINAL_RESIDUAL.items()}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        cut = max(c for c in range(1, len(parts)) if ".".join(parts[:c]) in table)
        rest = parts[cut:]
        if len(rest) == 2 and rest[0] in inner:
            rest = [inner[rest[0]], rest[1]]
        out[".".join([table[".".join(parts[:cut])], *rest])] = value
    return out


def test_original_pth_loads_through_the_key_table(tmp_path):
    """Wan2.1_VAE.pth style: a bare state dict under the original names, read with weights_only=True. A config.json
    next to it (the official repo's is the transformer's) is not read."""
    weights, t, _ = load_fixture()
    original = to_original(weights, wv.CONFIGS["tiny"])
    assert "decoder.upsamples.2.time_conv.weight" in original and "encoder.middle.1.to_qkv.weight" in original
    assert "encoder.downsamples.0.residual.6.weight" in original and "conv2.bias" in original
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 1536}))
    model = wv.from_pretrained(str(tmp_path / "Wan2.1_VAE.pth"), config="tiny", dtype=torch.float64)
    with torch.no_grad():
        mean = model.posterior(t["input.video"].double()).mean
    assert relative_error(mean, t["output.mean.f64"]) < FLOAT64_BOUND  # float64 against diffusers in float64

    with pytest.raises(ValueError, match=r"missing:    decoder.up_blocks.0.resnets.2.conv1.bias \(384,\)"):
        wv.from_pretrained(str(tmp_path / "Wan2.1_VAE.pth"))  # without config=, a .pth is the full-size VAE


class Payload:
    def __reduce__(self):
        return (os.system, ("echo executed > pwned.txt",))


def test_pickled_code_in_a_pth_is_refused(tmp_path):
    torch.save({"encoder.conv1.weight": torch.zeros(1), "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        wv.from_pretrained(str(tmp_path / "evil.pth"), config="tiny")
    assert not os.path.exists("pwned.txt") and not (tmp_path / "pwned.txt").exists()


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    """Tiny weights under a config.json with a wider latent: shapes differ; a dropped key is missing, an extra one
    unexpected."""
    weights, _, config_json = load_fixture()
    wide = json.loads(config_json)
    wide.update(z_dim=8, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    write_vae_folder(str(tmp_path / "vae"), weights, json.dumps(wide))
    with pytest.raises(ValueError) as info:
        wv.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert "shape:      quant_conv.weight checkpoint (8, 8, 1, 1, 1) != model (16, 16, 1, 1, 1)" in message
    assert "shape:      decoder.conv_in.weight checkpoint (16, 4, 3, 3, 3) != model (16, 8, 3, 3, 3)" in message

    broken = {k: v for k, v in weights.items() if k != "decoder.mid_block.attentions.0.proj.bias"}
    broken["decoder.extra.gamma"] = torch.zeros(2)
    write_vae_folder(str(tmp_path / "broken"), broken, config_json)
    with pytest.raises(ValueError) as info:
        wv.from_pretrained(str(tmp_path / "broken"))
    assert "missing:    decoder.mid_block.attentions.0.proj.bias (16,)" in str(info.value)
    assert "unexpected: decoder.extra.gamma (2,)" in str(info.value)


def test_smoke_test_runs():
    result = subprocess.run(
        [sys.executable, "models/wan_vae.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "wan_vae tiny" in result.stdout and "parameters" in result.stdout
