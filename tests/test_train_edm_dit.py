"""train_edm.py --model dit|sit: the EDM-space view of DiT/SiT is the native network at the native time of equal SNR
(checked numerically, JVP included), the schedule functions under edm.py's names, the native loss weighting, the
latent data format (written by download.encode_latents with a tiny VAE, read back, bad shapes refused), and short
subprocess runs that lower their objective and resume exactly."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import download
import train_edm
from models import autoencoder_kl, dit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEDULES = {"dit": "ddpm", "sit": "rf"}


def tiny_model(model, seed=0, **switches):
    """A tiny EDMDiT in float64 with every parameter moved off its (partly zero) initialisation."""
    torch.manual_seed(seed)
    cfg = train_edm.MODELS[model][0].tiny
    net = train_edm.EDMDiT(replace(cfg, **switches)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("model", ["dit", "sit"])
def test_native_time_inverts_the_noise_level(model):
    schedule = SCHEDULES[model]
    lo, hi = dit.T_RANGES[schedule]
    t = torch.cat([torch.linspace(lo, hi * 0.999, 101, dtype=torch.float64), torch.tensor([0.3, 17.5, 998.25]) * (hi / 999)])  # fmt: skip
    assert torch.allclose(train_edm.native_time(train_edm.noise_level(t, schedule), schedule), t, rtol=1e-9, atol=1e-9)
    # The same SNR: sigma(t) / alpha(t) = sigma, and the scale alpha(t) = 1 / (1 + sigma) (rf), 1 / sqrt(1 + sigma^2).
    sigma = torch.tensor([0.003, 0.02, 0.5, 2.0, 80.0, 150.0], dtype=torch.float64)
    t = train_edm.native_time(sigma, schedule)
    assert torch.allclose(dit.sigma(t, schedule) / dit.alpha(t, schedule), sigma, rtol=1e-10)
    expected = 1 / (1 + sigma) if schedule == "rf" else 1 / (1 + sigma**2).sqrt()
    assert torch.allclose(dit.alpha(t, schedule), expected, rtol=1e-10)


@pytest.mark.parametrize("model", ["dit", "sit"])
def test_adapter_is_the_native_network_at_the_native_point(model):
    """For x0, eps and sigma: the adapter's x0 at x = x0 + sigma eps equals dit.to_x0 of the bare network at
    x_t = alpha(t) x0 + sigma(t) eps, t the native time of sigma; with and without MeanFlow's r."""
    schedule = SCHEDULES[model]
    net = tiny_model(model, r_timestep=True, time_cond_type="diff")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)  # fmt: skip
    sigma = torch.tensor([0.005, 0.1, 0.7, 3.0, 40.0, 120.0], dtype=torch.float64)
    r = sigma * torch.tensor([1.0, 0.5, 0.1, 0.0, 0.3, 0.9], dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 2, 10, 5])  # 10 = the null class
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    t = train_edm.native_time(sigma, schedule)
    x_t = dit.alpha(t, schedule).reshape(-1, 1, 1, 1) * x0 + dit.sigma(t, schedule).reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        for r_in in (None, r):
            r_native = None if r_in is None else train_edm.native_time(r_in, schedule)
            native = dit.DiT.forward(net, x_t, t, labels, r=r_native)
            expected = dit.to_x0(x_t, native, t, dit.PRED_TYPES[schedule], schedule)
            got = net(x, sigma, labels, r=r_in)
            assert (got - expected).abs().max() < 1e-10 * expected.abs().max()
            assert (got - x0).abs().max() > 1e-3  # a real network, not the identity
        features = net.features(x, sigma, labels, indices=(1,))
        native = dit.DiT.forward(net, x_t, t, labels, feature_indices={1}, features_only=True)
        assert torch.allclose(features[0], native[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model", ["dit", "sit"])
def test_meanflow_jvp_through_the_adapter_matches_finite_differences(model):
    """MeanFlow's tangent du/dt along (v, 1, 0), through the sigma -> native time map (DiT: the inverted table)."""
    net = tiny_model(model, r_timestep=True, time_cond_type="diff")
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)  # fmt: skip
    t, r = torch.tensor([0.3, 2.0, 30.0], dtype=torch.float64), torch.tensor([0.01, 1.0, 0.2], dtype=torch.float64)
    labels = torch.tensor([1, 2, 3])

    def u(x, t, r):
        return train_edm.average_velocity(net, x, t, r, labels)

    _, tangent = torch.func.jvp(u, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    h = 1e-6 * t
    b = lambda s: s.reshape(-1, 1, 1, 1)
    fd = (u(x + b(h) * v, t + h, r) - u(x - b(h) * v, t - h, r)) / (2 * b(h))
    assert torch.allclose(tangent, fd, rtol=1e-4, atol=1e-6 * fd.abs().max().item())


def test_schedule_view_times():
    sit, dit_ = train_edm.MODELS["sit"][0], train_edm.MODELS["dit"][0]
    # FastGen's linspace(0.999, 0, steps + 1) in noise levels: rf [0.999, 0.4995, 0]; DiT [999, 499.5, 0] timesteps.
    assert torch.allclose(sit.t_list(2), torch.tensor([999.0, 0.4995 / 0.5005, 0.0], dtype=torch.float64))
    ddpm = dit.t_list(2, "ddpm")[:2]
    assert (
        torch.allclose(dit_.t_list(2)[:2], dit.sigma(ddpm, "ddpm") / dit.alpha(ddpm, "ddpm"))
        and dit_.t_list(2)[-1] == 0
    )
    assert abs(sit.T_MAX - 999) < 1e-6 and abs(dit_.T_MIN - (1e-4 / (1 - 1e-4)) ** 0.5) < 1e-9
    # uniform: SiT's uniform rf time in [0.001, 0.999]; lognormal stays in sigma (logit-normal in rf time).
    torch.manual_seed(0)
    t_rf = train_edm.native_time(sit.sample_t(20000, "uniform"), "rf")
    assert 0.001 - 1e-9 <= t_rf.min() and t_rf.max() <= 0.999 + 1e-9 and abs(t_rf.mean().item() - 0.5) < 0.01
    torch.manual_seed(0)
    logit = train_edm.native_time(sit.sample_t(20000, "lognormal", -0.4, 1.0), "rf").logit()
    assert abs(logit.mean().item() + 0.4) < 0.03 and abs(logit.std().item() - 1.0) < 0.03


@pytest.mark.parametrize("model", ["dit", "sit"])
def test_native_weighting_gives_the_native_loss(model):
    """sft with --native_weighting: the x0 loss weighted per sample equals ||eps_hat - eps||^2 (DiT) or
    ||flow_hat - (eps - x0)||^2 (SiT) of the bare network at the native point."""
    schedule, view = SCHEDULES[model], train_edm.MODELS[model][0]
    net = tiny_model(model).float()
    args = train_edm.parse_args(["--method", "sft", "--model", model, "--native_weighting", "--t_sampler", "logitnormal"])  # fmt: skip
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    loss, _ = train_edm.sft_loss(net, x0, None, args, view)
    torch.manual_seed(7)
    sigma = view.sample_t(4, "logitnormal", args.p_mean, args.p_std, view.T_MIN, args.t_max)
    eps = torch.randn(x0.shape, dtype=torch.float64)
    t = train_edm.native_time(sigma, schedule)
    b = lambda s: s.reshape(-1, 1, 1, 1)
    x_t = (b(dit.alpha(t, schedule)) * x0.double() + b(dit.sigma(t, schedule)) * eps).float()
    with torch.no_grad():
        out = dit.DiT.forward(net, x_t, t, None)[:, :4].double()
    target = eps if schedule == "ddpm" else eps - x0.double()
    expected = (out - target).square().mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-4)


# ----------------------------------------------------------------------------
# Latent data


def write_images(folder, sizes=((40, 52), (36, 36), (64, 48))):
    """Two classes of small RGB images of unequal shapes."""
    g = np.random.default_rng(0)
    for c in ("n01", "n02"):
        os.makedirs(os.path.join(folder, c))
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, c, f"{i}.JPEG"))


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    """download.encode_latents on 6 images with the tiny SD-layout VAE fixture (factor 4: 32 px -> 4 x 8 x 8), and
    that VAE as a local folder for --vae."""
    root = tmp_path_factory.mktemp("latents")
    with safe_open(os.path.join(HERE, "fixtures", "autoencoder_kl_sd.safetensors"), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(("input.", "output."))}
        config_json = f.metadata()["config"]
    os.makedirs(root / "vae")
    save_file(weights, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "vae" / "config.json").write_text(config_json)
    vae = autoencoder_kl.from_pretrained(str(root / "vae"))
    write_images(str(root / "images"))
    count = download.encode_latents(str(root / "images"), str(root / "data"), vae, "tiny", image_size=32, shard_size=4)
    assert count == 6
    return root, vae


def test_encode_latents_writes_the_format_and_resumes(latent_folder):
    root, vae = latent_folder
    meta = json.loads((root / "data" / "latents.json").read_text())
    assert meta["shards"] == ["shard_00000.safetensors", "shard_00001.safetensors"] and meta["num_classes"] == 2
    shards = [load_file(str(root / "data" / name)) for name in meta["shards"]]
    assert [s["mean"].shape for s in shards] == [(4, 4, 8, 8), (2, 4, 8, 8)] and shards[0]["std"].dtype == torch.float16
    assert torch.equal(torch.cat([s["labels"] for s in shards]), torch.tensor([0, 0, 0, 1, 1, 1]))
    # The first image, center-cropped as ADM (52 x 40 -> 32 x 32 from the middle), through the VAE's posterior.
    image = download.center_crop_arr(Image.open(root / "images" / "n01" / "0.JPEG").convert("RGB"), 32)
    assert image.shape == (32, 32, 3)
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(shards[0]["mean"][:1].float(), vae.posterior(x).mean, atol=2e-3)
    # Existing shards are kept: a rerun only writes what is missing.
    os.remove(root / "data" / "shard_00001.safetensors")
    stamp = os.path.getmtime(root / "data" / "shard_00000.safetensors")
    download.encode_latents(str(root / "images"), str(root / "data"), vae, "tiny", image_size=32, shard_size=4)
    assert os.path.getmtime(root / "data" / "shard_00000.safetensors") == stamp
    assert torch.equal(load_file(str(root / "data" / "shard_00001.safetensors"))["mean"], shards[1]["mean"])


def test_imagenet_latents_command_writes_the_same_shards(latent_folder, tmp_path):
    root, _ = latent_folder
    download.main(["imagenet-latents", str(root / "images"), "--out", str(tmp_path / "data"), "--vae", str(root / "vae"), "--image_size", "32", "--batch", "4"])  # fmt: skip
    written = load_file(str(tmp_path / "data" / "shard_00000.safetensors"))
    assert torch.equal(written["mean"], torch.cat([load_file(str(root / "data" / n))["mean"] for n in ("shard_00000.safetensors", "shard_00001.safetensors")]))  # fmt: skip


def test_latent_dataset_reads_both_forms_and_refuses_bad_shapes(latent_folder, tmp_path):
    root, vae = latent_folder
    data = train_edm.LatentDataset(str(root / "data"))
    assert len(data) == 6 and data.shape == (4, 8, 8) and data.posterior
    mean, std = (torch.cat([load_file(str(root / "data" / n))[k] for n in data.meta["shards"]]).float() for k in ("mean", "std"))  # fmt: skip
    index = torch.tensor([5, 0, 3])
    g = torch.Generator().manual_seed(4)
    batch = data.batch(index, g)
    n = torch.randn(mean[index].shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(batch, (mean[index] + std[index] * n) * 0.18215)
    # The other form: normalised latents as they are.
    os.makedirs(tmp_path / "plain")
    save_file({"latents": torch.randn(3, 4, 8, 8).half(), "labels": torch.tensor([2, 0, 1])}, str(tmp_path / "plain" / "a.safetensors"))  # fmt: skip
    (tmp_path / "plain" / "latents.json").write_text(json.dumps({"shards": ["a.safetensors"]}))
    plain = train_edm.LatentDataset(str(tmp_path / "plain"))
    assert torch.equal(plain.batch(torch.tensor([1]), g), load_file(str(tmp_path / "plain" / "a.safetensors"))["latents"][1:2].float())  # fmt: skip
    # Wrong shapes and keys are named.
    save_file({"latents": torch.randn(3, 4, 8), "labels": torch.tensor([2, 0, 1])}, str(tmp_path / "plain" / "a.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"expected labels \(N,\) and latents \(N, C, h, w\)"):
        train_edm.LatentDataset(str(tmp_path / "plain"))
    save_file({"images": torch.randn(3, 4, 8, 8), "labels": torch.tensor([2, 0, 1])}, str(tmp_path / "plain" / "a.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="expected labels with latents, or labels with mean and std"):
        train_edm.LatentDataset(str(tmp_path / "plain"))


# ----------------------------------------------------------------------------
# The script end to end


def run_script(*flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "train_edm.py", "--num_threads", "1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(out, key):
    return [json.loads(line)[key] for line in open(os.path.join(out, "metrics.jsonl")) if f'"{key}"' in line]


def objective(out, flags, step):
    """The run's loss on one fixed batch of 256 toy images (fixed noise and times), for its student at `step` (0 = as
    initialised, rebuilt from the seed as main() builds it): less noisy than the per-step losses of batches of 8."""
    import toy

    args = train_edm.parse_args(flags)
    view, Precond = train_edm.MODELS[args.model]
    path = os.path.join(out, f"ckpt_{step:07d}", "student.safetensors") if step else None
    with safe_open(os.path.join(out, "ckpt_0000100", "student.safetensors"), framework="pt") as f:
        cfg = dit.config_from_json(f.metadata()["config"])
    torch.manual_seed(args.seed)
    net = Precond(cfg).train()
    if path:
        net.load_state_dict(load_file(path))
    x0, labels = toy.toy_batch(256, generator=torch.Generator().manual_seed(99))
    torch.manual_seed(123)
    if args.method == "meanflow":
        return train_edm.meanflow_loss(net, net, None, x0, labels, 0, args, view)[1]["unweighted"]
    return train_edm.sft_loss(net, x0, labels, args, view)[0].item()


SHORT_RUNS = {
    "sit-meanflow": ["--model", "sit", "--method", "meanflow", "--lr", "2e-3"],  # measured 0.66x (0.61x, 0.62x at seeds 1, 2)
    "dit-sft": ["--model", "dit", "--method", "sft", "--native_weighting", "--t_sampler", "logitnormal", "--lr", "2e-3"],  # measured 0.47x
}  # fmt: skip


@pytest.mark.parametrize("flags", SHORT_RUNS.values(), ids=SHORT_RUNS.keys())
def test_short_run_lowers_its_objective(tmp_path, flags):
    """100 steps on a tiny DiT/SiT from scratch, toy images as 3-channel latents: the objective on a fixed batch (for
    meanflow the unweighted MeanFlow error) falls by a margin."""
    out = str(tmp_path / "run")
    run_script(*flags, "--tiny", "--data", "toy", "--max_steps", "100", "--optimizer", "adam", "--eval_every", "100", "--save_every", "100", "--out_dir", out)  # fmt: skip
    assert os.path.exists(os.path.join(out, "samples", "step_0000100.png"))
    before, after = objective(out, flags, 0), objective(out, flags, 100)
    print(f"{flags[1]} {flags[3]}: {before:.4f} -> {after:.4f} ({after / before:.2f}x)")
    assert after < 0.8 * before


def test_sit_on_latent_data_resumes_exactly_and_decodes_its_grids(latent_folder, tmp_path):
    """sft on the encoded latent folder (posterior draws seeded per batch), grids through --vae, and a checkpoint
    that dit.from_pretrained reads back."""
    root, _ = latent_folder
    common = ["--model", "sit", "--method", "sft", "--tiny", "--data", str(root / "data"), "--vae", str(root / "vae"), "--label_dropout", "0.1", "--eval_every", "2", "--eval_n", "4"]  # fmt: skip
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script(*common, "--max_steps", "4", "--save_every", "4", "--out_dir", straight)
    run_script(*common, "--max_steps", "2", "--save_every", "2", "--out_dir", split)
    run_script(*common, "--max_steps", "4", "--save_every", "2", "--out_dir", split, "--resume")
    a = load_file(os.path.join(straight, "ckpt_0000004", "student.safetensors"))
    b = load_file(os.path.join(split, "ckpt_0000004", "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    grid = Image.open(os.path.join(straight, "samples", "step_0000004.png"))
    assert grid.size == (8 * 32, 32)  # a row of 8 columns of decoded 32 px samples, not 8 px latents
    student = dit.from_pretrained(os.path.join(straight, "ckpt_0000004", "student.safetensors"))
    assert student.cfg.schedule == "rf" and student.cfg.in_channels == 4 and student.cfg.num_classes == 2


def test_wrong_schedule_and_dropout_are_refused(tmp_path):
    result = subprocess.run([sys.executable, "train_edm.py", "--model", "dit", "--method", "sft", "--tiny", "--dropout", "0.1", "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "no dropout" in result.stderr
