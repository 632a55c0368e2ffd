"""train_video.py: the schedule comes from each model file, each loss against its equation written out here, the
teacher sampler against the model files' own samplers, --tiny runs of every method on Wan, CogVideoX and Cosmos, a
short DMD2 run that moves the student toward the teacher, exact resume, and FSDP2 / DDP on 2 processes = 1 process."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import train_video as tv
from models import cogvideox, cosmos_predict2, wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def schedule(module, cfg, *flags):
    args = tv.parse_args(["--tiny", *flags])
    return tv.make_schedule(module, cfg, args), args


def test_schedule_is_the_model_files():
    cfg = cogvideox.CONFIGS["tiny-2b"]
    sched, _ = schedule(cogvideox, cfg, "--model", "cogvideox")
    t = torch.tensor([10.0, 500.0, 990.0], dtype=torch.float64)
    assert torch.equal(sched.alpha(t), cogvideox.alpha(t, cfg.snr_shift_scale))
    x, out = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    assert torch.equal(sched.to_x0(x, out, t), cogvideox.to_x0(x, out, t, "v", cfg.snr_shift_scale))
    assert torch.equal(sched.student_times, cogvideox.t_list(4))
    sched, _ = schedule(wan, wan.CONFIGS["tiny"], "--shift", "3")
    assert torch.allclose(sched.student_times, wan.t_list(4, shift=3.0))
    sched, _ = schedule(wan, wan.CONFIGS["tiny"], "--t_list", tv.WAN_T_LIST)
    assert sched.student_times.tolist() == [0.999, 0.937, 0.833, 0.624, 0.0]


class Affine(torch.nn.Module):
    """A stand-in denoiser: out = a x + b t-scaled, with the keyword interface of the video networks."""

    def __init__(self, a=0.7):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, x, t, text, **kw):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        return self.a * x + 1e-3 * t + text.mean() * 0


@pytest.mark.parametrize("model", ["wan", "cogvideox"])
def test_sft_loss_is_dsm_in_the_native_prediction(model):
    module, cfg = (wan, wan.CONFIGS["tiny"]) if model == "wan" else (cogvideox, cogvideox.CONFIGS["tiny-2b"])
    sched, args = schedule(module, cfg, "--model", model)
    x0, text, net = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 5, 8), Affine()
    torch.manual_seed(3)
    loss, _ = tv.sft_loss(net, sched, x0, text, text[:1], {}, args)
    torch.manual_seed(3)
    t = module.sample_t(3) if model == "wan" else module.sample_t(3)
    eps = torch.randn_like(x0)
    a, s = (1 - t, t) if model == "wan" else (cogvideox.alpha(t, cfg.snr_shift_scale), cogvideox.sigma(t, cfg.snr_shift_scale))  # fmt: skip
    a, s = a.reshape(-1, 1, 1, 1, 1), s.reshape(-1, 1, 1, 1, 1)
    x_t = (a * x0.double() + s * eps.double()).float()
    target = eps - x0 if model == "wan" else a * eps.double() - s * x0.double()  # flow, or v
    expected = (net(x_t, t, text).double() - target.double()).square().mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-4)


def test_kd_loss_regresses_from_the_students_own_times():
    sched, args = schedule(wan, wan.CONFIGS["tiny"], "--method", "kd", "--student_steps", "2")
    sched.path_times = wan.t_list(4)
    pairs, text, net = torch.randn(4, 5, 4, 2, 4, 4), torch.randn(4, 5, 8), Affine()
    torch.manual_seed(1)
    loss, _ = tv.kd_loss(net, sched, pairs, text, {}, args)
    torch.manual_seed(1)
    pick = torch.randint(2, (4,)) * 2
    x_in, t = pairs[torch.arange(4), pick], wan.t_list(4)[pick]
    x0_hat = wan.to_x0(x_in, net(x_in, t, text), t)
    assert torch.allclose(loss, 0.5 * (x0_hat - pairs[:, -1]).square().mean(), rtol=1e-5)


def test_vsd_loss_value_and_gradient():
    g = torch.randn(2, 4, 2, 4, 4, requires_grad=True)
    x_t, x_f = torch.randn_like(g), torch.randn_like(g)
    loss = tv.vsd_loss(g, x_t, x_f)
    loss.backward()
    w = 1 / ((g - x_t).abs().mean(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
    assert torch.allclose(g.grad, w.detach() * (x_f - x_t) / g.numel(), rtol=1e-4, atol=1e-9)
    assert torch.allclose(loss, 0.5 * (w.detach() * (x_f - x_t)).square().mean(), rtol=1e-5)


def tiny_wan(seed):
    torch.manual_seed(seed)
    return wan.WanModel(wan.CONFIGS["tiny"])


def test_dmd2_generator_loss_is_vsd_with_guidance_plus_gan():
    sched, args = schedule(wan, wan.CONFIGS["tiny"], "--guidance", "3", "--gan_weight", "0.5")
    student, teacher, fake = tiny_wan(1), tiny_wan(2).requires_grad_(False), tiny_wan(3)
    disc = tv.Discriminator([1], [6])
    x0, text, neg = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 7, 32), torch.randn(1, 7, 32)
    torch.manual_seed(5)
    loss, logs = tv.dmd2_generator_loss(student, student, teacher, fake, disc, sched, x0, text, neg, {}, args)
    torch.manual_seed(5)
    noise = torch.randn_like(x0)
    times = wan.t_list(4)
    t_s = times[torch.randint(4, (2,))]
    g = wan.to_x0(wan.add_noise(x0, noise, t_s), student(wan.add_noise(x0, noise, t_s), t_s, text), t_s)
    t = wan.sample_t(2)
    x_t = wan.add_noise(g, torch.randn_like(g), t)
    flow, features = teacher(x_t, t, text, feature_indices=[1])
    x_c, x_u = wan.to_x0(x_t, flow, t), wan.to_x0(x_t, teacher(x_t, t, neg.expand_as(text)), t)
    x_teacher = x_c + 2 * (x_c - x_u)
    x_fake = wan.to_x0(x_t, fake(x_t, t, text), t)
    w = 1 / ((g - x_teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
    vsd = 0.5 * (w * (x_fake - x_teacher)).square().mean()
    gan = F.softplus(-disc(features)).mean()
    assert torch.allclose(torch.tensor(logs["vsd_loss"]), vsd.detach(), rtol=1e-4)
    assert torch.allclose(loss, vsd.detach() + 0.5 * gan, rtol=1e-4)


@pytest.mark.parametrize("same", [True, False])
def test_dmd2_critic_loss_is_x0_dsm_plus_gan(same):
    flags = ["--student_steps", "1", "--gan_weight", "0.1"] + (["--gan_same_t_noise"] if same else [])
    sched, args = schedule(wan, wan.CONFIGS["tiny"], *flags)
    student, teacher, fake = tiny_wan(1), tiny_wan(2), tiny_wan(3)
    disc = tv.Discriminator([0], [6])
    x0, text = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 7, 32)
    torch.manual_seed(9)
    loss, _ = tv.dmd2_critic_loss(student, teacher, fake, disc, disc, sched, x0, text, {}, args)
    torch.manual_seed(9)
    noise = torch.randn_like(x0)
    torch.randint(1, (2,))
    t0 = torch.full((2,), wan.T_MAX, dtype=torch.float64)
    x_in = (wan.T_MAX * noise.double()).float()
    g = wan.to_x0(x_in, student(x_in, t0, text), t0)
    t = wan.sample_t(2)
    eps = torch.randn_like(g)
    x_t = wan.add_noise(g, eps, t)
    dsm = (wan.to_x0(x_t, fake(x_t, t, text), t) - g).square().mean()
    t_r, eps_r = (t, eps) if same else (wan.sample_t(2), torch.randn_like(g))
    x_r = wan.add_noise(x0, eps_r, t_r)
    f_fake = teacher(x_t, t, text, feature_indices=[0], features_only=True)
    f_real = teacher(x_r, t_r, text, feature_indices=[0], features_only=True)
    gan = F.softplus(disc(f_fake)).mean() + F.softplus(-disc(f_real)).mean()
    assert torch.allclose(loss, dsm + gan, rtol=1e-4)


def test_teacher_ode_is_the_model_files_sampler():
    """DDIM steps on x0 are Euler on the flow for rectified flow (Cosmos' sample_euler) and CogVideoX's DDIM."""
    torch.manual_seed(0)
    model = cosmos_predict2.CosmosPredict2(cosmos_predict2.CONFIGS["tiny"]).eval()
    sched, _ = schedule(cosmos_predict2, model.cfg, "--model", "cosmos")
    noise, text, neg = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 6, 40), torch.randn(1, 6, 40)
    times = cosmos_predict2.t_list(6)
    _, ours = tv.teacher_ode(model, sched, noise, text, neg, {}, 2.0, times)
    ref = cosmos_predict2.sample_euler(model, noise, text, neg.expand_as(text), times=times, guidance=2.0)
    assert torch.allclose(ours, ref, atol=1e-4)
    model = cogvideox.CogVideoXTransformer(cogvideox.CONFIGS["tiny-2b"]).eval()
    sched, _ = schedule(cogvideox, model.cfg, "--model", "cogvideox")
    text, neg = torch.randn(2, 6, 32), torch.randn(1, 6, 32)
    _, ours = tv.teacher_ode(
        model, sched, noise, text, neg, {}, 2.0, torch.tensor([999.0, 749, 499, 249, 0], dtype=torch.float64)
    )  # ddim_timesteps(4), then 0
    ref = cogvideox.sample_ddim(model, noise, text, neg.expand_as(text), steps=4, guidance=2.0)
    assert torch.allclose(ours, ref, atol=1e-4)


# ----------------------------------------------------------------------------
# The script end to end


def run_script(*flags, nproc=None, check=True):
    cmd = [sys.executable, "train_video.py"] if nproc is None else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train_video.py"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 clips of tiny latents (4, 3, 8, 8) in two shards with their prompts in the metadata, and a text cache shared
    by the runs."""
    root = tmp_path_factory.mktemp("video")
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(4, 3, 8, 8, generator=g)
    clips = torch.stack(
        [(1 if i % 2 else -1) * pattern + 0.1 * torch.randn(4, 3, 8, 8, generator=g) for i in range(16)]
    )
    os.makedirs(root / "data")
    for k in range(2):
        prompts = json.dumps([f"clip {i % 2}" for i in range(8 * k, 8 * k + 8)])
        save_file({"latents": clips[8 * k : 8 * k + 8]}, str(root / "data" / f"shard_{k:05d}.safetensors"), metadata={"prompts": prompts})  # fmt: skip
    return root


def common(data, *flags):
    return ["--tiny", "--data", str(data / "data"), "--num_threads", "1", "--text_cache", str(data / "cache"), *flags]


@pytest.mark.parametrize(
    "model, method",
    [
        ("wan", "sft"),
        ("wan", "kd"),
        ("cogvideox", "sft"),
        ("cogvideox", "kd"),
        ("cogvideox", "dmd2"),
        ("cosmos", "dmd2"),
    ],
)
def test_tiny_runs(data, tmp_path, model, method):
    flags = ["--model", model, "--method", method, "--max_steps", "3", "--eval_every", "3", "--save_every", "3"]
    if method == "kd":
        flags += ["--num_pairs", "4", "--student_steps", "2"]
    if method == "dmd2":
        flags += ["--gan_weight", "0.03", "--student_update_freq", "2"]
    if model == "cosmos":
        flags += ["--cond_frames", "1"]  # Video2World
    run_script(*common(data, *flags, "--out_dir", str(tmp_path)))
    assert os.path.exists(tmp_path / "samples" / "step_0000003.png")
    names = set(os.listdir(tmp_path / "ckpt_0000003"))
    assert {"student.safetensors", "state.pt", "args.json"} <= names
    assert ("fake_score.safetensors" in names) == (method == "dmd2")


def test_kd_pairs_resume_and_match_the_teacher_ode(data, tmp_path):
    flags = common(data, "--method", "kd", "--num_pairs", "4", "--pairs_batch", "2", "--student_steps", "4", "--max_steps", "1", "--eval_every", "0", "--save_every", "0")  # fmt: skip
    run_script(*flags, "--out_dir", str(tmp_path))
    shard = tmp_path / "pairs" / "pairs_00001.safetensors"
    first = load_file(str(shard))
    os.remove(shard)
    run_script(*flags, "--out_dir", str(tmp_path), "--overwrite")  # regenerates only the missing shard, the same one
    again = load_file(str(shard))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["path"].shape == (2, 4, 4, 3, 8, 8)


def test_dmd2_moves_the_student_toward_the_teacher(data, tmp_path):
    """A student of another random init: 100 DMD2 steps (20 generator steps) bring the per-channel mean and std of its
    1-step samples toward those of the teacher's 16-step ODE samples on the same noise (measured: 0.227 -> 0.139)."""
    for seed, name in ((0, "teacher"), (1, "student")):
        save_file(tiny_wan(seed).state_dict(), str(tmp_path / f"{name}.safetensors"))
    run_script("--model", "wan", "--tiny", "--method", "dmd2", "--teacher", str(tmp_path / "teacher.safetensors"), "--arch", "tiny",
               "--student", str(tmp_path / "student.safetensors"), "--student_steps", "1", "--lr", "1e-3", "--critic_lr", "1e-3",
               "--max_steps", "100", "--save_every", "100", "--eval_every", "0", "--num_threads", "1",
               "--text_cache", str(data / "cache"), "--out_dir", str(tmp_path / "run"))  # fmt: skip
    sched, _ = schedule(wan, wan.CONFIGS["tiny"], "--student_steps", "1")
    from encoders import TextEncoder, cached_embeddings

    text = cached_embeddings(TextEncoder("wan", tiny={"umt5": 32}), tv.TINY_PROMPTS, str(data / "cache"))["text"]
    noise = torch.randn(64, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    text = text[torch.arange(64) % len(text)]

    def load(path):
        model = wan.WanModel(wan.CONFIGS["tiny"])
        model.load_state_dict(load_file(str(path)))
        return model.eval()

    def stats(x):
        return torch.cat([x.mean((0, 2, 3, 4)), x.std((0, 2, 3, 4))])

    with torch.no_grad():
        _, x_teacher = tv.teacher_ode(load(tmp_path / "teacher.safetensors"), sched, noise, text, text[:1], {}, 1.0, wan.t_list(16))  # fmt: skip
        dist = []
        for path in (tmp_path / "student.safetensors", tmp_path / "run" / "ckpt_0000100" / "student.safetensors"):
            x = tv.student_sample(load(path), sched, noise, text, {}, sched.student_times, "sde")
            dist.append((stats(x) - stats(x_teacher)).square().sum().item())
    assert dist[1] < 0.8 * dist[0], dist


def test_resume_is_exact(data, tmp_path):
    flags = common(data, "--model", "wan", "--method", "dmd2", "--gan_weight", "0.03", "--student_update_freq", "2", "--lr", "1e-3", "--ema", "0.9", "--eval_every", "0")  # fmt: skip
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script(*flags, "--max_steps", "4", "--save_every", "4", "--out_dir", straight)
    run_script(*flags, "--max_steps", "2", "--save_every", "2", "--out_dir", split)
    run_script(*flags, "--max_steps", "4", "--save_every", "2", "--out_dir", split, "--resume")
    for name in ("student", "fake_score", "discriminator", "ema_0.9"):
        a = load_file(os.path.join(straight, "ckpt_0000004", f"{name}.safetensors"))
        b = load_file(os.path.join(split, "ckpt_0000004", f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("fsdp", [True, False])
def test_two_processes_match_one(data, tmp_path, fsdp):
    """FSDP2 (and DDP) over 2 gloo processes: the same global batch gives the same loss and, after a critic step and
    a generator step, the same weights as one process accumulating both micro-batches."""
    flags = common(data, "--model", "wan", "--method", "dmd2", "--gan_weight", "0.03", "--student_update_freq", "2", "--lr", "1e-3", "--batch_size", "2", "--micro_batch", "1", "--max_steps", "2", "--save_every", "2", "--eval_every", "0")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(*flags, "--out_dir", str(one))
    run_script(*flags, "--out_dir", str(two), *(["--fsdp", "--grad_checkpointing"] if fsdp else []), nproc=2)
    read = lambda d: [eval(line.replace("true", "True").replace("false", "False")) for line in open(d / "metrics.jsonl")]  # fmt: skip
    for a, b in zip(read(one), read(two)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) + 1e-8, (a, b)
    for name in ("student", "fake_score", "discriminator"):
        a = load_file(str(one / "ckpt_0000002" / f"{name}.safetensors"))
        b = load_file(str(two / "ckpt_0000002" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (name, k)


def test_bad_input_gives_a_clear_error(data, tmp_path, capsys):
    result = run_script("--tiny", "--method", "sft", "--out_dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "--method sft trains on real latents" in result.stderr
    result = run_script("--tiny", "--gan_weight", "0.1", "--out_dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "GAN heads compare with real latents" in result.stderr
    os.makedirs(tmp_path / "empty")
    result = run_script("--tiny", "--data", str(tmp_path / "empty"), "--out_dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "holds no .safetensors shards" in result.stderr
    os.makedirs(tmp_path / "old")  # the former one-file-per-clip form
    save_file(
        {"latents": torch.zeros(4, 3, 8, 8)}, str(tmp_path / "old" / "clip.safetensors"), metadata={"prompt": "a"}
    )
    with pytest.raises(SystemExit):
        tv.LatentDataset(str(tmp_path / "old"), print, print)
    assert re.search(r"clip.safetensors is not a shard .* `latents` \(N, C, T, H, W\).* download.py video-latents", capsys.readouterr().err)  # fmt: skip
    result = run_script(
        *common(data, "--latent_shape", "8,3,8,8", "--max_steps", "1", "--out_dir", str(tmp_path)), check=False
    )
    assert result.returncode != 0 and "latents of 8 channels" in result.stderr


def test_help_lists_the_presets():
    result = subprocess.run([sys.executable, "train_video.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0
    for name in tv.PRESETS:
        assert name in result.stdout


def test_shards_are_read_per_clip_with_their_keywords(data, tmp_path):
    """A clip is one row of its shard; other tensors of N rows come along as the network's keywords (VACE's `control`
    here), and a tiny VACE run trains on them."""
    g = torch.Generator().manual_seed(1)
    latents, control = torch.randn(3, 4, 3, 8, 8, generator=g), torch.randn(3, 12, 3, 8, 8, generator=g)
    os.makedirs(tmp_path / "vace")
    save_file({"latents": latents, "control": control}, str(tmp_path / "vace" / "shard_00000.safetensors"), metadata={"prompts": json.dumps(["a", "b", "c"])})  # fmt: skip
    seen = []
    dataset = tv.LatentDataset(str(tmp_path / "vace"), seen.extend, lambda p: torch.full((len(p), 2, 8), float(ord(p[0]))))  # fmt: skip
    assert len(dataset) == 3 and seen == ["a", "b", "c"]
    clip = dataset.load(2)
    assert torch.equal(clip["latents"], latents[2]) and torch.equal(clip["control"], control[2])
    assert clip["text"].shape == (2, 8) and clip["text"][0, 0] == ord("c")
    run_script(*common(data, "--data", str(tmp_path / "vace"), "--arch", "tiny-vace", "--method", "sft", "--max_steps", "2", "--eval_every", "0", "--save_every", "0", "--out_dir", str(tmp_path / "run")))  # fmt: skip
    save_file({"latents": latents, "control": control[:2]}, str(tmp_path / "vace" / "shard_00001.safetensors"), metadata={"prompts": json.dumps(["a", "b", "c"])})  # fmt: skip
    result = run_script(*common(data, "--data", str(tmp_path / "vace"), "--method", "sft", "--out_dir", str(tmp_path / "run")), check=False)  # fmt: skip
    assert result.returncode != 0 and "all need N = 3 rows" in result.stderr
