"""train_wan_causal.py: each loss against its equation written out here, the Self-Forcing rollout's gradient path,
resumable teacher pairs, exact resume, a short distillation that moves a perturbed student toward the teacher, and
the 2-process FSDP2 run against one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import encoders
import train_wan_causal as twc
from models import wan

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CFG = wan.CONFIGS["tiny"]
T_LIST = list(wan.SELF_FORCING_T_LIST)


def args_for(method, *flags):
    return twc.parse_args(["--method", method, "--tiny", *flags])


def tiny_wan(seed):
    torch.manual_seed(seed)
    return wan.WanModel(CFG).eval()


def inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 7, 4, 4, generator=g), torch.randn(B, 9, 32, generator=g)


def test_tiny_clip_has_three_chunks():
    args = args_for("sft")
    assert wan.chunk_frames(args.frames, args.chunk_size) == [3, 2, 2]


def test_sft_loss_is_diffusion_forcing():
    """One t per chunk from the t sampler, x_t = (1 - t) x0 + t eps per frame, block-causal flow regression."""
    args = args_for("sft", "--t_sampler", "uniform")
    net = tiny_wan(0)
    x0, text = inputs()
    torch.manual_seed(3)
    loss, _ = twc.sft_loss(net, x0, text, args)

    torch.manual_seed(3)
    t = wan.sample_t_chunks(2, 7, 2, kind="uniform", t_min=0.001, t_max=0.999)
    eps = torch.randn_like(x0)
    assert torch.equal(t[:, 0], t[:, 2]) and torch.equal(t[:, 3], t[:, 4]) and not torch.equal(t[:, 2], t[:, 3])
    tb = t[:, None, :, None, None]
    x_t = ((1 - tb) * x0.double() + tb * eps.double()).float()
    flow = net(x_t, t, text, chunk_size=2)  # block-causal over chunks [3, 2, 2] (its equality to the KV-cached
    expected = (flow.double() - (eps - x0).double()).square().mean()  # chunk path is tests/test_wan.py's)
    assert torch.allclose(loss.double(), expected, rtol=1e-4)


def test_kd_loss_regresses_the_teacher_output_from_per_chunk_states():
    args = args_for("kd")
    net = tiny_wan(0)
    g = torch.Generator().manual_seed(1)
    path, x0_teacher = torch.randn(2, 4, 4, 7, 4, 4, generator=g), torch.randn(2, 4, 7, 4, 4, generator=g)
    _, text = inputs()
    torch.manual_seed(5)
    loss, _ = twc.kd_loss(net, path, x0_teacher, text, args)

    torch.manual_seed(5)
    ids = wan.sample_t_chunks(2, 7, 2, grid=torch.arange(5.0)).long()
    states = torch.cat([path, x0_teacher[:, None]], dim=1)
    x_in = torch.stack([torch.stack([states[b, ids[b, f], :, f] for f in range(7)], dim=1) for b in range(2)])
    t = torch.tensor(T_LIST, dtype=torch.float64)[ids]
    flow = net(x_in, t, text, chunk_size=2).double()
    x0 = x_in.double() - t[:, None, :, None, None] * flow
    expected = 0.5 * (x0 - x0_teacher.double()).square().mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-4)
    clean = ids == 4  # chunks at the final t = 0 are the teacher's output itself
    assert torch.allclose(x_in.permute(0, 2, 1, 3, 4)[clean], x0_teacher.permute(0, 2, 1, 3, 4)[clean])


def test_vsd_gradient_is_the_normalised_dmd_direction():
    g = torch.randn(2, 4, 3, 4, 4, requires_grad=True)
    x_teacher, x_fake = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    twc.vsd_loss(g, x_teacher, x_fake).backward()
    w = 1 / ((g.detach() - x_teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
    assert torch.allclose(g.grad, w * (x_fake - x_teacher) / g.numel(), rtol=1e-5, atol=1e-9)


def test_dmd_generator_loss_uses_the_cfg_teacher_and_the_fake_score():
    """x_t = (1 - t) g + t eps at one t per clip; teacher x0 with CFG x0_c + (w - 1)(x0_c - x0_u); VSD on g."""
    args = args_for("self_forcing", "--guidance", "4")
    teacher, fake = tiny_wan(0), tiny_wan(1)
    g, text = inputs(seed=2)
    neg = torch.randn(1, 9, 32).expand_as(text)
    torch.manual_seed(9)
    loss, _ = twc.dmd_generator_loss(g, teacher, fake, text, neg, args)

    torch.manual_seed(9)
    t = wan.sample_t(2, "shifted", 5.0, t_min=0.001, t_max=0.999)
    eps = torch.randn_like(g)
    tb = t.reshape(-1, 1, 1, 1, 1)
    x_t = ((1 - tb) * g.double() + tb * eps.double()).float()
    with torch.no_grad():
        x0 = lambda m, c: x_t.double() - tb * m(x_t, t, c).double()
        x_c, x_u, x_f = x0(teacher, text), x0(teacher, neg), x0(fake, text)
    x_teacher = x_c + 3 * (x_c - x_u)
    w = 1 / ((g.double() - x_teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
    expected = 0.5 * (w * (x_f - x_teacher)).square().mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-3)


def test_fake_score_loss_is_x0_denoising_on_student_clips():
    args = args_for("causvid")
    fake = tiny_wan(1)
    g, text = inputs(seed=4)
    torch.manual_seed(2)
    loss, _ = twc.critic_loss(fake, g, text, args)
    torch.manual_seed(2)
    t = wan.sample_t(2, "shifted", 5.0, t_min=0.001, t_max=0.999)
    tb = t.reshape(-1, 1, 1, 1, 1)
    x_t = ((1 - tb) * g.double() + tb * torch.randn_like(g).double()).float()
    expected = (x_t.double() - tb * fake(x_t, t, text).double() - g.double()).square().mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-4)


class Spy(wan.WanModel):
    """A tiny Wan that records every forward_chunk call: its start frame, time, commit flag, whether its output is
    part of the autograd graph, and (through a tensor hook) whether the loss's gradient reached it."""

    def __init__(self):
        super().__init__(CFG)
        self.calls = []

    def forward_chunk(self, x, t, text, cache, commit=False, start_frame=None, **kw):
        out = super().forward_chunk(x, t, text, cache, commit=commit, start_frame=start_frame, **kw)
        call = dict(start=start_frame, t=float(t[0]), commit=commit, graph=out.requires_grad, grad=None)
        if out.requires_grad:
            out.register_hook(lambda grad, call=call: call.update(grad=grad.abs().sum().item()))
        self.calls.append(call)
        return out


@pytest.mark.parametrize("exits", [[2, 2, 2], [0, 3, 1]])
def test_self_forcing_gradient_comes_only_from_each_chunks_exit_step(exits):
    torch.manual_seed(0)
    net = Spy()
    noise, text = inputs(B=1)
    out = twc.rollout(net, noise, text, T_LIST, 2, exits, context_noise=0.1)
    out.square().mean().backward()
    starts = [0, 3, 5]
    for c, start in enumerate(starts):
        calls = [k for k in net.calls if k["start"] == start]
        denoise = [k for k in calls if not k["commit"]]
        assert [k["t"] for k in denoise] == T_LIST[: exits[c] + 1]  # the steps up to and including the exit
        assert [k["graph"] for k in denoise] == [False] * exits[c] + [True]  # only the exit call has a graph
        assert denoise[-1]["grad"] > 0  # and the loss's gradient reaches it
        commit = [k for k in calls if k["commit"]]
        assert len(commit) == 1 and not commit[0]["graph"] and commit[0]["t"] == pytest.approx(0.1)  # detached
    assert sum(k["graph"] for k in net.calls) == len(starts)
    assert all(p.grad is not None for p in net.blocks.parameters())

    # No gradient crosses chunks: the loss on the last chunk alone reaches only the last chunk's exit call.
    net.calls.clear()
    net.zero_grad()
    out = twc.rollout(net, noise, text, T_LIST, 2, exits)
    out[:, :, 5:].square().mean().backward()
    reached = [k["start"] for k in net.calls if k["grad"]]
    assert reached == [5]


def test_self_forcing_rollout_without_truncation_is_the_causal_sampler():
    net = tiny_wan(0)
    noise, text = inputs(B=2, seed=6)
    with torch.no_grad():
        ours = twc.rollout(net, noise, text, T_LIST, 2, [3, 3, 3], context_noise=0.2, grad=False, generator=torch.Generator().manual_seed(4))  # fmt: skip
        ref = wan.causal_sample(net, noise, text, T_LIST, chunk_size=2, context_noise=0.2, generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert torch.equal(ours, ref)  # the commit pass at the same float64 time, re-noised by the same draws
    with torch.no_grad():
        ours = twc.rollout(net, noise, text, T_LIST, 2, [3, 3, 3], grad=False, generator=torch.Generator().manual_seed(4))  # fmt: skip
        ref = wan.causal_sample(net, noise, text, T_LIST, chunk_size=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours, ref)  # context noise 0: the same draws, the same calls


def test_exit_steps_are_shared_by_ranks_and_uniform():
    args = args_for("self_forcing")
    draws = [twc.exit_steps(3, args, step) for step in range(400)]
    assert all(len(set(d)) == 1 for d in draws)  # one exit for all chunks by default
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=4)
    assert counts.min() > 60  # each of the 4 steps
    assert twc.exit_steps(3, args, 7) == twc.exit_steps(3, args, 7)
    args = args_for("self_forcing", "--last_step_only")
    assert twc.exit_steps(3, args, 0) == [3, 3, 3]


# ----------------------------------------------------------------------------
# The script end to end


def run_script(*flags, nproc=None, check=True):
    cmd = [sys.executable, "train_wan_causal.py"] if nproc is None else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train_wan_causal.py"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*cmd, *flags, "--num_threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(out, step, name="student"):
    return load_file(os.path.join(out, f"ckpt_{step:07d}", f"{name}.safetensors"))


@pytest.mark.parametrize("method", ["sft", "causvid"])
def test_method_runs_and_writes_checkpoints_and_samples(tmp_path, method):
    """sft on a --data directory of latent videos (the documented format), causvid on the tiny run's toy clips."""
    out = str(tmp_path / method)
    data = []
    if method == "sft":
        os.makedirs(tmp_path / "data")
        save_file({"latents": torch.randn(3, 4, 7, 4, 4)}, str(tmp_path / "data" / "part0.safetensors"), metadata={"prompts": json.dumps(["a", "b", "c"])})  # fmt: skip
        data = ["--data", str(tmp_path / "data")]
    run_script("--method", method, "--tiny", *data, "--max_steps", "3", "--save_every", "3", "--sample_every", "3", "--student_update_freq", "2", "--out_dir", out)  # fmt: skip
    assert len(losses(out)) == 3 and all(map(lambda v: v == v, losses(out)))
    assert os.path.exists(os.path.join(out, "samples", "step_0000003.png"))
    names = {"student.safetensors", "state.pt", "args.json"} | ({"fake_score.safetensors"} if method == "causvid" else set())  # fmt: skip
    assert names <= set(os.listdir(os.path.join(out, "ckpt_0000003")))


def test_sft_lowers_its_loss(tmp_path):
    """Diffusion forcing on the tiny run's toy clips: the loss falls within a few dozen steps."""
    out = str(tmp_path / "sft")
    run_script("--method", "sft", "--tiny", "--max_steps", "60", "--lr", "3e-3", "--micro_batch", "4", "--t_sampler", "uniform", "--sample_every", "0", "--save_every", "0", "--out_dir", out)  # fmt: skip
    loss = losses(out)
    assert sum(loss[-15:]) < 0.7 * sum(loss[:15])


def test_kd_pairs_are_resumable_and_kd_trains_on_them(tmp_path):
    """Pairs written in two runs (2, then 4 in the same directory) equal one run of 4; the kd run reads them."""
    common = ["--method", "kd", "--tiny", "--sample_every", "0", "--micro_batch", "2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script(*common, "--num_pairs", "4", "--max_steps", "0", "--out_dir", straight)
    run_script(*common, "--num_pairs", "2", "--max_steps", "0", "--out_dir", split)
    first = os.path.join(split, "pairs", "pairs_00000000.safetensors")
    stamp = os.stat(first).st_mtime_ns
    # the same directory again: --overwrite replaces the earlier run of 0 steps (its args.json), and keeps its pairs
    run_script(*common, "--num_pairs", "4", "--max_steps", "3", "--save_every", "3", "--out_dir", split, "--overwrite")
    assert os.stat(first).st_mtime_ns == stamp  # kept, not rewritten
    for name in ("pairs_00000000.safetensors", "pairs_00000002.safetensors"):
        a, b = load_file(os.path.join(straight, "pairs", name)), load_file(os.path.join(split, "pairs", name))
        assert a.keys() == b.keys() == {"latents", "path"} and all(torch.equal(a[k], b[k]) for k in a)
        assert a["path"].shape == (2, 4, 4, 7, 4, 4)
    assert len(losses(split)) == 3
    # other teacher settings in the same directory are refused
    result = run_script(*common, "--num_pairs", "4", "--guidance", "2", "--max_steps", "0", "--out_dir", split, check=False)  # fmt: skip
    assert result.returncode != 0 and "other settings" in result.stderr


def test_resume_is_exact(tmp_path):
    """Self-Forcing (rollout, exit steps, fake-score steps): 4 steps = 2 steps + --resume 2 steps, bit for bit."""
    common = ["--method", "self_forcing", "--tiny", "--sample_every", "0", "--student_update_freq", "2", "--ema", "0.9"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script(*common, "--max_steps", "4", "--save_every", "4", "--out_dir", straight)
    run_script(*common, "--max_steps", "2", "--save_every", "2", "--out_dir", split)
    run_script(*common, "--max_steps", "4", "--save_every", "2", "--out_dir", split, "--resume")
    for name in ("student", "fake_score", "ema_0.9"):
        a, b = weights(straight, 4, name), weights(split, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_self_forcing_moves_a_perturbed_student_toward_the_teacher(tmp_path):
    """The student starts as the (tiny, random) teacher with a flow offset of +0.5 on every output; 40 steps of
    Self-Forcing (20 generator steps) pull the mean of its 4-step causal samples toward the mean of the teacher's
    50-step CFG samples on the same noise. Measured: per-frame mean distance 0.48 -> 0.11 (0.24x)."""
    out = str(tmp_path / "sf")
    teacher = tiny_wan(0)  # the tiny run's teacher: seeded by --seed 0
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    state["proj_out.bias"] += 0.5
    save_file(state, str(tmp_path / "init.safetensors"))
    run_script("--method", "self_forcing", "--tiny", "--student_init", str(tmp_path / "init.safetensors"), "--max_steps", "40", "--save_every", "40", "--sample_every", "0", "--lr", "1e-3", "--critic_lr", "1e-3", "--student_update_freq", "2", "--guidance", "3", "--micro_batch", "2", "--out_dir", out)  # fmt: skip

    encoder = encoders.TextEncoder("wan", tiny={"umt5": 32})
    text = encoders.cached_embeddings(encoder, ["a red fox in snow", "a cat on a sofa"], str(tmp_path / "cache"))[
        "text"
    ]
    neg = encoders.cached_embeddings(encoder, [twc.WAN_NEGATIVE_PROMPT], str(tmp_path / "cache"))["text"]
    noise = torch.randn(16, 4, 7, 4, 4, generator=torch.Generator().manual_seed(1))
    text = text.repeat(8, 1, 1)
    ref = wan.sample_euler(teacher, noise, text, neg.expand_as(text), steps=20, guidance=3.0).mean(dim=(0, 3, 4))

    def distance(state):
        model = wan.WanModel(CFG).eval()
        model.load_state_dict(state)
        x = wan.causal_sample(model, noise, text, chunk_size=2, generator=torch.Generator().manual_seed(0))
        return (x.mean(dim=(0, 3, 4)) - ref).abs().mean().item()

    before, after = distance(state), distance(weights(out, 40))
    assert before > 0.3
    assert after < 0.5 * before


@pytest.mark.parametrize("method", ["self_forcing"])  # the rollout (forward_chunk) and full-clip passes under FSDP
def test_fsdp_two_processes_match_one(tmp_path, method):
    """torchrun --nproc_per_node=2 --fsdp on gloo (FSDP2 per block, activation checkpointing, meta init, weights
    broadcast from rank 0) against one plain process accumulating the same two micro-batches: same losses (a fake
    score step, then a generator step) and the same weights."""
    common = ["--method", method, "--tiny", "--sample_every", "0", "--student_update_freq", "2", "--batch_size", "2", "--micro_batch", "1", "--max_steps", "2", "--save_every", "2", "--lr", "1e-4"]  # fmt: skip
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script(*common, "--out_dir", one)
    run_script(*common, "--fsdp", "--out_dir", two, nproc=2)
    for a, b in zip(losses(one), losses(two)):
        assert abs(a - b) <= 1e-5 * abs(a)
    for name in ("student", "fake_score"):
        a, b = weights(one, 2, name), weights(two, 2, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (name, k)


def test_bad_data_directory_is_a_clear_error(tmp_path):
    result = run_script("--method", "sft", "--tiny", "--data", str(tmp_path), "--out_dir", str(tmp_path / "o"), check=False)  # fmt: skip
    assert result.returncode != 0 and "holds no latent videos" in result.stderr
    save_file({"latents": torch.zeros(2, 4, 7, 4, 4)}, str(tmp_path / "a.safetensors"), metadata={"prompts": '["one"]'})
    result = run_script("--method", "sft", "--tiny", "--data", str(tmp_path), "--out_dir", str(tmp_path / "o"), check=False)  # fmt: skip
    assert result.returncode != 0 and "2 latent videos but 1 prompts" in result.stderr


def test_help_lists_the_presets():
    result = subprocess.run([sys.executable, "train_wan_causal.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0
    for name in twc.PRESETS:
        assert name in result.stdout
