"""models/wan.py: key manifests of the released Wan 2.1 transformers, the official-layout key table, golden parity
with diffusers (T2V, per-frame times, I2V, VACE), causal equivalence of the KV-cache chunk path and the block-causal
full-clip pass, the rf schedule, strict loading from local Hub folders and .pt files, and the smoke run."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import wan

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WEIGHTS = "diffusion_pytorch_model.safetensors"


# Golden parity runs in float64: the model (`.double()`, inputs cast exactly) against diffusers run in float64 on the
# same weights and inputs (the fixtures' `output.*.f64`, tests/generate/reference_float64.py). Measured: at most 2e-14
# of the output scale (T2V 1.8e-14, I2V 9e-15, VACE 4e-15), at 1 and 2 threads; float32 sits near 1e-6. The bound
# leaves four orders of magnitude to other machines and kernels and is four below float32's noise.
FLOAT64_BOUND = 1e-10
# Our own two forms (KV-cache chunks, block-causal pass, masked attention) in float64: measured below 1e-15.
FLOAT64_SAME = 1e-12


def load_fixture(name):
    """Weights under the real key names, the other tensors (inputs, diffusers' float32 and float64 outputs), and the
    config.json text."""
    with safe_open(os.path.join(HERE, "fixtures", f"wan_{name}.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config_json = f.metadata()["config"]
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}
    return weights, tensors, config_json


def fixture_model(name, dtype=torch.float32):
    """The fixture's model and tensors; for float64 the model and every float tensor cast (exactly) to float64."""
    weights, tensors, config_json = load_fixture(name)
    model = wan.WanModel(wan.config_from_diffusers(json.loads(config_json))).eval()
    model.load_state_dict(weights, strict=True)
    if dtype == torch.float64:
        model, tensors = model.double(), double(tensors)
    return model, tensors


def double(tensors):
    return {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def manifest(name):
    with open(os.path.join(HERE, "manifests", f"wan-{name}.json")) as f:
        return json.load(f)


def meta_keys(cfg):
    with torch.device("meta"):
        model = wan.WanModel(cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------
# Checkpoint layout


@pytest.mark.parametrize(
    "preset, layout",
    [
        ("wan2.1-t2v-1.3b", "t2v-1.3b"),
        ("wan2.1-t2v-14b", "t2v-14b"),
        ("wan2.1-i2v-14b-480p", "i2v-14b"),
        ("wan2.1-i2v-14b-720p", "i2v-14b"),
        ("wan2.1-vace-1.3b", "vace-1.3b"),
        ("self-forcing-ode-init", "t2v-1.3b"),
    ],
)
def test_full_size_keys_match_diffusers(preset, layout):
    assert meta_keys(wan.CONFIGS[preset]) == manifest(layout)


_OFFICIAL_CASES = [
    ("t2v-1.3b", wan.CONFIGS["wan2.1-t2v-1.3b"]),
    ("i2v-14b", wan.CONFIGS["wan2.1-i2v-14b-480p"]),
    ("vace-1.3b", wan.CONFIGS["wan2.1-vace-1.3b"]),
    ("tiny", wan.CONFIGS["tiny"]),
    ("tiny-i2v", replace(wan.CONFIGS["tiny-i2v"], image_dim=1280)),  # the official image MLP is fixed at 1280 wide
    ("tiny-vace", wan.CONFIGS["tiny-vace"]),
]


@pytest.mark.parametrize("name, cfg", _OFFICIAL_CASES, ids=[c[0] for c in _OFFICIAL_CASES])
def test_official_key_table_maps_every_key_exactly_once(name, cfg):
    official = manifest(f"official-{name}")
    renamed = {}
    for key, shape in official.items():
        new = wan.rename_official_key(key)
        assert new not in renamed, f"{key} and another key both map to {new}"
        renamed[new] = shape
    assert renamed == meta_keys(cfg)


def test_official_key_table_rejects_unknown_keys():
    with pytest.raises(ValueError, match="blocks.0.self_attn.qkv.weight"):
        wan.rename_official_key("blocks.0.self_attn.qkv.weight")


def test_diffusers_config_is_read_and_checked():
    weights, _, config_json = load_fixture("vace")
    cfg = wan.config_from_diffusers(json.loads(config_json))
    assert (cfg.vace_layers, cfg.vace_in_channels, cfg.inner_dim) == ((0, 1), 12, 24)
    with pytest.raises(ValueError, match="qk_norm"):
        wan.config_from_diffusers({**json.loads(config_json), "qk_norm": "rms_norm"})
    with pytest.raises(ValueError, match="window"):
        wan.config_from_diffusers({**json.loads(config_json), "window_size": [-1, -1]})


# ----------------------------------------------------------------------------
# Golden parity with diffusers


def test_t2v_matches_diffusers():
    """float64 against diffusers in float64; bound FLOAT64_BOUND (measured 1.8e-14)."""
    model, t = fixture_model("t2v", torch.float64)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"])
        per_frame = model(t["input.x"], t["input.t_frames"], t["input.text"])
    assert relative_error(out, t["output.flow.f64"]) < FLOAT64_BOUND
    # diffusers' per-token times, frame by frame
    assert relative_error(per_frame, t["output.flow_frames.f64"]) < FLOAT64_BOUND


def test_i2v_matches_diffusers():
    """float64 against diffusers in float64; bound FLOAT64_BOUND (measured 9e-15)."""
    model, t = fixture_model("i2v", torch.float64)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"], t["input.image_tokens"], t["input.image_latents"])
    assert relative_error(out, t["output.flow.f64"]) < FLOAT64_BOUND


def test_vace_matches_diffusers():
    """float64 against diffusers in float64; bound FLOAT64_BOUND (measured 4e-15)."""
    model, t = fixture_model("vace", torch.float64)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"], control=t["input.control"],
                    control_scale=t["input.control_scale"])  # fmt: skip
    assert relative_error(out, t["output.flow.f64"]) < FLOAT64_BOUND


def test_float32_stays_within_diffusers_own_float32_error():
    """The float32 model (float32 norms, residuals and modulation, complex64 RoPE, time angles in float64) against
    diffusers' float64 outputs. Bound: 20x diffusers' own float32 error on the same outputs (its float32 output
    against its float64 one, read from the fixture: 2.3e-6 and 2.1e-6 of the scale). Measured: 2.6e-7 and 2.4e-7 at 1
    thread, 3.8e-7 and 2.3e-7 at 2 (diffusers' float32 angles of 1000 t are most of its own error)."""
    model, t = fixture_model("t2v")
    with torch.no_grad():
        cases = {
            "flow": model(t["input.x"], t["input.t"], t["input.text"]),
            "flow_frames": model(t["input.x"], t["input.t_frames"], t["input.text"]),
        }
    for key, out in cases.items():
        assert out.dtype == torch.float32
        diffusers_float32_error = relative_error(t[f"output.{key}"], t[f"output.{key}.f64"])
        assert relative_error(out, t[f"output.{key}.f64"]) < 20 * diffusers_float32_error, key


# ----------------------------------------------------------------------------
# Causal form


def test_block_causal_attention_equals_the_masked_attention():
    """In float64: bound FLOAT64_SAME (measured 4e-16; float32 2.4e-7)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 14, 3, 8).double() for _ in range(3))
    chunks = [6, 4, 4]
    mask = wan.block_causal_mask(chunks)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    assert torch.allclose(wan.block_causal_attention(q, k, v, chunks), expected, rtol=0, atol=FLOAT64_SAME)
    assert mask[5, 5] and not mask[5, 6] and mask[6, 0] and mask[13, 9] and not mask[9, 10]


def test_chunks_put_the_remainder_first():
    assert wan.chunk_frames(21, 3) == [3] * 7
    assert wan.chunk_frames(22, 3) == [4, 3, 3, 3, 3, 3, 3]
    assert wan.chunk_frames(5, 2) == [3, 2]
    assert wan.chunk_frames(2, 3) == [2]


def _chunked(model, x, t, text, cond, chunk_size):
    """Chunk by chunk with a KV cache: each chunk is denoised (no commit), then committed with the same inputs."""
    B, _, T, H, W = x.shape
    cache = wan.KVCache(model, B, T, H, W)
    outs, start = [], 0
    for n in wan.chunk_frames(T, chunk_size):
        sl = slice(start, start + n)
        part = {k: (v[:, :, sl] if k in ("image_latents", "control") else v) for k, v in cond.items()}
        probe = model.forward_chunk(x[:, :, sl], t[:, sl], text, cache, **part)
        assert cache.frames == start  # a denoising call leaves the cache as it was
        committed = model.forward_chunk(x[:, :, sl], t[:, sl], text, cache, commit=True, **part)
        assert cache.frames == start + n
        assert torch.equal(probe, committed)
        outs.append(committed)
        start += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("name", ["t2v", "i2v", "vace"])
def test_kv_cache_chunks_equal_the_block_causal_clip(name):
    """In float64: bound FLOAT64_SAME (measured below 1e-15; float32 1.5e-7 to 2.3e-7)."""
    model, fx = fixture_model(name, torch.float64)
    g = torch.Generator().manual_seed(1)
    B, T, H, W = 2, 5, 4, 6
    x = torch.randn(B, 4, T, H, W, generator=g).double()
    t = torch.tensor([[0.9, 0.9, 0.9, 0.4, 0.4], [0.2, 0.2, 0.2, 0.999, 0.999]], dtype=torch.float64)
    text = fx["input.text"]
    cond = {}
    if name == "i2v":
        latents = torch.randn(B, 8, T, H, W, generator=g).double()
        cond = dict(image_tokens=fx["input.image_tokens"], image_latents=latents)
    if name == "vace":
        cond = dict(control=torch.randn(B, 12, T, H, W, generator=g).double(), control_scale=0.8)
    with torch.no_grad():
        full = model(x, t, text, chunk_size=2, **cond)
        chunked = _chunked(model, x, t, text, cond, chunk_size=2)
        bidirectional = model(x, t, text, **cond)
    assert chunked.dtype == torch.float64 and relative_error(chunked, full) < FLOAT64_SAME
    assert relative_error(bidirectional[:, :, :3], full[:, :, :3]) > 1e-3  # the first chunk no longer sees the future


def test_causal_outputs_ignore_later_frames():
    model, fx = fixture_model("t2v")
    x = torch.randn(1, 4, 4, 4, 4)
    later = x.clone()
    later[:, :, 2:] += 1
    with torch.no_grad():
        a, b = (model(v, torch.tensor([0.5]), fx["input.text"][:1], chunk_size=2) for v in (x, later))
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def test_cache_is_detached_and_chunk_gradients_stay_local():
    model, fx = fixture_model("t2v")
    text = fx["input.text"][:1]
    cache = wan.KVCache(model, 1, 4, 4, 4)
    first = torch.randn(1, 4, 2, 4, 4, requires_grad=True)
    model.forward_chunk(first, torch.tensor([0.0]), text, cache, commit=True)
    assert not any(k.requires_grad for k in cache.k)
    second = torch.randn(1, 4, 2, 4, 4, requires_grad=True)
    model.forward_chunk(second, torch.tensor([0.6]), text, cache).square().sum().backward()
    assert first.grad is None and second.grad.abs().sum() > 0
    assert model.blocks[0].attn2.to_k.weight.grad is not None  # cross-attention weights still train with a cache


def test_cross_attention_keys_are_computed_inside_the_blocks():
    """What FSDP2 per block needs: the text keys / values come from within each block's forward, and a filled cache
    serves them (without the text embedder) only while gradients are off."""
    model, fx = fixture_model("t2v")
    text = fx["input.text"][:1]
    inside, calls = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a: inside.append(m))
        block.register_forward_hook(lambda m, a, o: inside.remove(m))
        block.attn2.to_k.register_forward_hook(lambda m, a, o: calls.append(("to_k", len(inside))))
    model.condition_embedder.text_embedder.register_forward_hook(lambda m, a, o: calls.append(("text", len(inside))))
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5])
    with torch.no_grad():
        model(x, t, text)
        assert calls == [("text", 0)] + [("to_k", 1)] * 2
        cache, calls[:] = wan.KVCache(model, 1, 2, 4, 4), []
        first = model.forward_chunk(x, t, text, cache)
        assert calls == [("text", 0)] + [("to_k", 1)] * 2 and all(c is not None for c in cache.context)
        calls.clear()
        assert torch.equal(model.forward_chunk(x, t, text, cache), first) and calls == []  # served by the cache
    model.forward_chunk(x, t, text, cache)
    assert calls == [("text", 0)] + [("to_k", 1)] * 2  # with gradients on, recomputed so the weights train


def test_kv_cache_with_device_and_dtype_does_not_read_the_parameters():
    class Sharded:  # e.g. an FSDP2 module, whose parameters are DTensors
        cfg = wan.CONFIGS["tiny"]

        def parameters(self):
            raise AssertionError("parameters read")

    cache = wan.KVCache(Sharded(), 1, 2, 4, 4, device="cpu", dtype=torch.bfloat16)
    assert cache.k[0].shape == (1, 8, 2, 12) and cache.v[1].dtype == torch.bfloat16


def test_causal_sample_rolls_out_chunk_by_chunk():
    model, fx = fixture_model("t2v")
    text, neg = fx["input.text"][:1], torch.zeros(1, 6, 32)
    noise = torch.randn(1, 4, 5, 4, 4)
    kwargs = dict(chunk_size=2, neg_text=neg, guidance=3.0, context_noise=0.1)
    a = wan.causal_sample(model, noise, text, generator=torch.Generator().manual_seed(0), **kwargs)
    streamed = []
    b = wan.causal_sample(model, noise, text, generator=torch.Generator().manual_seed(0), on_chunk=lambda start, x: streamed.append((start, x)), **kwargs)  # fmt: skip
    assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)
    # each finished chunk is handed out as it is done: frames 0-2 (the first chunk takes the remainder), then 3-4
    assert [s for s, _ in streamed] == [0, 3] and torch.equal(torch.cat([x for _, x in streamed], 2), a)
    # one chunk holding the whole clip is the bidirectional few-step sampler
    whole = wan.causal_sample(model, noise, text, chunk_size=5, generator=torch.Generator().manual_seed(0))
    student = wan.sample_student(model, noise, text, generator=torch.Generator().manual_seed(0))
    assert relative_error(whole, student) < 1e-5  # the same calls in float32: measured 0 at 1 and 2 threads


def test_deterministic_causal_rollout_with_one_chunk_is_euler():
    model, fx = fixture_model("t2v")
    text, noise = fx["input.text"][:1], torch.randn(1, 4, 2, 4, 4)
    times = wan.shift_time(torch.linspace(1, 0, 9, dtype=torch.float64), 3.0)
    rollout = wan.causal_sample(model, noise, text, times=times, chunk_size=2, stochastic=False)
    euler = wan.sample_euler(model, noise, text, steps=8, guidance=1.0, shift=3.0)
    assert relative_error(rollout, euler) < 1e-4  # float32, 8 steps: measured 1.1e-7 to 1.6e-7 (1 and 2 threads)


# ----------------------------------------------------------------------------
# Schedule


def test_shift_and_t_lists():
    assert torch.allclose(wan.t_list(4), torch.tensor([0.999, 0.9375, 2.5 / 3, 0.625, 0.0], dtype=torch.float64))
    assert wan.SELF_FORCING_T_LIST == (0.999, 0.937, 0.833, 0.624, 0.0)
    t = torch.rand(100, dtype=torch.float64)
    assert torch.allclose(wan.shift_time(t, 1.0), t) and (wan.shift_time(t, 5.0) >= t).all()


def test_conversions_round_trip_and_follow_the_flow():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    t = torch.tensor([[0.2, 0.5, 0.9], [0.7, 0.7, 0.1]], dtype=torch.float64)  # per frame
    x_t = wan.add_noise(x0, eps, t)
    flow = eps - x0
    assert torch.allclose(wan.to_x0(x_t, flow, t), x0, atol=1e-5)
    assert torch.allclose(wan.convert(x_t, flow, t, "flow", "eps"), eps, atol=1e-5)
    assert torch.allclose(wan.convert(x_t, x0, t, "x0", "flow"), flow, atol=1e-4)
    assert wan.alpha(torch.tensor(0.3)) + wan.sigma(torch.tensor(0.3)) == 1


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    for kind in ("shifted", "logitnormal", "uniform"):
        t = wan.sample_t(4000, kind, generator=g)
        assert t.dtype == torch.float64 and t.min() >= 0.001 and t.max() <= wan.T_MAX
    assert wan.sample_t(4000, "shifted", generator=g).mean() > 0.7  # shift 5 leans to noise
    per_chunk = wan.sample_t_chunks(3, 7, 3, grid=wan.SELF_FORCING_T_LIST, generator=g)
    assert per_chunk.shape == (3, 7)
    for lo, hi in ((0, 4), (4, 7)):
        assert (per_chunk[:, lo:hi] == per_chunk[:, lo : lo + 1]).all()
    assert set(per_chunk.flatten().tolist()) <= set(wan.SELF_FORCING_T_LIST)
    continuous = wan.sample_t_chunks(2, 6, 3, generator=g)
    assert (continuous[:, :3] == continuous[:, :1]).all() and (continuous[:, 0] != continuous[:, 3]).all()


# ----------------------------------------------------------------------------
# Forward, features, samplers


def test_forward_backward_and_features_on_tiny():
    torch.manual_seed(0)
    model = wan.WanModel(wan.CONFIGS["tiny"])
    x = torch.randn(2, 4, 3, 8, 8)
    out, features = model(x, torch.tensor([0.3, 0.8]), torch.randn(2, 6, 32), feature_indices={0, 1})
    out.square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert [f.shape for f in features] == [(2, 6, 3, 8, 8)] * 2  # D / 4 channels at latent resolution
    only = model(x, torch.tensor([0.3, 0.8]), torch.randn(2, 6, 32), feature_indices={0}, features_only=True)
    assert len(only) == 1 and only[0].shape == (2, 6, 3, 8, 8)


def test_euler_sampler_with_guidance():
    model, fx = fixture_model("i2v")
    noise = torch.randn(1, 4, 2, 4, 4)
    cond = dict(image_tokens=fx["input.image_tokens"][:1], image_latents=wan.i2v_latents(torch.randn(1, 4, 2, 4, 4)))
    text, neg = fx["input.text"][:1], torch.zeros(1, 512, 32)
    out = wan.sample_euler(model, noise, text, neg, steps=3, guidance=4.0, **cond)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert cond["image_latents"][:, :4, 0].eq(1).all() and cond["image_latents"][:, :4, 1:].eq(0).all()
    with pytest.raises(ValueError, match="input channels"):
        model(noise, torch.tensor([0.5]), text)


# ----------------------------------------------------------------------------
# Loading


def write_hub_folder(root, weights, config_json, shards=2):
    """A diffusers pipeline folder with transformer/config.json and the weights split into shards with an index."""
    folder = os.path.join(root, "transformer")
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config_json)
    keys, weight_map = sorted(weights), {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k].contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, WEIGHTS + ".index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def test_from_pretrained_reads_a_sharded_hub_folder(tmp_path):
    """Loaded in float64 and checked against diffusers in float64 (FLOAT64_BOUND)."""
    weights, t, config_json = load_fixture("i2v")
    write_hub_folder(str(tmp_path), weights, config_json)
    model, t = wan.from_pretrained(str(tmp_path), dtype=torch.float64), double(t)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"], t["input.image_tokens"], t["input.image_latents"])
    assert relative_error(out, t["output.flow.f64"]) < FLOAT64_BOUND
    assert model.cfg.image_dim == 20 and not model.training


def test_from_pretrained_reads_self_forcing_pt(tmp_path):
    """Loaded in float64 and checked against diffusers in float64 (FLOAT64_BOUND)."""
    weights, t, config_json = load_fixture("t2v")
    t = double(t)
    inverse = {wan.rename_official_key(k): k for k in manifest("official-tiny")}
    official = {"model." + inverse[k]: v for k, v in weights.items()}
    path = str(tmp_path / "ode_init.pt")
    torch.save({"generator": official, "step": torch.tensor(3)}, path)
    model = wan.from_pretrained(path, config="tiny", dtype=torch.float64)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"])
    assert relative_error(out, t["output.flow.f64"]) < FLOAT64_BOUND
    with pytest.raises(ValueError, match="generator_ema"):
        wan.from_pretrained(path, config="tiny", entry="generator_ema")

    # A preset name finds the file in the seed's place, <root>/Self-Forcing/checkpoints/ode_init.pt, without the Hub.
    from dataclasses import replace

    preset = wan.CONFIGS["self-forcing-ode-init"]
    tiny = replace(wan.CONFIGS["tiny"], repo=preset.repo, file=preset.file)
    os.makedirs(tmp_path / "root" / "Self-Forcing" / "checkpoints")
    os.replace(path, tmp_path / "root" / "Self-Forcing" / preset.file)
    import unittest.mock

    with unittest.mock.patch.dict(wan.CONFIGS, {"self-forcing-ode-init": tiny}):
        model = wan.from_pretrained("self-forcing-ode-init", root=str(tmp_path / "root"), dtype=torch.float64)
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.text"])
    assert relative_error(out, t["output.flow.f64"]) < FLOAT64_BOUND


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    weights, _, config_json = load_fixture("t2v")
    broken = dict(weights)
    broken.pop("blocks.1.attn1.norm_k.weight")
    broken["blocks.1.attn1.extra.weight"] = torch.zeros(3)
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(broken, str(folder / WEIGHTS))
    (folder / "config.json").write_text(config_json)
    with pytest.raises(ValueError) as info:
        wan.from_pretrained(str(tmp_path))
    assert "missing:    blocks.1.attn1.norm_k.weight" in str(info.value)
    assert "unexpected: blocks.1.attn1.extra.weight" in str(info.value)
    with pytest.raises(ValueError, match="shape"):
        save_file({**weights, "proj_out.bias": torch.zeros(5)}, str(folder / WEIGHTS))
        wan.from_pretrained(str(tmp_path))


def test_pickles_with_code_are_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"generator": {"x": torch.zeros(1)}, "obj": wan.Config()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        wan.from_pretrained(path, config="tiny")


def test_missing_hub_repo_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LOCAL_FILES_ONLY", "true")
    with pytest.raises(FileNotFoundError, match="hf download"):
        wan.from_pretrained("nobody/not-a-wan")


def test_smoke_script_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "models/wan.py"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "wan tiny: 21,784 parameters" in result.stdout and "tiny-vace" in result.stdout
