"""train_edm.py --model edm_rf: EDM's raw network in rectified-flow time (FastGen's MeanFlow on CIFAR-10,
EDM/config_mf_cifar10.py: drop_precond="both", schedule rf, output = the average velocity, raw t and r into the UNet).

The EDM-space view is the raw network at t = sigma / (1 + sigma) turned into x0 (float64, 1e-10); MeanFlow through it
with --native_weighting is FastGen's rectified-flow MeanFlow loss, written out here on its own terms; the one-step
sampler is FastGen's ODE jump; a short run lowers its objective and resumes exactly."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_edm
from models import edm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEW = train_edm.MODELS["edm_rf"][0]


def tiny_rf(seed=0, **switches):
    """A tiny EDMRF (raw SongUNet with the r input) in float64, every parameter moved off its (near-zero) init."""
    torch.manual_seed(seed)
    net = train_edm.EDMRF(replace(edm.CONFIGS["tiny"], precond=False, r_timestep=True, **switches)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def raw_u(net, x_t, t, r, labels, augment=None):
    """FastGen's EDMPrecond(drop_precond="both"): the UNet on x_t, t and r as they are; its output is u."""
    onehot = None if labels is None else F.one_hot(labels, net.cfg.label_dim).double()
    out, _, _ = net.model(x_t, t, onehot, augment, r)
    return out


def b(v):
    return v.reshape(-1, 1, 1, 1)


def test_adapter_is_the_raw_network_in_rf_time():
    """D(x0 + sigma eps; sigma, r) = x_t - t u(x_t, t, r_t) with t = sigma / (1 + sigma), x_t = (1 - t) x0 + t eps,
    r_t = r / (1 + r): the raw UNet fed the rf point and times unscaled; with and without r, augment labels, features."""
    net = tiny_rf()
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([0.0, 0.005, 0.3, 1.0, 40.0, 999.0], dtype=torch.float64)
    r = sigma * torch.tensor([1.0, 0.5, 0.1, 0.0, 0.3, 0.9], dtype=torch.float64)
    labels, augment = torch.tensor([0, 3, 9, 2, 7, 5]), torch.randn(6, 9, generator=g, dtype=torch.float64)
    x = x0 + b(sigma) * eps
    t = sigma / (1 + sigma)
    x_t = b(1 - t) * x0 + b(t) * eps
    with torch.no_grad():
        for r_in, aug in ((None, None), (r, None), (r, augment)):
            r_t = t if r_in is None else r_in / (1 + r_in)  # no r: the network's r = t (FastGen's default)
            expected = x_t - b(t) * raw_u(net, x_t, t, r_t, labels, aug)
            got = net(x, sigma, labels, r=r_in, augment_labels=aug)
            err = ((got - expected).abs().max() / expected.abs().max()).item()
            assert err < 1e-10, err
            assert (got[1:] - x0[1:]).abs().max() > 1e-2  # a real network, not the identity (sigma 0 gives x exactly)
        assert torch.equal(net(x[:1], sigma[:1], labels[:1]), x[:1])  # D(x; 0) = x: the rf boundary, exactly
        features = net.features(x, sigma, labels, indices=(1,), r=r)
        onehot = F.one_hot(labels, 10).double()
        native = net.model(x_t, t, onehot, None, r / (1 + r), feature_indices={1}, features_only=True)[1]
        assert torch.allclose(features[0], native[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="precond=False"):
        train_edm.EDMRF(edm.CONFIGS["tiny"])


def fastgen_meanflow_loss(net, x0, labels, args, seed):
    """FastGen's MeanFlowModel loss (methods.md 7.8, loss_type l2, CT, no guidance) in rectified-flow terms, drawing
    its randomness in meanflow_loss's order: t, r ~ 0.999 sigmoid(mean + std n); (t, r) <- (max, min); the first
    #{U >= r_ratio} samples get r = t; x_t = (1 - t) x0 + t eps, v = eps - x0; J = d/dt u along (v, 1, 0);
    e = sum (u - (v - (t - r) J))^2; loss = mean e / (e + c)^p."""
    torch.manual_seed(seed)
    B = len(x0)
    t = 0.999 * torch.sigmoid(args.p_mean + args.p_std * torch.randn(B, dtype=torch.float64))
    r = 0.999 * torch.sigmoid(args.r_p_mean + args.r_p_std * torch.randn(B, dtype=torch.float64))
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    n_fm = int((torch.rand(B) >= args.r_ratio).sum())
    r = torch.cat([t[:n_fm], r[n_fm:]])
    eps = torch.randn(x0.shape, dtype=torch.float64)
    x_t = b(1 - t) * x0 + b(t) * eps
    v = eps - x0
    u, J = torch.func.jvp(lambda x, tt, rr: raw_u(net, x, tt, rr, labels), (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))  # fmt: skip
    e = (u - (v - b(t - r) * J)).square().sum(dim=(1, 2, 3))
    return (e / (e + args.mf_norm_c) ** args.mf_norm_p).mean(), e.mean()


@pytest.mark.parametrize("labels", [None, torch.tensor([1, 4, 0, 9, 2, 7])], ids=["uncond", "cond"])
def test_meanflow_through_the_adapter_is_fastgens_rf_loss(labels):
    args = train_edm.parse_args(["--model", "edm_rf", "--method", "meanflow", "--native_weighting", "--t_sampler", "logitnormal", "--p_mean", "-0.6", "--p_std", "1.6", "--r_ratio", "0.5"])  # fmt: skip
    net = tiny_rf(seed=2, label_dim=0 if labels is None else 10)  # FastGen's CIFAR-10 MeanFlow is unconditional
    x0 = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.manual_seed(4)
    loss, logs = train_edm.meanflow_loss(net, net, None, x0, labels, 0, args, VIEW)
    expected, unweighted = fastgen_meanflow_loss(net, x0, labels, args, 4)
    rel = abs(loss.item() / expected.item() - 1)
    print(f"meanflow loss through the adapter vs FastGen's rf loss: relative error {rel:.1e}")
    assert rel < 1e-10 and abs(logs["unweighted"] / unweighted.item() - 1) < 1e-10
    # Without --native_weighting the residual stays in EDM's noise levels: (1 - t)^2 / (1 - r) times the rf one.
    args.native_weighting = False
    torch.manual_seed(4)
    edm_space = train_edm.meanflow_loss(net, net, None, x0, labels, 0, args, VIEW)[0]
    assert abs(edm_space.item() / expected.item() - 1) > 0.05


def test_one_step_sampler_is_fastgens_ode_jump():
    """generate() at 1 step: x = 0.999 z, x <- x - 0.999 u(x, t=0.999, r=0) (FastGen's MeanFlow 'ode' sampler); the
    sampler returns float32."""
    net = tiny_rf(seed=5)
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4])
    got = train_edm.generate(net, VIEW, z, labels, 1, "meanflow")
    x = 0.999 * z
    t, r = torch.full((4,), 0.999, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        expected = x - 0.999 * raw_u(net, x, t, r, labels)
    assert got.dtype == torch.float32 and ((got - expected).abs().max() / expected.abs().max()).item() < 1e-6


def test_schedule_is_fastgens_rf_range():
    assert VIEW.T_MIN == 0.0 and abs(VIEW.T_MAX - 999) < 1e-9
    assert torch.allclose(VIEW.t_list(2), torch.tensor([999.0, 0.4995 / 0.5005, 0.0], dtype=torch.float64))
    torch.manual_seed(0)
    sigma = VIEW.sample_t(4, "logitnormal", -0.6, 1.6)
    torch.manual_seed(0)
    t = 0.999 * torch.sigmoid(-0.6 + 1.6 * torch.randn(4, dtype=torch.float64))
    assert torch.allclose(sigma / (1 + sigma), t, rtol=1e-12)
    assert VIEW.sample_t(1000, "lognormal").min() >= VIEW.SIGMA_FLOOR  # ln 0 is no truncation point


def run_script(*args):
    result = subprocess.run([sys.executable, "train_edm.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def images8(tmp_path_factory):
    """256 unlabelled 8 x 8 images (the toy images averaged down 4x) as an EDM-style folder of PNGs, and as a batch:
    CIFAR-like unconditional data at a size where 100 MeanFlow steps take seconds."""
    import toy

    x, _ = toy.toy_batch(256, generator=torch.Generator().manual_seed(99))
    x = F.avg_pool2d(x, 4)
    pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    folder = tmp_path_factory.mktemp("images8")
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:05d}.png")
    return str(folder), torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


RUN = ["--model", "edm_rf", "--method", "meanflow", "--native_weighting", "--t_sampler", "logitnormal", "--p_mean", "-0.6", "--p_std", "1.6", "--optimizer", "adam", "--lr", "2e-3", "--tiny", "--max_steps", "100", "--save_every", "90", "--eval_every", "100", "--num_threads", "1"]  # fmt: skip


def objective(out, step, x0, flags):
    """FastGen's unweighted rf MeanFlow error on a fixed batch (fixed noise and times) for the run's student at `step`
    (0 = as initialised, rebuilt from the seed as main() builds it)."""
    args = train_edm.parse_args(flags)
    with safe_open(os.path.join(out, "ckpt_0000100", "student.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config.pop("schedule") == "rf" and config["precond"] is False and config["label_dim"] == 0
    torch.manual_seed(args.seed)
    net = train_edm.EDMRF(edm.config_from_json(json.dumps(config))).train()
    if step:
        net.load_state_dict(load_file(os.path.join(out, f"ckpt_{step:07d}", "student.safetensors")))
    torch.manual_seed(123)
    return train_edm.meanflow_loss(net, net, None, x0, None, 0, args, VIEW)[1]["unweighted"]


def test_short_run_lowers_its_objective_and_resumes_exactly(images8, tmp_path):
    """100 steps from scratch on unconditional 8 x 8 images: the objective on the 256 images falls by a margin
    (measured 0.38x; 0.41x, 0.36x at seeds 1, 2); a copy of the run cut back to its step-90 checkpoint and resumed
    writes the same step-100 weights, bit for bit."""
    folder, x0 = images8
    out, cut = str(tmp_path / "run"), str(tmp_path / "cut")
    flags = [*RUN, "--data", folder]
    run_script(*flags, "--out_dir", out)
    assert os.path.exists(os.path.join(out, "samples", "step_0000100.png"))
    before, after = objective(out, 0, x0, flags), objective(out, 100, x0, flags)
    print(f"edm_rf meanflow: {before:.4f} -> {after:.4f} ({after / before:.2f}x)")
    assert after < 0.8 * before
    shutil.copytree(out, cut)
    shutil.rmtree(os.path.join(cut, "ckpt_0000100"))
    run_script(*flags, "--out_dir", cut, "--resume")
    a = load_file(os.path.join(out, "ckpt_0000100", "student.safetensors"))
    c = load_file(os.path.join(cut, "ckpt_0000100", "student.safetensors"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    # edm.py refuses an rf network (it would run it as an EDM-preconditioned one), edm_rf a released EDM one.
    with pytest.raises(ValueError, match="schedule"):
        edm.from_pretrained(os.path.join(out, "ckpt_0000100", "student.safetensors"))
    with pytest.raises(SystemExit):
        VIEW.from_pretrained("edm-cifar10-32x32-uncond-vp")
