"""sample.py end to end, and the path from an official pickle to samples: download.py convert -> strict load -> sample."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models import edm, edm2

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_tiny_grid_and_npz(tmp_path):
    out = tmp_path / "edm"
    result = run("sample.py", "--model", "edm", "--tiny", "--n", "5", "--batch", "3", "--steps", "2", "--npz", "--out_dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    grid = Image.open(out / "samples.png")
    assert grid.size == (3 * 8, 2 * 8)  # 5 images of 8x8 on a 3-column grid
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (5, 8, 8, 3) and data["images"].dtype == np.uint8
    assert data["labels"].shape == (5,) and data["labels"].max() < 10
    assert np.array_equal(np.asarray(grid)[:8, :8], data["images"][0])

    again = run("sample.py", "--model", "edm", "--tiny", "--n", "5", "--batch", "5", "--steps", "2", "--npz", "--out_dir", str(tmp_path / "again"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["labels"], data["labels"])  # the seed fixes them


def test_edm2_student_sampler(tmp_path):
    result = run("sample.py", "--model", "edm2", "--tiny", "--sampler", "student", "--steps", "2", "--n", "4", "--class", "3", "--npz", "--out_dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (np.load(tmp_path / "samples.npz")["labels"] == 3).all()


def test_official_pickle_to_samples(tmp_path):
    """The converter's output loads strictly into models/edm.py, and sample.py samples from it."""
    converted = tmp_path / "converted.safetensors"
    result = run("download.py", "convert", os.path.join(HERE, "fixtures", "pickle_edm_tiny.pkl"), str(converted))
    assert result.returncode == 0, result.stderr
    cfg = edm.Config(img_resolution=8, model_channels=4, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,))
    with torch.device("meta"):
        model = edm.EDMPrecond(cfg)
    edm.load_checkpoint(model, str(converted))  # strict: every key and shape

    student = tmp_path / "student.safetensors"
    save_file(model.state_dict(), str(student), metadata={"config": edm.config_to_json(cfg)})
    result = run("sample.py", "--model", "edm", "--ckpt", str(student), "--sampler", "euler", "--steps", "3", "--n", "2", "--guidance", "1.5", "--out_dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "samples.png").size == (16, 8)


def test_official_edm2_pickle_loads_strictly(tmp_path):
    converted = tmp_path / "converted.safetensors"
    result = run("download.py", "convert", os.path.join(HERE, "fixtures", "pickle_edm2_tiny.pkl"), str(converted))
    assert result.returncode == 0, result.stderr
    cfg = edm2.Config(img_resolution=8, label_dim=10, model_channels=4, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=4)  # fmt: skip
    with torch.device("meta"):
        model = edm2.EDM2Precond(cfg)
    edm2.load_checkpoint(model, str(converted))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run("sample.py", "--model", "edm", "--ckpt", "edm-cifar10-32x32-cond-vp", "--root", str(tmp_path))
    assert result.returncode != 0
    assert "python download.py edm-cifar10-32x32-cond-vp" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------
# FID


def fid_run(tmp_path, name, ref, weights, *flags, nproc=None):
    out = tmp_path / name
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    result = run(*launcher, "sample.py", "--model", "edm", "--tiny", "--steps", "2", "--batch", "3", "--fid", "8", "--fid_ref", str(ref), "--inception", str(weights), "--device", "cpu", "--out_dir", str(out), *flags)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with open(out / "fid.json") as f:
        return json.load(f)


def test_fid_against_the_samples_own_statistics_is_zero(tmp_path, inception_weights):
    """Reference statistics of the very images sample.py generates, computed by `download.py fid-ref` from PNGs, give
    FID 0: both paths judge the same uint8 images with the same features. Under torchrun the processes split the
    images and sum the statistics, and the FID is 0 again."""
    result = run("sample.py", "--model", "edm", "--tiny", "--steps", "2", "--n", "8", "--npz", "--out_dir", str(tmp_path / "png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = np.load(tmp_path / "png" / "samples.npz")["images"]
    (tmp_path / "data").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "data" / f"{i:03d}.png")
    result = run("download.py", "fid-ref", str(tmp_path / "data"), "--out", str(tmp_path / "ref.npz"), "--inception", str(inception_weights), "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    sigma = np.load(tmp_path / "ref.npz")["sigma"]
    assert np.trace(sigma) > 1  # features that differ between images: a zero below is not a degenerate network's

    same = fid_run(tmp_path, "same", tmp_path / "ref.npz", inception_weights)
    assert same["n"] == 8 and 0 <= same["fid"] < 1e-6 * np.trace(sigma)
    assert Image.open(tmp_path / "same" / "samples.png").size == (3 * 8, 3 * 8)  # --n 64: all 8 on the grid

    # Two processes: 4 images each; only the summed statistics of all 8 give 0 again.
    split = fid_run(tmp_path, "split", tmp_path / "ref.npz", inception_weights, "--npz", nproc=2)
    assert split["n"] == 8 and 0 <= split["fid"] < 1e-6 * np.trace(sigma)
    assert np.array_equal(np.load(tmp_path / "split" / "samples.npz")["images"], images)  # gathered in order


def test_fid_missing_files_name_the_download_commands(tmp_path):
    result = run("sample.py", "--tiny", "--fid", "4", "--fid_ref", "cifar10", "--root", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "python download.py fid-ref cifar10" in result.stderr

    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    result = run("sample.py", "--tiny", "--fid", "4", "--fid_ref", str(tmp_path / "ref.npz"), "--root", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "python download.py inception" in result.stderr

    np.savez(tmp_path / "bad.npz", mean=np.zeros(2048))
    result = run("sample.py", "--tiny", "--fid", "4", "--fid_ref", str(tmp_path / "bad.npz"), "--root", str(tmp_path))
    assert result.returncode != 0 and "mu and sigma" in result.stderr


def test_teacher_pairs_are_the_heun_solution_and_resume(tmp_path):
    """--save_pairs: pair k starts from seed + k's noise scaled to t_list(1)[0] and ends at the Heun solution from
    there; a deleted shard is rewritten identically on a rerun, and other settings are refused."""
    out = tmp_path / "pairs"
    flags = ["sample.py", "--tiny", "--save_pairs", str(out), "--n", "6", "--batch", "4", "--steps", "5"]
    result = run(*flags)
    assert result.returncode == 0, result.stderr
    meta = json.load(open(out / "pairs.json"))
    assert meta["shards"] == ["pairs_00000000.safetensors", "pairs_00000004.safetensors"]
    shard = load_file(out / "pairs_00000004.safetensors")
    assert shard["states"].shape == (2, 1, 3, 8, 8) and shard["x0"].shape == (2, 3, 8, 8)

    torch.manual_seed(0)
    model = edm.EDMPrecond(edm.CONFIGS["tiny"]).eval()
    t0 = edm.t_list(1)[0]
    gens = [torch.Generator().manual_seed(k) for k in (4, 5)]  # each pair's noise, then its class
    noise = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
    labels = torch.cat([torch.randint(10, (1,), generator=g) for g in gens])
    assert torch.equal(shard["labels"], labels)
    assert torch.equal(shard["states"][:, 0], (noise.double() * t0).float())  # an elementwise product: exact
    expected = edm.sample_heun(model, noise, labels, steps=5, sigma_max=float(t0))
    assert torch.allclose(shard["x0"], expected, atol=1e-5)

    before = (out / "pairs_00000004.safetensors").read_bytes()
    os.remove(out / "pairs_00000004.safetensors")
    assert run(*flags).returncode == 0
    assert (out / "pairs_00000004.safetensors").read_bytes() == before
    other = run(*flags[:-1], "6")
    assert other.returncode != 0 and "other settings" in other.stderr


def test_teacher_pairs_keep_the_states_at_the_student_times(tmp_path):
    """--pair_states 4: the trajectory passes through t_list(4); the state at each time, solved on from there,
    reaches the same output."""
    out = tmp_path / "pairs"
    result = run("sample.py", "--tiny", "--save_pairs", str(out), "--n", "2", "--pair_states", "4", "--steps", "6")
    assert result.returncode == 0, result.stderr
    shard = load_file(out / "pairs_00000000.safetensors")
    torch.manual_seed(0)
    model = edm.EDMPrecond(edm.CONFIGS["tiny"]).eval()
    times = edm.t_list(4)
    # Solving on from state j with the same grid lands on the stored output.
    grid = torch.unique(torch.cat([edm.karras_sigmas(6, edm.T_MIN, float(times[0])), times])).flip(0)
    for j in range(4):
        segment = grid[grid <= times[j]]
        x0 = edm.sample_heun(model, shard["states"][:, j] / times[j].float(), shard["labels"], times=segment)
        assert torch.allclose(x0, shard["x0"], atol=1e-4), j


def test_dit_latents_are_decoded_by_the_vae(tmp_path):
    """sample.py --model dit: the same latents as dit.sample_ddim on the same noise and classes, decoded by --vae."""
    from dataclasses import fields

    from models import autoencoder_kl, dit

    torch.manual_seed(0)
    model = dit.DiT(dit.CONFIGS["tiny"]).eval()
    ckpt = tmp_path / "dit.safetensors"
    save_file(model.state_dict(), str(ckpt), metadata={"config": dit.config_to_json(model.cfg)})
    vae_cfg = autoencoder_kl.CONFIGS["tiny"]
    vae = autoencoder_kl.AutoencoderKL(vae_cfg).eval()
    (tmp_path / "vae").mkdir()
    save_file(vae.state_dict(), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    config = {f.name: getattr(vae_cfg, f.name) for f in fields(vae_cfg) if f.name not in ("repo", "subfolder")}
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))

    args = ["--model", "dit", "--ckpt", str(ckpt), "--vae", str(tmp_path / "vae"), "--sampler", "ddim", "--steps", "3"]
    result = run("sample.py", *args, "--guidance", "1.5", "--n", "3", "--npz", "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    data = np.load(tmp_path / "out" / "samples.npz")

    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
    labels = torch.cat([torch.randint(10, (1,), generator=g) for g in gens])
    with torch.no_grad():
        images = vae.decode(dit.sample_ddim(model, noise, labels, steps=3, guidance=1.5))
    expected = ((images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)).numpy()
    assert data["images"].shape == (3, 16, 16, 3) and np.array_equal(data["labels"], labels.numpy())
    assert np.abs(data["images"].astype(int) - expected.astype(int)).max() <= 1  # uint8 rounding across thread counts

    wrong = run("sample.py", "--model", "sit", "--ckpt", str(ckpt), "--vae", str(tmp_path / "vae"), "--n", "1")
    assert wrong.returncode != 0 and "is a DiT checkpoint; use --model dit" in wrong.stderr
    refused = run("sample.py", "--model", "sit", "--tiny", "--sampler", "ddpm")
    assert refused.returncode != 0 and "--model sit samples with heun, euler, student, not ddpm" in refused.stderr


@pytest.mark.parametrize(
    "model, extra, pixels",
    [("flux", [], 16), ("sd15", [], 16), ("sdxl", [], 16), ("wan", ["--causal", "--sampler", "student", "--chunk_size", "1"], 64),
     ("cogvideox", [], 64), ("cosmos_predict2", ["--sampler", "student"], 64)],
)  # fmt: skip
def test_text_models_tiny(model, extra, pixels, tmp_path):
    """Every text-to-image and video family samples end to end: tiny encoders, denoiser, sampler and autoencoder."""
    result = run("sample.py", "--model", model, "--tiny", "--prompt", "a red fox", "--prompt", "two cats", "--steps", "2", *extra, "--out_dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (2 * pixels, pixels)  # two prompts side by side
    settings = json.loads((tmp_path / "prompts.json").read_text())
    assert settings["prompts"] == ["a red fox", "two cats"] and settings["steps"] == 2
    if model in ("wan", "cogvideox", "cosmos_predict2"):
        video = Image.open(tmp_path / "samples.gif")
        assert video.n_frames == 9 and video.size == grid.size


def test_flux_cli_equals_the_model_sampler(tmp_path):
    """sample.py's Flux path is flux.sample_euler on seeded noise and the prompts' embeddings, decoded by the VAE."""
    import argparse

    import sample
    from models import flux

    result = run("sample.py", "--model", "flux", "--tiny", "--prompt", "a red fox", "--steps", "3", "--guidance", "2.5", "--out_dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    args = argparse.Namespace(model="flux", tiny=True, seed=0, ckpt=None, image=None, video=None)
    model, vae, encoder = sample.load_text_model(args, sample.TEXT_MODELS["flux"], torch.device("cpu"), torch.float32)
    cond = encoder(["a red fox"])
    noise = torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(0))[None]
    with torch.no_grad():
        image = vae.decode(flux.sample_euler(model, noise, cond["text"], cond["pooled"], steps=3, guidance=2.5))
    expected = sample.to_uint8(image)[0]
    assert np.abs(np.asarray(Image.open(tmp_path / "samples.png")).astype(int) - expected.astype(int)).max() <= 1


def test_text_models_need_prompts_and_refuse_class_options(tmp_path):
    missing = run("sample.py", "--model", "sd15", "--tiny")
    assert missing.returncode != 0 and "--prompt TEXT" in missing.stderr
    causal = run("sample.py", "--model", "flux", "--tiny", "--causal", "--prompt", "x")
    assert causal.returncode != 0 and "--causal samples a causal Wan student" in causal.stderr


def test_image_conditioning_reaches_wan_i2v_and_cosmos(tmp_path):
    """--image: Wan I2V (CLIP tokens and first-frame latents) and Cosmos Video2World; a different image, a different video."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    videos = {}
    for model, name in (("wan", "a"), ("wan", "b"), ("cosmos_predict2", "a")):
        out = tmp_path / f"{model}_{name}"
        result = run("sample.py", "--model", model, "--tiny", "--image", str(tmp_path / f"{name}.png"), "--prompt", "a fox", "--steps", "2", "--out_dir", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        videos[model, name] = np.asarray(Image.open(out / "samples.png"))
    assert not np.array_equal(videos["wan", "a"], videos["wan", "b"])
    refused = run("sample.py", "--model", "flux", "--tiny", "--image", str(tmp_path / "a.png"), "--prompt", "x")
    assert refused.returncode != 0 and "--image conditions Wan I2V models" in refused.stderr


def test_trained_text_student_samples(tmp_path):
    """A student that train_flux.py wrote (its Config in the metadata) loads by path and samples with the tiny encoders."""
    trained = run("train_flux.py", "--tiny", "--method", "sft", "--max_steps", "1", "--save_every", "1", "--eval_every", "100", "--out_dir", str(tmp_path / "run"))  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    student = tmp_path / "run" / "ckpt_0000001" / "student.safetensors"
    outputs = {}
    for name, ckpt in (("student", ["--ckpt", str(student)]), ("random", [])):
        result = run("sample.py", "--model", "flux", "--tiny", *ckpt, "--sampler", "student", "--steps", "1", "--prompt", "a fox", "--out_dir", str(tmp_path / name))  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs[name] = np.asarray(Image.open(tmp_path / name / "samples.png"))
    assert not np.array_equal(outputs["student"], outputs["random"])


def test_vace_control_folds_the_mask_as_the_official_code(tmp_path):
    """wan.vace_control: [kept latents, regenerated latents, mask], the mask's 8 x 8 pixel patches as 64 channels
    (channel 8 i + j holds pixel (8 h + i, 8 w + j)) at the nearest of the T frames for each latent frame."""
    from models import wan

    g = torch.Generator().manual_seed(0)
    kept, redo = torch.randn(2, 1, 4, 3, 2, 3, generator=g)
    mask = (torch.rand(1, 1, 9, 16, 24, generator=g) > 0.5).float()
    control = wan.vace_control(kept, redo, mask)
    assert (
        control.shape == (1, 72, 3, 2, 3) and torch.equal(control[:, :4], kept) and torch.equal(control[:, 4:8], redo)
    )
    for f, frame in enumerate([1, 4, 7]):  # nearest-exact: floor((f + 0.5) * 9 / 3)
        for i, j, h, w in [(0, 0, 0, 0), (3, 5, 1, 2), (7, 7, 1, 1), (2, 6, 0, 2)]:
            assert control[0, 8 + 8 * i + j, f, h, w] == mask[0, 0, frame, 8 * h + i, 8 * w + j]

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(9)]
    frames[0].save(tmp_path / "video.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.where(np.arange(50) > 25, 255, 0).astype(np.uint8)[None].repeat(40, 0)).save(tmp_path / "mask.png")  # fmt: skip
    result = run("sample.py", "--model", "wan", "--tiny", "--video", str(tmp_path / "video.gif"), "--mask", str(tmp_path / "mask.png"), "--prompt", "a fox", "--steps", "2", "--out_dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out" / "samples_frames").iterdir())) == 9  # the frames beside the GIF
