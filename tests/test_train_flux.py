"""train_flux.py: each loss against its equation written out independently here, the GAN heads, end-to-end --tiny
runs of every method (Flux) and of SD1.5 DMD2, short DMD2 / LADD runs that move a one-step student toward the
teacher's 28-step samples, exact resume, FSDP2 on two processes against one, teacher pairs, and clear errors."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import train_flux
from models import flux, sd15

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def run(*flags, check=True):
    """train_flux.py in a subprocess; returns the CompletedProcess."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_flux.py"), *flags], cwd=ROOT, env=ENV, capture_output=True, text=True)  # fmt: skip
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def main(*flags):
    """train_flux.py in this process (for runs whose subprocess start-up would only cost time)."""
    return train_flux.main(train_flux.parse_args(list(flags)))


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def evals(out_dir):
    return [r["eval_mse_to_teacher"] for r in metrics(out_dir) if "eval_mse_to_teacher" in r]


def tiny(model, method, **kw):
    args = train_flux.parse_args(["--tiny", "--model", model, "--method", method])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def tiny_net(model, seed):
    module, Net = train_flux.FAMILIES[model][:2]
    torch.manual_seed(seed)
    return module, Net(module.CONFIGS["tiny"]).eval()


def flux_cond(B, seed=0):
    cfg = flux.CONFIGS["tiny"]
    g = torch.Generator().manual_seed(seed)
    return {"text": torch.randn(B, 5, cfg.joint_attention_dim, generator=g), "pooled": torch.randn(B, cfg.pooled_projection_dim, generator=g), "guidance": torch.full((B,), 3.5)}  # fmt: skip


def sd15_cond(B, seed=0):
    return {"text": torch.randn(B, 5, sd15.CONFIGS["tiny"].cross_attention_dim, generator=torch.Generator().manual_seed(seed))}  # fmt: skip


# ----------------------------------------------------------------------------
# Losses against their equations


def test_vsd_loss_value_and_gradient():
    """0.5 mean((g - sg(g - w (x_F - x_T)))^2): value 0.5 mean((w (x_F - x_T))^2), gradient w (x_F - x_T) / numel."""
    g0 = torch.Generator().manual_seed(0)
    g, x_T, x_F = (torch.randn(3, 4, 8, 8, generator=g0) for _ in range(3))
    g.requires_grad_(True)
    loss = train_flux.vsd_loss(g, x_T, x_F)
    loss.backward()
    w = 1 / ((g.detach() - x_T).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
    assert torch.allclose(loss, 0.5 * (w * (x_F - x_T)).square().mean(), rtol=1e-5)
    assert torch.allclose(g.grad, w * (x_F - x_T) / g.numel(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("model", ["flux", "sd15"])
def test_sft_loss_is_denoising_score_matching_in_the_native_type(model):
    """Flux: flow target eps - x0 at x_t = (1 - t) x0 + t eps; SD1.5: eps target at sqrt(abar) x0 + sqrt(1 - abar) eps."""
    module, net = tiny_net(model, 1)
    args = tiny(model, "sft")
    x0 = torch.randn(3, *((16, 8, 8) if model == "flux" else (4, 8, 8)), generator=torch.Generator().manual_seed(2))
    cond = flux_cond(3) if model == "flux" else sd15_cond(3)
    torch.manual_seed(5)
    loss, _ = train_flux.sft_loss(net, x0, cond, None, args, module)
    torch.manual_seed(5)
    t = args.t_min + (args.t_max - args.t_min) * torch.rand(3, dtype=torch.float64)  # uniform t
    eps = torch.randn_like(x0)
    tb = t.reshape(-1, 1, 1, 1)
    if model == "flux":
        x_t, target = ((1 - tb) * x0 + tb * eps).float(), eps - x0
    else:
        abar = sd15.alphas_cumprod()
        i = t.floor().long()  # log abar is linear between integer timesteps
        log_abar = abar.log()[i] + (t - i) * (abar.log()[i + 1] - abar.log()[i])
        a, s = log_abar.exp().sqrt().reshape(-1, 1, 1, 1), (1 - log_abar.exp()).sqrt().reshape(-1, 1, 1, 1)
        x_t, target = (a * x0 + s * eps).float(), eps
    expected = (net(x_t, t, **cond) - target).square().mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_kd_loss_regresses_onto_the_teacher_from_the_students_own_times():
    """A 2-step student on 4-state pairs starts from state 0 (t = 0.999) or state 2 (t = 0.4995)."""
    module, net = tiny_net("flux", 1)
    args = tiny("flux", "kd", student_steps=2)
    pairs = torch.randn(4, 5, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = flux_cond(4)
    torch.manual_seed(9)
    loss, _ = train_flux.kd_loss(net, pairs, cond, args, module)
    torch.manual_seed(9)
    pick = torch.randint(2, (4,)) * 2
    t = torch.tensor([0.999, 0.74925, 0.4995, 0.24975], dtype=torch.float64)[pick]
    x_in = pairs[torch.arange(4), pick]
    x0 = x_in.double() - t.reshape(-1, 1, 1, 1) * net(x_in, t, **cond).double()  # RF: x0 = x_t - t flow
    assert torch.allclose(loss.double(), 0.5 * (x0 - pairs[:, -1].double()).square().mean(), rtol=1e-5)


def student_draws(model, B, shape, args, module):
    """Replays student_input (1 step: sigma(t_0) noise) and the critic time and noise."""
    t_s = module.t_list(1)[torch.randint(1, (B,))]
    x_in = (module.sigma(t_s).reshape(-1, 1, 1, 1) * torch.randn(B, *shape).double()).float()
    return x_in, t_s


def sd_x0(net, x, t, cond):
    """x0 = (x - sigma eps) / alpha for the eps-predicting SD UNet."""
    tb = t.reshape(-1, 1, 1, 1)
    return ((x.double() - sd15.sigma(tb) * net(x, t, **cond).double()) / sd15.alpha(tb)).float()


def test_dmd2_generator_loss_is_vsd_on_the_guided_teacher_plus_gan():
    """SD1.5 with CFG w = 2: x_T = T_c + (w - 1)(T_c - T_u) in x0 space; loss = VSD + gan_weight softplus(-D)."""
    module = sd15
    _, student = tiny_net("sd15", 1)
    _, teacher = tiny_net("sd15", 2)
    _, fake = tiny_net("sd15", 3)
    args = tiny("sd15", "dmd2", guidance=2.0, gan_weight=0.1)
    maps = teacher(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), **sd15_cond(1), feature_indices=[2], features_only=True)  # fmt: skip
    disc = train_flux.Discriminator([2], [(m.shape[1], m.shape[-1]) for m in maps], "unet")
    B, cond, uncond = 3, sd15_cond(3, 0), sd15_cond(3, 1)
    torch.manual_seed(11)
    loss, logs = train_flux.dmd2_generator_loss(student, teacher, fake, disc, None, (B, 4, 8, 8), cond, uncond, args, module)  # fmt: skip
    torch.manual_seed(11)
    x_in, t_s = student_draws("sd15", B, (4, 8, 8), args, module)
    g = sd_x0(student, x_in, t_s, cond)
    t = args.t_min + (args.t_max - args.t_min) * torch.rand(B, dtype=torch.float64)
    tb = t.reshape(-1, 1, 1, 1)
    x_t = (sd15.alpha(tb) * g.double() + sd15.sigma(tb) * torch.randn(B, 4, 8, 8).double()).float()
    x_F = sd_x0(fake, x_t, t, cond)
    x_c, x_u = sd_x0(teacher, x_t, t, cond), sd_x0(teacher, x_t, t, uncond)
    x_T = x_c + (2.0 - 1) * (x_c - x_u)
    w = 1 / ((g - x_T).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
    features = teacher(x_t, t, **cond, feature_indices=[2], features_only=True)
    expected = 0.5 * (w * (x_F - x_T)).square().mean() + 0.1 * F.softplus(-disc(features)).mean()
    assert torch.allclose(loss, expected, rtol=1e-4)
    assert logs.keys() == {"vsd_loss", "gan_loss_gen"}


def test_critic_loss_is_x0_dsm_plus_the_gan_discriminator_loss():
    """Flux critic: mean((F(x_t) - g)^2) + softplus(D(fake)) + softplus(-D(real)), real noised at its own t and noise."""
    module = flux
    _, student = tiny_net("flux", 1)
    _, teacher = tiny_net("flux", 2)
    _, fake = tiny_net("flux", 3)
    args = tiny("flux", "dmd2")
    disc = train_flux.Discriminator([2], [(32, 4)], "dit")
    B, cond = 3, flux_cond(3)
    x0 = torch.randn(B, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(13)
    loss, logs = train_flux.critic_loss(student, teacher, fake, disc, x0, (B, 16, 8, 8), cond, args, module)
    torch.manual_seed(13)
    x_in, t_s = student_draws("flux", B, (16, 8, 8), args, module)

    def rf_x0(net, x, t):
        return (x.double() - t.reshape(-1, 1, 1, 1) * net(x, t, **cond).double()).float()

    g = rf_x0(student, x_in, t_s)
    t = args.t_min + (args.t_max - args.t_min) * torch.rand(B, dtype=torch.float64)
    eps = torch.randn(B, 16, 8, 8)
    x_t = ((1 - t.reshape(-1, 1, 1, 1)) * g.double() + t.reshape(-1, 1, 1, 1) * eps.double()).float()
    t_r = args.t_min + (args.t_max - args.t_min) * torch.rand(B, dtype=torch.float64)
    x_r = ((1 - t_r.reshape(-1, 1, 1, 1)) * x0.double() + t_r.reshape(-1, 1, 1, 1) * torch.randn(B, 16, 8, 8).double()).float()  # fmt: skip
    fake_logits = disc(teacher(x_t, t, **cond, feature_indices=[2], features_only=True))
    real_logits = disc(teacher(x_r, t_r, **cond, feature_indices=[2], features_only=True))
    expected = (rf_x0(fake, x_t, t) - g).square().mean() + F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()  # fmt: skip
    assert torch.allclose(loss, expected, rtol=1e-4)
    assert logs.keys() == {"fake_score_loss", "gan_loss_disc"}

    # LADD's critic is the same without the fake score; its generator loss is softplus(-D) of the noised sample.
    torch.manual_seed(13)
    loss_ladd, _ = train_flux.critic_loss(student, teacher, None, disc, x0, (B, 16, 8, 8), cond, args, module)
    assert torch.allclose(loss_ladd, expected - (rf_x0(fake, x_t, t) - g).square().mean(), rtol=1e-4)
    torch.manual_seed(13)
    loss_gen, _ = train_flux.ladd_generator_loss(student, teacher, disc, None, (B, 16, 8, 8), cond, args, module)
    torch.manual_seed(13)
    x_in, t_s = student_draws("flux", B, (16, 8, 8), args, module)
    g = rf_x0(student, x_in, t_s)
    t = args.t_min + (args.t_max - args.t_min) * torch.rand(B, dtype=torch.float64)
    x_t = ((1 - t.reshape(-1, 1, 1, 1)) * g.double() + t.reshape(-1, 1, 1, 1) * torch.randn(B, 16, 8, 8).double()).float()  # fmt: skip
    expected_gen = F.softplus(-disc(teacher(x_t, t, **cond, feature_indices=[2], features_only=True))).mean()
    assert torch.allclose(loss_gen, expected_gen, rtol=1e-4)


def test_discriminator_heads_reduce_each_map_to_one_logit():
    dit = train_flux.Discriminator([1, 3], [(64, 16), (64, 16)], "dit")
    assert dit([torch.randn(2, 64, 16, 16)] * 2).shape == (2, 2)
    assert dit.heads[0][0].out_channels == 32  # FastGen's ImageDiT head halves the width
    unet = train_flux.Discriminator([4], [(64, 8)], "unet")
    assert unet([torch.randn(2, 64, 8, 8)]).shape == (2, 1)


# ----------------------------------------------------------------------------
# End to end


def write_images(folder, n=4):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.png"))
        with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
            f.write(f"caption {i % 2}")


def test_sft_on_an_image_folder_encodes_once_and_trains(tmp_path):
    write_images(tmp_path / "images")
    out = tmp_path / "run"
    run("--tiny", "--method", "sft", "--data", str(tmp_path / "images"), "--max_steps", "3", "--eval_every", "3", "--save_every", "3", "--out_dir", str(out))  # fmt: skip
    shard = load_file(out / "latents" / "shard_00000.safetensors")
    assert shard["latents"].shape == (4, 16, 8, 8)  # 16 px centre crops, tiny VAE halves the side
    assert os.path.exists(out / "samples" / "step_0000003.png")
    assert {"student.safetensors", "ema_0.9999.safetensors", "state.pt", "args.json"} <= set(os.listdir(out / "ckpt_0000003"))  # fmt: skip


def test_make_pairs_then_kd(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    pairs = tmp_path / "pairs"
    common = ["--tiny", "--prompts", str(prompts), "--pairs", str(pairs), "--teacher_steps", "8", "--out_dir", str(tmp_path / "run")]  # fmt: skip
    train_flux.main(train_flux.parse_args([*common, "--make_pairs", "10"]))
    shard = load_file(pairs / "shard_00000.safetensors")
    assert shard["states"].shape == (10, 4, 16, 8, 8) and shard["x0"].shape == (10, 16, 8, 8)
    with open(pairs / "pairs.json") as f:
        assert json.load(f)["prompts"]["shard_00000.safetensors"][:4] == ["a cat", "a dog", "a bird", "a cat"]
    before = os.path.getmtime(pairs / "shard_00000.safetensors")
    train_flux.main(train_flux.parse_args([*common, "--make_pairs", "10"]))  # resumable: finished shards are kept
    assert os.path.getmtime(pairs / "shard_00000.safetensors") == before
    with pytest.raises(SystemExit) as e:
        train_flux.main(train_flux.parse_args([*common, "--make_pairs", "10", "--teacher_steps", "4"]))
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err
    kd = ["--tiny", "--pairs", str(pairs), "--out_dir", str(tmp_path / "run")]  # the prompts come with the pairs
    run(*kd, "--method", "kd", "--student_steps", "2", "--max_steps", "3", "--eval_every", "0", "--save_every", "3")  # fmt: skip
    assert metrics(tmp_path / "run")[-1]["step"] == 3


def test_fdistill_runs_both_step_kinds(tmp_path):
    run("--tiny", "--method", "fdistill", "--student_update_freq", "2", "--max_steps", "2", "--teacher_steps", "8", "--eval_every", "0", "--save_every", "2", "--out_dir", str(tmp_path))  # fmt: skip
    records = metrics(tmp_path)
    assert "gan_loss_disc" in records[0] and {"h_mean", "vsd_loss", "gan_loss_gen"} <= records[1].keys()


def write_latents(folder, channels):
    """Precomputed latent shards: 256 latents (channels, 8, 8), two modes (mean +- direction) for each of four
    prompts, plus a little noise."""
    g = torch.Generator().manual_seed(0)
    prompts = train_flux.TINY_PROMPTS[:4]
    means, dirs = (torch.randn(4, channels, 8, 8, generator=g) * 0.5 for _ in range(2))
    which = torch.arange(256) % 4
    sign = (torch.rand(256, generator=g) < 0.5).float().reshape(-1, 1, 1, 1) * 2 - 1
    latents = means[which] + sign * dirs[which] + 0.05 * torch.randn(256, channels, 8, 8, generator=g)
    os.makedirs(folder)
    save_file({"latents": latents}, folder / "shard_00000.safetensors", metadata={"prompts": json.dumps([prompts[i] for i in which])})  # fmt: skip


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory):
    """A tiny Flux teacher trained with --method sft on two-mode latents per prompt (four prompts): the student starts
    as this teacher, whose one-step outputs are blurry averages of the modes its 28-step samples reach. Returns
    (teacher .safetensors, the sft run's losses)."""
    folder = tmp_path_factory.mktemp("flux_teacher")
    write_latents(folder / "latents", channels=16)
    main("--tiny", "--method", "sft", "--data", str(folder / "latents"), "--lr", "2e-3", "--max_steps", "300", "--eval_every", "0", "--save_every", "300", "--ema", "", "--out_dir", str(folder / "sft"))  # fmt: skip
    losses = [r["loss"] for r in metrics(folder / "sft")]
    return str(folder / "sft" / "ckpt_0000300" / "student.safetensors"), losses


def test_sft_lowers_its_loss(flux_teacher):
    losses = flux_teacher[1]
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    print("sft loss, first and last 30 steps:", first, last)
    assert last < 0.8 * first, (first, last)  # measured: 1.55 -> 1.21


def test_dmd2_moves_the_one_step_student_toward_the_teachers_samples(flux_teacher, tmp_path):
    """Distance of 1-step student samples to the teacher's 28-step samples on 32 fixed noise/prompt pairs."""
    run("--tiny", "--method", "dmd2", "--teacher", flux_teacher[0], "--gan_weight", "0", "--lr", "1e-3", "--critic_lr", "1e-3", "--max_steps", "30", "--eval_every", "30", "--eval_n", "32", "--save_every", "0", "--ema", "", "--out_dir", str(tmp_path))  # fmt: skip
    distances = evals(tmp_path)
    print("distance to the teacher's samples:", distances)
    assert distances[-1] < 0.6 * distances[0], distances  # measured: 0.055 -> 0.019


def test_ladd_moves_the_one_step_student_toward_the_teachers_samples(flux_teacher, tmp_path):
    """LADD's real branch is the teacher's own samples here (its pairs), as in the LADD paper."""
    run("--tiny", "--method", "ladd", "--teacher", flux_teacher[0], "--student_update_freq", "2", "--lr", "1e-4", "--critic_lr", "1e-3", "--max_steps", "50", "--eval_every", "50", "--eval_n", "32", "--save_every", "0", "--ema", "", "--out_dir", str(tmp_path))  # fmt: skip
    distances = evals(tmp_path)
    print("distance to the teacher's samples:", distances)
    assert distances[-1] < 0.85 * distances[0], distances  # measured: 0.055 -> 0.042


def test_sd15_dmd2_runs_with_guidance_and_improves(tmp_path):
    """SD1.5: a tiny teacher trained with --method sft on two-mode latents, then DMD2 with classifier-free guidance
    1.75 (FastGen's SD1.5 value); its one-step x0 from the eps network at t = 999 divides by alpha = 0.068, so the
    student moves more slowly than Flux's."""
    write_latents(tmp_path / "latents", channels=4)
    main("--tiny", "--model", "sd15", "--method", "sft", "--data", str(tmp_path / "latents"), "--lr", "3e-3", "--max_steps", "150", "--eval_every", "0", "--save_every", "150", "--ema", "", "--out_dir", str(tmp_path / "sft"))  # fmt: skip
    teacher = str(tmp_path / "sft" / "ckpt_0000150" / "student.safetensors")
    run("--tiny", "--model", "sd15", "--method", "dmd2", "--teacher", teacher, "--guidance", "1.75", "--gan_weight", "0", "--lr", "1e-4", "--critic_lr", "1e-3", "--max_steps", "40", "--eval_every", "40", "--eval_n", "32", "--save_every", "0", "--ema", "", "--out_dir", str(tmp_path / "dmd2"))  # fmt: skip
    distances = evals(tmp_path / "dmd2")
    print("distance to the teacher's samples:", distances)
    assert distances[-1] < 0.95 * distances[0], distances  # measured: 6.29 -> 5.72


def test_resume_is_exact(tmp_path):
    common = ["--tiny", "--method", "dmd2", "--student_update_freq", "2", "--teacher_steps", "8", "--eval_every", "0", "--save_every", "2"]  # fmt: skip
    main(*common, "--max_steps", "4", "--out_dir", str(tmp_path / "full"))
    main(*common, "--max_steps", "2", "--out_dir", str(tmp_path / "half"))
    main(*common, "--max_steps", "4", "--out_dir", str(tmp_path / "half"), "--resume")
    for name in ("student", "fake_score", "discriminator", "ema_0.9999"):
        a = load_file(tmp_path / "full" / "ckpt_0000004" / f"{name}.safetensors")
        b = load_file(tmp_path / "half" / "ckpt_0000004" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_fsdp_on_two_processes_matches_one_process(tmp_path):
    """FSDP2 (meta init, per-block shards, broadcast weights) on 2 gloo processes vs 1 process on the same global
    batch split the same way (2 micro-batches of 4): the same losses and weights."""
    common = ["--tiny", "--method", "dmd2", "--student_update_freq", "2", "--teacher_steps", "8", "--eval_every", "0", "--save_every", "2", "--max_steps", "2"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
    out = subprocess.run([*torchrun, os.path.join(ROOT, "train_flux.py"), *common, "--fsdp", "--out_dir", str(tmp_path / "two")], cwd=ROOT, env=ENV, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    main(*common, "--micro_batch", "4", "--out_dir", str(tmp_path / "one"))
    for a, b in zip(metrics(tmp_path / "two"), metrics(tmp_path / "one")):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
    for name in ("student", "fake_score", "discriminator"):
        a = load_file(tmp_path / "two" / "ckpt_0000002" / f"{name}.safetensors")
        b = load_file(tmp_path / "one" / "ckpt_0000002" / f"{name}.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    """Each ends with exit code 2 and one `error: ` line on stderr naming the problem (tests/test_bad_input_flux.py
    has the rest)."""
    os.makedirs(tmp_path / "latents")
    save_file({"latents": torch.zeros(2, 4, 8, 8)}, tmp_path / "latents" / "a.safetensors", metadata={"prompts": '["x", "y"]'})  # fmt: skip
    out = ["--out_dir", str(tmp_path / "r")]
    cases = [
        (["--tiny", "--method", "sft", "--data", str(tmp_path / "latents"), *out], r"needs \(16, 8, 8\)"),
        (["--tiny", "--method", "kd", "--pairs", str(tmp_path / "nowhere"), *out], "--make_pairs"),
        (["--tiny", "--method", "fdistill", "--gan_weight", "0", *out], "gan_weight"),
        (["--method", "kd", "--make_pairs", "4", "--pairs", str(tmp_path / "p"), *out], "needs prompts"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train_flux.main(train_flux.parse_args(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(message, err) and err.startswith("error: "), err
    assert not (tmp_path / "r").exists()  # bad input leaves no run directory behind


def test_help_lists_the_presets():
    out = run("--help")
    assert all(name in out.stdout for name in train_flux.PRESETS)
