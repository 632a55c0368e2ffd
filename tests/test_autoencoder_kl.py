"""models/autoencoder_kl.py: key manifests of the released autoencoders, golden parity with diffusers' AutoencoderKL,
latent normalisation, config.json mapping, strict loading from the Hub cache and local files, and tiling."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from models import autoencoder_kl as ak

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"

# Golden parity bounds (relative to the output scale). The generator ran diffusers in float32 and in float64 on the
# same weights and input (exact in float64; diffusers' AutoencoderKL has no float32 islands); the float64 outputs are
# stored as NAME.f64. Our model in float64 against them: measured <= 4e-15 (1 and 2 threads), whatever the kernels'
# order of summation; FLOAT64_BOUND leaves 1e4x room and still catches any real difference.
FLOAT64_BOUND = 1e-10
# Our model in float32 against the float32 outputs sits on the float32 noise floor, which moves with the CPU and its
# kernels: bounded by FLOAT32_FACTOR times the reference's own float32-vs-float64 error on the same output (measured
# ratio of ours to that: <= 1.0).
FLOAT32_FACTOR = 20


def load_fixture(name):
    """Weights under the real key names, the other tensors (inputs, diffusers' outputs), and the config.json text."""
    with safe_open(os.path.join(HERE, "fixtures", f"autoencoder_kl_{name}.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config_json = f.metadata()["config"]
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    return weights, tensors, config_json


def fixture_model(name, dtype=torch.float32):
    """The model in dtype, and the fixture's tensors with the input image cast (exactly) to dtype."""
    weights, tensors, config_json = load_fixture(name)
    model = ak.AutoencoderKL(ak.config_from_diffusers(json.loads(config_json))).eval()
    model.load_state_dict(weights, strict=True)
    return model.to(dtype), dict(tensors, **{"input.image": tensors["input.image"].to(dtype)})


def relative_error(out, expected):
    return ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def outputs(model, t):
    with torch.no_grad():
        posterior = model.posterior(t["input.image"])
        return {
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "sample": posterior.sample(torch.Generator().manual_seed(7)),  # diffusers drew with this generator
            "decoded": model.decode_raw(posterior.mean),
        }


def write_vae_folder(folder, weights, config_json):
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config_json)


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize("name", [n for n in ak.CONFIGS if n != "tiny"])
def test_full_size_keys_match_the_released_checkpoint(name):
    """SD1.5, SDXL, sdxl-vae-fp16-fix and sd-vae-ft-ema/-mse share one layout (the generator checks SDXL's against
    SD1.5's); FLUX.1's lacks the quant convs and has 32 encoder output channels."""
    manifest_name = "flux" if name == "flux" else "sd"
    with open(os.path.join(HERE, "manifests", f"autoencoder_kl-{manifest_name}.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = ak.AutoencoderKL(ak.CONFIGS[name])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_presets_carry_the_released_latent_normalisation():
    assert (ak.CONFIGS["sd15"].scaling_factor, ak.CONFIGS["sd15"].shift_factor) == (0.18215, 0.0)
    assert ak.CONFIGS["sd-vae-ft-mse"].scaling_factor == ak.CONFIGS["sd-vae-ft-ema"].scaling_factor == 0.18215
    assert ak.CONFIGS["sdxl"].scaling_factor == ak.CONFIGS["sdxl-fp16-fix"].scaling_factor == 0.13025
    flux = ak.CONFIGS["flux"]
    assert (flux.latent_channels, flux.scaling_factor, flux.shift_factor) == (16, 0.3611, 0.1159)


# ----------------------------------------------------------------------------
# Golden parity with diffusers


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_matches_diffusers_outputs(name):
    """Reference in float64 (its posterior sample drawn in float64 too, as ours), bound FLOAT64_BOUND (measured
    <= 4e-15)."""
    model, t = fixture_model(name, torch.float64)
    for case, out in outputs(model, t).items():
        err = relative_error(out, t[f"output.{case}.f64"])
        assert out.dtype == torch.float64 and err < FLOAT64_BOUND, f"{name} {case}: max abs error {err:.2e}"


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_matches_diffusers_outputs_in_float32(name):
    """The float32 path against the reference in float32, bound FLOAT32_FACTOR x the reference's own float32 error on
    each output (6e-7 to 3e-6). torch draws float64 normals differently from float32 ones, so the float64 sample is
    another draw: the sample's bound is that of the mean and log-variance it is made of."""
    model, t = fixture_model(name)
    reference_error = {
        case: relative_error(t["output." + case], t[f"output.{case}.f64"]) for case in ("mean", "logvar")
    }
    reference_error["sample"] = max(reference_error.values())
    reference_error["decoded"] = relative_error(t["output.decoded"], t["output.decoded.f64"])
    for case, out in outputs(model, t).items():
        err, bound = relative_error(out, t["output." + case]), FLOAT32_FACTOR * reference_error[case]
        assert out.dtype == torch.float32 and err < bound, f"{name} {case}: max abs error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_encode_and_decode_normalise_the_latents(name):
    """Reference in float64, bound FLOAT64_BOUND (the outputs above, normalised)."""
    model, t = fixture_model(name, torch.float64)
    shift, scale = model.cfg.shift_factor, model.cfg.scaling_factor
    with torch.no_grad():
        latents = model.encode(t["input.image"], sample=False)
        sampled = model.encode(t["input.image"], generator=torch.Generator().manual_seed(7))
        images = model.decode(latents)
    assert relative_error(latents, (t["output.mean.f64"] - shift) * scale) < FLOAT64_BOUND
    assert relative_error(sampled, (t["output.sample.f64"] - shift) * scale) < FLOAT64_BOUND
    assert relative_error(images, t["output.decoded.f64"].clamp(-1, 1)) < FLOAT64_BOUND


def test_posterior_clamps_the_log_variance_and_samples_it():
    mean, logvar = torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), -2.0)
    logvar[0, 0, 0, :2] = torch.tensor([50.0, -50.0])
    posterior = ak.DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert posterior.logvar[0, 0, 0, :2].tolist() == [20.0, -30.0]
    a = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, posterior.sample(torch.Generator().manual_seed(0)))
    wide = ak.DiagonalGaussian(torch.cat([torch.full((1, 4, 64, 64), 3.0), torch.full((1, 4, 64, 64), 2 * 0.7)], 1))
    draws = wide.sample(torch.Generator().manual_seed(1))
    assert abs(draws.mean().item() - 3.0) < 0.05 and abs(draws.std().item() - torch.e**0.7) < 0.05


def test_forward_and_backward_on_tiny():
    torch.manual_seed(0)
    model = ak.AutoencoderKL(ak.CONFIGS["tiny"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = model.encode(x, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8)
    (model.decode_raw(latents).square().mean() + model(x).square().mean()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------
# config.json


def test_config_json_of_diffusers_maps_to_the_config():
    cfg = ak.config_from_diffusers(json.loads(load_fixture("flux")[2]))
    assert cfg == replace(
        ak.Config(),
        latent_channels=16,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        sample_size=16,
    )
    sd = ak.config_from_diffusers(json.loads(load_fixture("sd")[2]))  # diffusers writes shift_factor null
    assert sd.shift_factor == 0.0 and sd.use_quant_conv and sd.block_out_channels == (8, 16, 32)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"act_fn": "gelu"}, "act_fn='gelu'; only 'silu'"),
        ({"latents_mean": [0.0] * 16}, "latents_mean"),
        ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "only 2 x UpDecoderBlock2D"),
        ({"spatial_norm": True}, r"does not know: \['spatial_norm'\]"),
        ({"_class_name": "AutoencoderKLWan"}, "not an AutoencoderKL"),
    ],
)
def test_config_json_with_unknown_values_is_refused(edit, message):
    d = {**json.loads(load_fixture("flux")[2]), **edit}
    with pytest.raises(ValueError, match=message):
        ak.config_from_diffusers(d)


# ----------------------------------------------------------------------------
# Loading


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A Hub-layout cache under HF_HOME, read with HF_HUB_OFFLINE=1 in a fresh process (huggingface_hub reads the
    variables at import)."""
    weights, t, config_json = load_fixture("flux")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-vae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_vae_folder(str(repo / "snapshots" / commit / "vae"), weights, config_json)
    save_file(
        {"image": t["input.image"].double(), "decoded": t["output.decoded.f64"]}, str(tmp_path / "io.safetensors")
    )
    script = f"""
import torch
from safetensors.torch import load_file
from models import autoencoder_kl as ak
io = load_file({str(tmp_path / "io.safetensors")!r})
model = ak.from_pretrained("org/tiny-vae", dtype=torch.float64)
with torch.no_grad():
    out = model.decode_raw(model.posterior(io["image"]).mean)
print("decoded error", ((out - io["decoded"]).abs().max() / io["decoded"].abs().max()).item())
try:
    ak.from_pretrained("org/absent-vae")
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
    assert lines[1].startswith("absent: org/absent-vae is not in the Hugging Face cache")
    assert "hf download org/absent-vae --include 'vae/*'" in lines[1]


def test_from_pretrained_local_directory_and_single_file(tmp_path):
    weights, t, config_json = load_fixture("sd")
    write_vae_folder(str(tmp_path / "pipeline" / "vae"), weights, config_json)
    image = t["input.image"].double()
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "vae", tmp_path / "pipeline" / "vae" / WEIGHTS):
        model = ak.from_pretrained(str(source), dtype=torch.float64)
        assert not any(p.is_meta or p.requires_grad for p in model.parameters())
        with torch.no_grad():  # reference in float64
            assert relative_error(model.posterior(image).mean, t["output.mean.f64"]) < FLOAT64_BOUND

    save_file(weights, str(tmp_path / "bare.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json next to"):
        ak.from_pretrained(str(tmp_path / "bare.safetensors"))
    cfg = ak.config_from_diffusers(json.loads(config_json))
    assert ak.from_pretrained(str(tmp_path / "bare.safetensors"), config=cfg).cfg == cfg
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        ak.from_pretrained(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="tiny has no released weights"):
        ak.from_pretrained("tiny")


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    """Flux weights under an SD config.json: the quant convs are missing and the encoder's output is too wide."""
    flux_weights, _, _ = load_fixture("flux")
    sd_config = json.loads(load_fixture("sd")[2])
    sd_config.update(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2, layers_per_block=1)
    sd_config.update(up_block_types=["UpDecoderBlock2D"] * 2)
    write_vae_folder(str(tmp_path / "vae"), flux_weights, json.dumps(sd_config))
    with pytest.raises(ValueError) as info:
        ak.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert "missing:    quant_conv.weight (8, 8, 1, 1)" in message
    assert "missing:    post_quant_conv.bias (4,)" in message
    assert "shape:      encoder.conv_out.weight checkpoint (32, 16, 3, 3) != model (8, 16, 3, 3)" in message

    extra = dict(flux_weights, **{"decoder.extra.weight": torch.zeros(2)})
    with torch.device("meta"):
        model = ak.AutoencoderKL(ak.config_from_diffusers(json.loads(load_fixture("flux")[2])))
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected: decoder.extra.weight \(2,\)"):
        ak.load_checkpoint(model, str(tmp_path / "extra.safetensors"))


def test_legacy_attention_names_are_renamed(tmp_path):
    """stabilityai/sd-vae-ft-mse style files: mid-block attention as query/key/value/proj_attn."""
    weights, t, config_json = load_fixture("sd")
    legacy = {}
    for key, value in weights.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    write_vae_folder(str(tmp_path), legacy, config_json)
    model = ak.from_pretrained(str(tmp_path), dtype=torch.float64)
    with torch.no_grad():  # reference in float64
        assert relative_error(model.decode_raw(t["output.mean.f64"]), t["output.decoded.f64"]) < FLOAT64_BOUND


def test_gated_repo_message(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
        raise GatedRepoError("Access to model black-forest-labs/FLUX.1-dev is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(RuntimeError, match="FLUX.1-dev is gated: accept its licence .*HF_TOKEN"):
        ak.from_pretrained("flux")


# ----------------------------------------------------------------------------
# Tiling


@pytest.mark.parametrize("size, tile, overlap", [(8, 8, 2), (19, 8, 2), (19, 8, 5), (24, 8, 0), (5, 8, 6)])
def test_tiles_cover_the_image_and_cross_fade_to_one(size, tile, overlap):
    """With a function that sees no neighbourhood (nearest upsampling, or its inverse), tiled equals whole exactly:
    the tiles land in the right place and their weights sum to one."""
    x = torch.randn(2, 3, size, size + 3)
    up = ak._tiled(lambda z: F.interpolate(z, scale_factor=4.0), x, tile, overlap, 1, 4)
    assert torch.allclose(up, F.interpolate(x, scale_factor=4.0), atol=1e-6)
    down = ak._tiled(lambda z: z[..., ::4, ::4] * 2, up, tile, overlap, 4, 1)
    assert torch.allclose(down, 2 * x, atol=1e-6)


def test_bad_tiling_and_image_sides_are_refused():
    model = ak.AutoencoderKL(ak.CONFIGS["tiny"])
    with pytest.raises(ValueError, match="overlap 8 must be at least 0 and less than the tile side 8"):
        model.decode_raw(torch.zeros(1, 4, 20, 20), tile=8, overlap=8)
    with pytest.raises(ValueError, match=r"image sides \(29, 32\) must be multiples of 2"):
        model.encode(torch.zeros(1, 3, 29, 32))


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_tiled_decode_and_encode_stay_close_to_the_whole_image(name):
    """One tile covering the image gives the whole-image result. With several tiles each one normalises (GroupNorm)
    and attends over itself only, so the result differs; on statistically uniform input that difference stays small,
    while the cross-fade removes the seam that abutting tiles leave. Measured on these random-weight networks (max abs
    error of the output scale): decode, abutting 0.72-0.80, overlap 16 of 32 latents 0.08-0.18 (mean 0.08-0.11);
    encode, abutting 0.57-0.80, overlap 8 of 16 latents 0.16-0.28 (mean 0.15-0.17)."""
    model, _ = fixture_model(name)
    z = torch.randn(1, model.cfg.latent_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.decode_raw(z)
        assert torch.equal(model.decode_raw(z, tile=64), whole)
        abutting = relative_error(model.decode_raw(z, tile=32, overlap=0), whole)
        faded = model.decode_raw(z, tile=32, overlap=16)
        assert relative_error(faded, whole) < min(0.25, abutting / 3)
        assert ((faded - whole).abs().mean() / whole.abs().mean()).item() < 0.15

        # A decoded image: the kind of input the encoder sees.
        image = model.decode(z[..., :32, :32] * model.cfg.scaling_factor)
        mean = model.posterior(image).mean
        abutting = relative_error(model.posterior(image, tile=16, overlap=0).mean, mean)
        faded = model.posterior(image, tile=16, overlap=8).mean
        assert relative_error(faded, mean) < min(0.35, abutting / 2)
        assert ((faded - mean).abs().mean() / mean.abs().mean()).item() < 0.2


def test_smoke_test_runs():
    result = subprocess.run(
        [sys.executable, "models/autoencoder_kl.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "autoencoder_kl tiny" in result.stdout and "parameters" in result.stdout
