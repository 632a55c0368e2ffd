"""models/wan.py's causal path against the official Self-Forcing code (guandeh17/Self-Forcing): the fixture
tests/fixtures/wan_causal_tiny.safetensors holds a tiny random-weight CausalWanModel under its own key names, and what
its block-causal pass, its inference pipeline (CausalInferencePipeline, 3 latent frames per block, call by call with
the KV cache) and its training rollout (SelfForcingTrainingPipeline, with its exit-step draw) computed in float64
(tests/generate/make_wan_causal_fixtures.py, which says what was patched to run their code on a CPU and why the math
is unchanged). Our model loads the weights through the official key table and runs in float64."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import train_wan_causal as twc
from models import wan

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "wan_causal_tiny.safetensors")

# Our float64 model against theirs run in float64, relative to the output scale. Measured: at most 1e-15 on every
# network call, the full-clip pass, the KV cache and the generated latents (1 and 2 threads); their own float32 run is
# 1.4e-7 (full pass) to 1.8e-6 (latents) from their float64 one. The bound leaves five orders of magnitude to other
# machines and kernels and is three below float32's noise.
FLOAT64_BOUND = 1e-10


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """(our float64 model loaded from their weights, the fixture's tensors with float inputs in float64)."""
    with safe_open(FIXTURE, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    path = str(tmp_path_factory.mktemp("sf") / "generator.safetensors")
    save_file(weights, path)
    with torch.device("meta"):
        model = wan.WanModel(wan.CONFIGS["tiny"])
    wan.load_checkpoint(model, path)  # official layout, renamed through OFFICIAL_KEYS, strict
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[wan.rename_official_key(key)], value), key
    tensors = {k: v.double() if k.startswith("input.") and v.is_floating_point() else v for k, v in tensors.items()}
    return model.eval().double(), tensors


def test_their_weights_load_strictly(fixture):
    """Every key of their CausalWanModel maps once through OFFICIAL_KEYS onto ours (load_checkpoint is strict)."""
    model, t = fixture
    theirs = [k for k in t if not k.startswith(("input.", "output."))]
    assert len(theirs) == len(model.state_dict()) and len({wan.rename_official_key(k) for k in theirs}) == len(theirs)


def test_full_clip_block_causal_pass(fixture):
    """forward(chunk_size=3) with per-frame times = their _forward_train with the block-causal FlexAttention mask."""
    model, t = fixture
    with torch.no_grad():
        out = model(t["input.x"], t["input.t_frames"], t["input.text"], chunk_size=3)
    assert out.dtype == torch.float64 and relative_error(out, t["output.full.f64"]) < FLOAT64_BOUND


def replay(model, t, run):
    """Each network call of their `run` (inference or training) through forward_chunk with one KVCache: the same
    input, time (theirs / 1000), start frame, and commit for the pass at the context time. Returns the cache."""
    x = t["input.noise"]
    cache = wan.KVCache(model, x.shape[0], x.shape[2], x.shape[3], x.shape[4], dtype=torch.float64)
    for i, (commit, start) in enumerate(zip(t[f"output.{run}.commit"].tolist(), t[f"output.{run}.start"].tolist())):
        x, time = t[f"output.{run}.{i}.x.f64"], t[f"output.{run}.{i}.t.f64"] / 1000
        with torch.no_grad():
            out = model.forward_chunk(x, time, t["input.text"], cache, commit=commit, start_frame=start)
        err = relative_error(out, t[f"output.{run}.{i}.flow.f64"])
        assert err < FLOAT64_BOUND, f"{run} call {i} (start {start}, t {time[0, 0]:.4f}, commit {commit}): {err:.1e}"
    return cache


def test_forward_chunk_with_kv_cache_equals_their_inference_calls(fixture):
    """Chunk by chunk (3 frames each), the 4 denoising calls and the cache-writing call at t = 0 of their
    CausalInferencePipeline; afterwards our cache holds their rotated keys and their values."""
    model, t = fixture
    cache = replay(model, t, "inference")
    assert cache.frames == t["input.noise"].shape[2]
    for layer in range(len(model.blocks)):
        assert relative_error(cache.k[layer], t[f"output.inference.cache.{layer}.k.f64"]) < FLOAT64_BOUND
        assert relative_error(cache.v[layer], t[f"output.inference.cache.{layer}.v.f64"]) < FLOAT64_BOUND


def test_forward_chunk_with_kv_cache_equals_their_training_rollout_calls(fixture):
    model, t = fixture
    replay(model, t, "training")


def their_draws(monkeypatch, draws):
    """torch.randn hands out their recorded re-noising draws in order (same shape asked for), instead of new ones."""
    draws = list(draws)

    def randn(*shape, generator=None, device=None, dtype=None):
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        draw = draws.pop(0)
        assert tuple(draw.shape) == shape and dtype == draw.dtype
        return draw

    monkeypatch.setattr(torch, "randn", randn)
    return draws


def record_calls(monkeypatch, model):
    """The (start frame, time x 1000, commit) of each forward_chunk call, kept in the returned list."""
    calls, forward_chunk = [], model.forward_chunk

    def recorded(x, time, text, cache, commit=False, start_frame=None, **kwargs):
        calls.append((start_frame, round(float(time.reshape(-1)[0]) * 1000, 9), commit))
        return forward_chunk(x, time, text, cache, commit=commit, start_frame=start_frame, **kwargs)

    monkeypatch.setattr(model, "forward_chunk", recorded)
    return calls


def their_calls(t, run):
    """Their (start frame, timestep, commit) per call, as record_calls writes ours."""
    times = [round(float(t[f"output.{run}.{i}.t.f64"][0, 0]), 9) for i in range(len(t[f"output.{run}.commit"]))]
    return list(zip(t[f"output.{run}.start"].tolist(), times, t[f"output.{run}.commit"].tolist()))


def test_denoising_step_list_equals_theirs(fixture):
    """Their step list: [1000, 750, 500, 250] warped through their scheduler table (shift 5) = 1000 x our
    SELF_FORCING_OFFICIAL_T_LIST = shift_time(s / 1000, 5); t_list(4) is the same but for t = 1 clamped to T_MAX, and
    FastGen's SELF_FORCING_T_LIST rounds it (at most 1e-3 away)."""
    _, t = fixture
    theirs = t["output.denoising_step_list.f64"] / 1000
    official = torch.tensor(wan.SELF_FORCING_OFFICIAL_T_LIST, dtype=torch.float64)
    assert official[-1] == 0 and torch.allclose(official[:-1], theirs, rtol=0, atol=1e-12)
    steps = torch.tensor([1000, 750, 500, 250], dtype=torch.float64)
    assert torch.allclose(wan.shift_time(steps / 1000, 5.0), theirs, rtol=0, atol=1e-12)
    assert torch.allclose(wan.t_list(4, 5.0)[1:-1], theirs[1:], rtol=0, atol=1e-12) and wan.t_list(4)[0] == wan.T_MAX
    fastgen = torch.tensor(wan.SELF_FORCING_T_LIST[:-1], dtype=torch.float64)
    assert 5e-4 < (fastgen - theirs).abs().max() <= 1e-3 + 1e-12


def test_causal_sample_equals_their_inference_pipeline(fixture, monkeypatch):
    """causal_sample on their step list, with their re-noising draws, generates their latents; every call it makes
    runs at their (start frame, time, commit)."""
    model, t = fixture
    calls = record_calls(monkeypatch, model)
    left = their_draws(monkeypatch, t["output.inference.draws.f64"])
    with torch.no_grad():
        out = wan.causal_sample(model, t["input.noise"], t["input.text"], times=wan.SELF_FORCING_OFFICIAL_T_LIST)
    assert not left and relative_error(out, t["output.inference.latents.f64"]) < FLOAT64_BOUND
    assert calls == their_calls(t, "inference")


def test_self_forcing_rollout_runs_their_training_steps(fixture, monkeypatch):
    """train_wan_causal.rollout with their exit step (drawn by their code, shared by both chunks) runs their calls:
    per chunk the steps up to the exit, then the commit at t = 0, and its first chunk is theirs. Known difference:
    their rollout commits each chunk's x0 re-noised to their scheduler's smallest sigma, shift_time(0.001, 5) = 0.005
    (add_noise at timestep 0 snaps to the nearest table entry, and the table has no 0), while telling the network
    t = 0; ours (as FastGen, and as their inference pipeline) commits x0 itself. So later chunks differ, by the
    effect of that context noise; each of their calls, their re-noised context included, is equal to ours
    (test_forward_chunk_with_kv_cache_equals_their_training_rollout_calls)."""
    model, t = fixture
    exit_step = int(t["output.training.exit_step"])
    assert exit_step == 1  # an inner step: the rollout stops before the last one (the generator picks such a seed)
    chunks = wan.chunk_frames(t["input.noise"].shape[2], 3)
    steps_per_chunk = exit_step + 2  # the denoising calls up to and including the exit, then the commit
    assert len(t["output.training.commit"]) == steps_per_chunk * len(chunks)

    # Their draws per chunk: exit_step re-noisings between steps, then the context re-noising; ours skips the last.
    draws = t["output.training.draws.f64"]
    draws = draws.reshape(len(chunks), exit_step + 1, *draws.shape[1:])
    sigma_min = wan.shift_time(torch.tensor(0.001, dtype=torch.float64), 5.0)
    for c in range(len(chunks)):
        commit_in = t[f"output.training.{(c + 1) * steps_per_chunk - 1}.x.f64"]
        x0 = t["output.training.latents.f64"][:, :, 3 * c : 3 * c + 3]
        assert relative_error(commit_in, wan.add_noise(x0, draws[c, -1], sigma_min)) < FLOAT64_BOUND

    calls = record_calls(monkeypatch, model)
    left = their_draws(monkeypatch, draws[:, :-1].flatten(0, 1))
    with torch.no_grad():
        out = twc.rollout(model, t["input.noise"], t["input.text"], wan.SELF_FORCING_OFFICIAL_T_LIST, 3,
                          [exit_step] * len(chunks), grad=False)  # fmt: skip
    assert not left
    assert calls == their_calls(t, "training")
    assert relative_error(out[:, :, :3], t["output.training.latents.f64"][:, :, :3]) < FLOAT64_BOUND
    assert relative_error(out[:, :, 3:], t["output.training.latents.f64"][:, :, 3:]) > 1e-6  # the context noise


def test_exit_step_choice_matches_theirs():
    """Their exit step: uniform over the 4 denoising steps (torch.randint(0, 4)), one for all chunks by default
    (same_step_across_blocks), the last one with last_step_only; ours draws the same range the same way."""
    args = twc.parse_args(["--tiny", "--method", "self_forcing", "--t_list", "1.0,0.9375,0.8333333333333334,0.625,0"])
    draws = {e for step in range(200) for e in set(twc.exit_steps(3, args, step))}
    assert draws == {0, 1, 2, 3} and all(len(set(twc.exit_steps(3, args, s))) == 1 for s in range(20))
    args.last_step_only = True
    assert twc.exit_steps(3, args, 0) == [3, 3, 3]
