"""Wan 2.1: the video diffusion transformer of Wan T2V, I2V and VACE, and its causal chunk-by-chunk form with a KV cache.

Paper: Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models", 2025 (arXiv:2503.20314). Official code:
https://github.com/Wan-Video/Wan2.1 (wan/modules/model.py, vace_model.py). The causal form follows CausVid (Yin et al.,
"From Slow Bidirectional to Fast Autoregressive Video Diffusion Models", CVPR 2025) and Self-Forcing (Huang et al.,
"Self Forcing", 2025, https://github.com/guandeh17/Self-Forcing), as NVIDIA FastGen runs them.

The network: latents (B, 16, F, H, W) of the Wan VAE are cut into 1x2x2 patches (tokens), then N blocks of
self-attention (RMS-normed q/k over all heads, 3-axis RoPE on frame/row/column), cross-attention to umT5 text tokens
and a GELU MLP, each modulated by the time (adaLN, a learned 6-row table per block plus a projection of the time
embedding). I2V adds CLIP image tokens as extra cross-attention keys/values and takes 20 more input channels (a
4-channel first-frame mask and the VAE latents of the first frame followed by zeros). VACE adds a second stack of
blocks over control latents (96 channels) whose outputs ("hints") are added after chosen main blocks.

Time: this file's flow time t in [0, 1] (t = 1 is noise), x_t = (1 - t) x0 + t eps, and the network predicts the flow
eps - x0; the backbone is fed 1000 t. Times may be per frame, t of shape (B, F), as diffusion forcing needs.

Causal form, same weights: `forward(..., chunk_size=3)` runs the whole clip with block-causal self-attention (frames
are grouped into chunks, the first chunk absorbing the remainder, and a token sees its own chunk and all earlier ones);
`forward_chunk(x, t, text, cache, commit=...)` runs one chunk against a `KVCache` of the chunks committed so far, and
`causal_sample` is the chunk-by-chunk rollout (denoise a chunk, then commit it with one more pass at t = 0 or at a
small context noise). The two agree to float rounding (tested), and both equal Self-Forcing's own CausalWanModel and
pipelines in float64 (tests/test_wan_causal_reference.py).

Checkpoints: the diffusers layout (`transformer/` of Wan-AI/Wan2.1-*-Diffusers: config.json and safetensors, sharded
with an index for 14B); module names here equal those keys, so loading is strict. The official Wan layout
(`blocks.0.self_attn.q.weight`, ...), which Self-Forcing's `ode_init.pt` and `self_forcing_dmd.pt` use under a
`generator` entry with a `model.` prefix, is renamed through one explicit table (`OFFICIAL_KEYS`). `.pt` files are
read with torch.load(weights_only=True).

Left out: Wan 2.2 (TI2V-5B per-token times, MoE experts), first-last-frame I2V (`pos_embed_seq_len`), UniPC (the
reference sampler is Euler), FastGen's method heads (logvar, MeanFlow's second time), sliding-window KV caches.

    model = from_pretrained("wan2.1-t2v-1.3b", dtype=torch.bfloat16, device="cuda")
    text = ...                                             # umT5-xxl hidden states (B, 512, 4096), zero past each prompt
    latents = sample_euler(model, torch.randn(1, 16, 21, 60, 104, device="cuda"), text, neg_text, steps=50, guidance=5.0)
"""

import json
import math
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    patch_size: tuple = (1, 2, 2)  # frames, rows, columns per token
    num_attention_heads: int = 12  # 12 for 1.3B, 40 for 14B
    attention_head_dim: int = 128  # split 44/42/42 between the frame, row and column RoPE
    in_channels: int = 16  # 36 for I2V: latents, 4 mask channels, 16 first-frame latents
    out_channels: int = 16
    text_dim: int = 4096  # umT5-xxl width
    freq_dim: int = 256  # sinusoidal time features
    ffn_dim: int = 8960  # MLP width
    num_layers: int = 30
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention
    eps: float = 1e-6
    image_dim: int = None  # CLIP image-token width (1280) for I2V, else None
    added_kv_proj_dim: int = None  # I2V: width of the image tokens after the image embedder (= inner width)
    rope_max_seq_len: int = 1024  # positions per RoPE axis
    vace_layers: tuple = ()  # VACE: main blocks after which the hints of the VACE blocks are added, in order
    vace_in_channels: int = 96  # VACE control channels: 32 latent + 64 mask
    shift: float = 5.0  # time shift of the reference sampler (FastGen's defaults: T2V 5, I2V-480p 3, VACE 16)
    repo: str = ""  # Hugging Face Hub repo with the weights
    subfolder: str = "transformer"  # folder of the repo with config.json and the safetensors
    file: str = ""  # a single checkpoint file in the repo instead (Self-Forcing's .pt), official key layout

    @property
    def inner_dim(self):
        return self.num_attention_heads * self.attention_head_dim


_T2V_1_3B = Config(repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
_T2V_14B = Config(num_attention_heads=40, ffn_dim=13824, num_layers=40, repo="Wan-AI/Wan2.1-T2V-14B-Diffusers")
_I2V_14B = replace(_T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120, shift=3.0)
_TINY = Config(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32, freq_dim=16,
               ffn_dim=48, num_layers=2, rope_max_seq_len=64)  # fmt: skip
# fmt: off
CONFIGS = {
    "wan2.1-t2v-1.3b":     _T2V_1_3B,
    "wan2.1-t2v-14b":      _T2V_14B,
    "wan2.1-i2v-14b-480p": replace(_I2V_14B, repo="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    "wan2.1-i2v-14b-720p": replace(_I2V_14B, repo="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", shift=5.0),
    "wan2.1-vace-1.3b":    replace(_T2V_1_3B, vace_layers=tuple(range(0, 30, 2)), shift=16.0, repo="Wan-AI/Wan2.1-VACE-1.3B-diffusers"),
    "wan2.1-vace-14b":     replace(_T2V_14B, vace_layers=tuple(range(0, 40, 5)), shift=16.0, repo="Wan-AI/Wan2.1-VACE-14B-diffusers"),
    # Self-Forcing's causal students of T2V-1.3B (official key layout, `generator` entry): the ODE-regression
    # initialisation that CausVid / Self-Forcing training starts from, and the released Self-Forcing DMD student.
    "self-forcing-ode-init": replace(_T2V_1_3B, repo="gdhe17/Self-Forcing", file="checkpoints/ode_init.pt"),
    "self-forcing-dmd":      replace(_T2V_1_3B, repo="gdhe17/Self-Forcing", file="checkpoints/self_forcing_dmd.pt"),
    "tiny":       _TINY,
    "tiny-i2v":   replace(_TINY, in_channels=12, image_dim=20, added_kv_proj_dim=24),
    "tiny-vace":  replace(_TINY, vace_layers=(0, 1), vace_in_channels=12),
}
# fmt: on

# ----------------------------------------------------------------------------
# Schedule: rectified flow. Time math runs in float64 on purpose: the shift warp and the conversions divide by t and
# 1 - t, which float32 resolves poorly near the ends.

PRED_TYPE = "flow"  # the network predicts d x_t / dt = eps - x0
T_MAX = 0.999  # FastGen's largest training / sampling time for rf (t = 1 exactly is never trained on)
SELF_FORCING_T_LIST = (0.999, 0.937, 0.833, 0.624, 0.0)  # 4-step times of CausVid / Self-Forcing (FastGen configs)
# Self-Forcing's own 4 steps, with which its released students (self-forcing-*) were trained and sample: its
# denoising_step_list [1000, 750, 500, 250] with warp_denoising_step (configs/self_forcing_dmd.yaml), i.e. the times
# shift_time(s / 1000, 5) of its FlowMatchScheduler table, t = 1 included. FastGen's list above rounds them.
SELF_FORCING_OFFICIAL_T_LIST = (1.0, 0.9375, 2.5 / 3, 0.625, 0.0)


def alpha(t):
    return 1 - t


def sigma(t):
    return t


def alpha_prime(t):
    return -torch.ones_like(t)


def sigma_prime(t):
    return torch.ones_like(t)


def shift_time(t, shift):
    """The time warp t' = s t / (1 + (s - 1) t) (SD3 Eq. 23): more steps at high noise for larger latents."""
    return shift * t / (1 + (shift - 1) * t)


def _expand_t(t, x):
    """A time of shape (), (B,) or per frame (B, F), in float64, broadcast against a video x (B, C, F, H, W)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 1:
        return t.reshape(-1, 1, 1, 1, 1)
    if t.ndim == 2:
        return t[:, None, :, None, None]
    return t


def to_x0(x_t, out, t, pred_type=PRED_TYPE):
    """x0 from a prediction of type x0, eps or flow at (x_t, t): x_t = (1 - t) x0 + t eps, flow = eps - x0."""
    x, y, t = x_t.double(), out.double(), _expand_t(t, x_t)
    if pred_type == "x0":
        x0 = y
    elif pred_type == "eps":
        x0 = (x - t * y) / (1 - t).clamp(min=1e-6)
    elif pred_type == "flow":
        x0 = x - t * y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected x0, eps or flow")
    return x0.to(out.dtype)


def from_x0(x_t, x0, t, pred_type=PRED_TYPE):
    """Express an x0 prediction at (x_t, t) as a prediction of type x0, eps or flow."""
    x, y, t = x_t.double(), x0.double(), _expand_t(t, x_t)
    eps = (x - (1 - t) * y) / t.clamp(min=1e-6)
    if pred_type == "x0":
        out = y
    elif pred_type == "eps":
        out = eps
    elif pred_type == "flow":
        out = eps - y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected x0, eps or flow")
    return out.to(x0.dtype)


def convert(x_t, out, t, src, dst):
    """Convert a prediction between the types x0, eps and flow (through x0)."""
    return out if src == dst else from_x0(x_t, to_x0(x_t, out, t, src), t, dst)


def add_noise(x0, eps, t):
    """The forward process x_t = (1 - t) x0 + t eps; t may be per frame (B, F)."""
    t = _expand_t(t, x0)
    return ((1 - t) * x0.double() + t * eps.double()).to(x0.dtype)


def t_list(steps=4, shift=5.0):
    """Few-step student times: linspace(1, 0, steps + 1) warped by `shift_time`, the first clamped to T_MAX.

    4 steps, shift 5: [0.999, 0.9375, 0.8333, 0.625, 0]. FastGen's CausVid / Self-Forcing configs write these rounded
    as SELF_FORCING_T_LIST; Self-Forcing's own code trained and samples its released students on them unrounded and
    unclamped, SELF_FORCING_OFFICIAL_T_LIST (t = 1 first): pass that one to sample them as Self-Forcing does.
    """
    t = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
    return t.clamp(max=T_MAX)


def sample_t(n, kind="shifted", shift=5.0, p_mean=0.0, p_std=1.0, t_min=0.001, t_max=T_MAX, generator=None):
    """Training times, float64 (n,), in [t_min, t_max].

    shifted:     u ~ U[0, 1] warped by `shift_time` (the Wan / Self-Forcing configs, shift 5), then scaled.
    logitnormal: sigmoid(p_mean + p_std n) (SD3's default, FastGen's rf default), then scaled.
    uniform:     U[t_min, t_max].
    """
    if kind == "shifted":
        u = shift_time(torch.rand(n, dtype=torch.float64, generator=generator), shift)
    elif kind == "logitnormal":
        u = torch.sigmoid(p_mean + p_std * torch.randn(n, dtype=torch.float64, generator=generator))
    elif kind == "uniform":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; expected shifted, logitnormal or uniform")
    return t_min + (t_max - t_min) * u


def chunk_frames(num_frames, chunk_size):
    """Frames per causal chunk: the first chunk takes chunk_size plus the remainder (21 frames, 3 -> [3, 3, ..., 3];
    22 -> [4, 3, ...]), as FastGen's block mask and rollout do. Fewer frames than chunk_size make one chunk."""
    if num_frames < chunk_size:
        return [num_frames]
    return [chunk_size + num_frames % chunk_size] + [chunk_size] * (num_frames // chunk_size - 1)


def sample_t_chunks(n, num_frames, chunk_size, grid=None, generator=None, **sample_t_kwargs):
    """Per-frame times (n, F) that are constant within each causal chunk (diffusion forcing).

    With `grid` (a t list), each chunk's time is a uniform draw from all its entries, the final 0 included, so some
    chunks are clean (FastGen's sample_t_inhom, CausVid / causal KD); else each chunk draws from `sample_t`.
    """
    counts = chunk_frames(num_frames, chunk_size)
    if grid is not None:
        grid = torch.as_tensor(grid, dtype=torch.float64)
        per_chunk = grid[torch.randint(len(grid), (n, len(counts)), generator=generator)]
    else:
        per_chunk = sample_t(n * len(counts), generator=generator, **sample_t_kwargs).reshape(n, len(counts))
    return per_chunk.repeat_interleave(torch.tensor(counts), dim=1)


# ----------------------------------------------------------------------------
# Building blocks


def precision(dtype):
    """What Wan computes in float32 for half-precision weights (norms, residuals, modulation, RoPE, time features)
    runs in float32, except in a float64 model, where it runs in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x):
    """x in float32, or in float64 if it is float64 (see `precision`)."""
    return x.to(precision(x.dtype))


def layer_norm(x, eps, weight=None, bias=None):
    """LayerNorm in float32 whatever the weights' dtype (float64 in a float64 model), as Wan keeps its norms (and
    diffusers' FP32LayerNorm)."""
    weight = upcast(weight) if weight is not None else None
    bias = upcast(bias) if bias is not None else None
    return F.layer_norm(upcast(x), x.shape[-1:], weight, bias, eps)


class LayerNorm(nn.LayerNorm):
    """An affine LayerNorm computed in float32 (float64 in a float64 model)."""

    def forward(self, x):
        return layer_norm(x, self.eps, self.weight, self.bias)


def timestep_features(t, dim, dtype=torch.float32):
    """Sinusoidal features [cos | sin] of 1000 t with frequencies 10000^(-i / (dim/2)); the angles in float64, as the
    official Wan (diffusers evaluates them in float32, 3e-5 apart at t = 1). Returned in float32, or in float64 for
    a float64 `dtype` (the model's)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = (1000 * t.double())[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(precision(dtype))


def rope_angles(cfg, frames, height, width, frame_offset, device):
    """RoPE angles (L, D/2) of the tokens of a (frames, height, width) token grid whose first frame is frame_offset.

    The head dimension D splits into frame, row and column parts (D - 4 (D//6), 2 (D//6), 2 (D//6)) = 44/42/42 for
    D = 128; each rotates its (even, odd) pairs by position x theta^(-2i/d), theta 10000 (official Wan rope_params).
    """
    d = cfg.attention_head_dim
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    if frame_offset + frames > cfg.rope_max_seq_len or max(height, width) > cfg.rope_max_seq_len:
        raise ValueError(f"token grid beyond rope_max_seq_len={cfg.rope_max_seq_len} positions")
    axes = []
    for n, dim, offset in zip((frames, height, width), dims, (frame_offset, 0, 0)):
        inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        axes.append(torch.outer(torch.arange(offset, offset + n, dtype=torch.float64, device=device), inv))
    f, h, w = axes
    grid = torch.cat(
        [
            f[:, None, None].expand(frames, height, width, -1),
            h[None, :, None].expand(frames, height, width, -1),
            w[None, None, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return grid.reshape(frames * height * width, -1)


def apply_rope(x, rotation):
    """Rotate the (even, odd) channel pairs of x (B, L, N, D), read as complex numbers, by the unit complex numbers
    `rotation` (L, 1, D/2), in float32 (float64 in a float64 model). One complex product: real ops on the even / odd
    halves run strided and are several times slower on CPU."""
    pairs = torch.view_as_complex(upcast(x).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def sdpa(q, k, v):
    """Attention over (B, L, N, D) tensors."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def block_causal_attention(q, k, v, chunk_tokens):
    """Attention in which the queries of each chunk see the keys of that chunk and all earlier ones.

    Equal to one attention with the block-causal mask of `block_causal_mask` (FastGen's FlexAttention mask), computed
    as one plain attention per chunk over its prefix: no L x L mask, and the fused kernels apply.
    """
    outputs, start = [], 0
    for n in chunk_tokens:
        end = start + n
        outputs.append(sdpa(q[:, start:end], k[:, :end], v[:, :end]))
        start = end
    return torch.cat(outputs, dim=1)


def block_causal_mask(chunk_tokens, device=None):
    """(L, L) boolean mask, True where query i may attend to key j: j's chunk is i's chunk or an earlier one."""
    chunk_of = torch.repeat_interleave(torch.arange(len(chunk_tokens), device=device), torch.tensor(chunk_tokens))
    return chunk_of[None, :] <= chunk_of[:, None]


class Attention(nn.Module):
    """Multi-head attention with q/k RMS-normed across all heads (diffusers' WanAttention). With `added_kv_dim`
    (I2V cross-attention) the queries also attend, separately, to image tokens, and the two results are summed."""

    def __init__(self, dim, heads, eps, added_kv_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        if added_kv_dim is not None:
            self.add_k_proj, self.add_v_proj = nn.Linear(added_kv_dim, dim), nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def split_heads(self, x):
        return x.unflatten(-1, (self.heads, -1))  # (B, L, D) -> (B, L, N, D / N)

    def qkv(self, x, rotation):
        """Rotated queries and keys and the values of the tokens x, each (B, L, N, D / N)."""
        q = apply_rope(self.split_heads(self.norm_q(self.to_q(x))), rotation)
        k = apply_rope(self.split_heads(self.norm_k(self.to_k(x))), rotation)
        return q, k, self.split_heads(self.to_v(x))

    def context_kv(self, context, image_context=None):
        """Keys and values of the text tokens (and of the image tokens for I2V): what a KV cache keeps once."""
        kv = [self.split_heads(self.norm_k(self.to_k(context))), self.split_heads(self.to_v(context))]
        if image_context is not None:
            kv += [self.split_heads(self.norm_added_k(self.add_k_proj(image_context)))]
            kv += [self.split_heads(self.add_v_proj(image_context))]
        return kv

    def cross(self, x, kv):
        q = self.split_heads(self.norm_q(self.to_q(x)))
        out = sdpa(q, kv[0], kv[1])
        if len(kv) == 4:  # I2V: the image tokens are attended to on their own
            out = out + sdpa(q, kv[2], kv[3])
        return self.to_out[0](out.flatten(2))


class GELUProj(nn.Module):
    def __init__(self, dim_in, dim_out, approximate):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """Linear, GELU, Linear; index 1 of `net` (dropout in diffusers) holds no weights."""

    def __init__(self, dim, hidden, out=None, approximate="tanh"):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, hidden, approximate), nn.Identity(), nn.Linear(hidden, out or dim))

    def forward(self, x):
        return self.net(x)


def modulate(x, frames, shift, scale):
    """x (B, F S, D) * (1 + scale) + shift with per-frame tables (B, F, 1, D), in one pass (addcmul)."""
    return torch.addcmul(shift, x.unflatten(1, (frames, -1)), 1 + scale).flatten(1, 2)


def gated_add(x, h, frames, gate):
    """The residual x + h * gate in float32 (float64 in a float64 model), per-frame gate (B, F, 1, D), in one pass
    (addcmul)."""
    return torch.addcmul(upcast(x).unflatten(1, (frames, -1)), h.unflatten(1, (frames, -1)), gate).flatten(1, 2)


class Block(nn.Module):
    """Self-attention, cross-attention, MLP; self-attention and MLP modulated by the time (adaLN, per frame)."""

    def __init__(self, cfg: Config):
        super().__init__()
        dim = cfg.inner_dim
        self.eps = cfg.eps
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm2 = LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def cross_kv(self, context, cache, layer):
        """The text (and image) keys and values of this block's cross-attention. A cache holds them once per layer,
        filled here on first use, and serves them only while gradients are off (training must reach the weights)."""
        cached = cache.context[layer] if cache is not None else None
        if cached is not None and not torch.is_grad_enabled():
            return cached
        kv = self.attn2.context_kv(*context)
        if cache is not None and cached is None:
            cache.context[layer] = [a.detach() for a in kv]
        return kv

    def forward(self, x, mod, rope, context, self_attend, cache=None, layer=None):
        """x (B, L, D), mod (B, F, 6, D) time projection, rope the complex RoPE rotation (L, 1, D/2), context the
        embedded (text, image or None) tokens (None when the cache holds this layer's keys and values),
        self_attend(q, k, v) the attention pattern of this call (bidirectional, block-causal or cached); cache and
        layer: where the cross-attention keys and values are kept between calls."""
        context_kv = self.cross_kv(context, cache, layer)
        frames = mod.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + upcast(mod))[:, :, :, None].unbind(2)
        h = modulate(layer_norm(x, self.eps), frames, shift1, scale1).type_as(x)
        h = self.attn1.to_out[0](self_attend(*self.attn1.qkv(h, rope)).flatten(2))
        x = gated_add(x, h, frames, gate1).type_as(x)
        x = x + self.attn2.cross(self.norm2(x).type_as(x), context_kv)
        h = modulate(layer_norm(x, self.eps), frames, shift2, scale2).type_as(x)
        return gated_add(x, self.ffn(h), frames, gate2).type_as(x)


class VaceBlock(Block):
    """A VACE block: a Wan block over the control tokens; the first one adds the (projected) control tokens to the
    video tokens, each one emits a hint (proj_out) for the main stack (VACE, Jiang et al. 2025, arXiv:2503.07598)."""

    def __init__(self, cfg: Config, first):
        super().__init__(cfg)
        self.proj_in = nn.Linear(cfg.inner_dim, cfg.inner_dim) if first else None
        self.proj_out = nn.Linear(cfg.inner_dim, cfg.inner_dim)

    def forward(self, x, control, mod, rope, context, self_attend, cache=None, layer=None):
        if self.proj_in is not None:
            control = self.proj_in(control) + x
        control = super().forward(control, mod, rope, context, self_attend, cache, layer)
        return self.proj_out(control), control


class ImageEmbedder(nn.Module):
    """CLIP image tokens (B, 257, 1280) -> (B, 257, D): LayerNorm, MLP with exact GELU, LayerNorm."""

    def __init__(self, image_dim, dim):
        super().__init__()
        self.norm1 = LayerNorm(image_dim, eps=1e-5)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        return self.norm2(self.ff(self.norm1(x).type_as(x)))


class MLP(nn.Module):
    def __init__(self, dim_in, dim, act):
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(dim_in, dim), nn.Linear(dim, dim), act

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Time -> (embedding, 6-row modulation), text tokens -> width D, CLIP image tokens -> width D."""

    def __init__(self, cfg: Config):
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP(cfg.freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLP(cfg.text_dim, dim, nn.GELU(approximate="tanh"))
        self.image_embedder = ImageEmbedder(cfg.image_dim, dim) if cfg.image_dim else None

    def time(self, t):
        """t (B, F) -> temb (B, F, D) for the head, modulation (B, F, 6, D) for the blocks."""
        dtype = self.time_proj.weight.dtype
        features = timestep_features(t, self.freq_dim, dtype).to(dtype)
        temb = self.time_embedder(features)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))


# ----------------------------------------------------------------------------
# Model


class KVCache:
    """What the causal form keeps between chunks: per self-attention layer (main blocks, then VACE blocks) the keys
    and values of the committed frames, preallocated for `num_frames`, and per cross-attention layer the text (and
    image) keys and values, computed once by the block on first use. Cached tensors are detached: no gradient flows
    into earlier chunks (Self-Forcing Sec. 3.2). One cache per prompt stream; CFG uses two. Device and dtype default
    to the model's."""

    def __init__(self, model, batch_size, num_frames, height, width, device=None, dtype=None):
        cfg = model.cfg
        _, ph, pw = cfg.patch_size
        self.tokens_per_frame = (height // ph) * (width // pw)
        self.num_frames = num_frames
        layers = cfg.num_layers + len(cfg.vace_layers)
        shape = (batch_size, num_frames * self.tokens_per_frame, cfg.num_attention_heads, cfg.attention_head_dim)
        if device is None or dtype is None:
            param = next(model.parameters())
            device, dtype = device or param.device, dtype or param.dtype
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.context = [None] * layers
        self.frames = 0  # committed frames

    def clear(self):
        self.frames, self.context = 0, [None] * len(self.context)


class WanModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        if cfg.vace_layers:
            if cfg.vace_layers[0] != 0 or max(cfg.vace_layers) >= cfg.num_layers:
                raise ValueError(f"vace_layers {cfg.vace_layers} must start at 0 and stay below {cfg.num_layers}")
            self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_channels, dim, cfg.patch_size, stride=cfg.patch_size)
            self.vace_blocks = nn.ModuleList([VaceBlock(cfg, i == 0) for i in range(len(cfg.vace_layers))])
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def unpatchify(self, tokens, grid):
        """(B, F' H' W', p_t p_h p_w C) -> (B, C, F, H, W); also turns block tokens into (B, D/4, F, H, W) features."""
        (f, h, w), (pt, ph, pw) = grid, self.cfg.patch_size
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], -1, f * pt, h * ph, w * pw)

    def forward(
        self,
        x,
        t,
        text,
        image_tokens=None,
        image_latents=None,
        control=None,
        control_scale=1.0,
        chunk_size=None,
        feature_indices=(),
        features_only=False,
    ):
        """Flow prediction for a whole clip.

        x (B, C, F, H, W) noisy latents; t flow time (B,) or per frame (B, F); text (B, L, 4096) umT5 states.
        I2V: image_tokens (B, 257, 1280) CLIP penultimate states, image_latents (B, 20, F, H, W) from `i2v_latents`.
        VACE: control (B, 96, F, H, W) and control_scale (float, or one per VACE block).
        chunk_size: None for bidirectional attention, else block-causal attention over chunks of that many frames
        (the first absorbing the remainder): the causal student's full-clip (teacher / diffusion forcing) pass.
        feature_indices: main blocks whose tokens are also returned as (B, D/4, F, H, W); with `features_only` only
        those, without running the later blocks.
        """
        frames = x.shape[2] // self.cfg.patch_size[0]
        attend = sdpa
        if chunk_size is not None:
            tokens_per_frame = math.prod(x.shape[3:]) // math.prod(self.cfg.patch_size[1:])
            chunk_tokens = [n * tokens_per_frame for n in chunk_frames(frames, chunk_size)]

            def attend(q, k, v):
                return block_causal_attention(q, k, v, chunk_tokens)

        return self._run(
            x, t, text, image_tokens, image_latents, control, control_scale, 0, lambda layer: attend,
            None, feature_indices, features_only,
        )  # fmt: skip

    def forward_chunk(
        self,
        x,
        t,
        text,
        cache,
        commit=False,
        start_frame=None,
        image_tokens=None,
        image_latents=None,
        control=None,
        control_scale=1.0,
    ):
        """Flow prediction for one chunk of frames that attends to the frames committed to `cache` before it.

        x (B, C, F_chunk, H, W) and the chunk's slices of image_latents / control; t (B,) or (B, F_chunk).
        The chunk starts at `start_frame` (default: the committed frames; an earlier frame rewinds the cache) and its
        RoPE positions are absolute. With `commit` its keys and values are written to the cache and it becomes
        context for the next chunk; calls without it (the denoising steps) leave the cache as it was.
        """
        start = cache.frames if start_frame is None else start_frame
        frames = x.shape[2] // self.cfg.patch_size[0]
        if start > cache.frames or start + frames > cache.num_frames:
            raise ValueError(f"chunk at frame {start} of {frames} frames: cache has {cache.frames} committed frames "
                             f"of {cache.num_frames}")  # fmt: skip
        begin, end = start * cache.tokens_per_frame, (start + frames) * cache.tokens_per_frame

        def attend_for(layer):
            def attend(q, k, v):
                k_all = torch.cat([cache.k[layer][:, :begin], k], dim=1)
                v_all = torch.cat([cache.v[layer][:, :begin], v], dim=1)
                if commit:
                    cache.k[layer][:, begin:end] = k.detach()
                    cache.v[layer][:, begin:end] = v.detach()
                return sdpa(q, k_all, v_all)

            return attend

        out = self._run(
            x, t, text, image_tokens, image_latents, control, control_scale, start, attend_for, cache, (), False
        )
        if commit:
            cache.frames = start + frames
        return out

    def _run(
        self, x, t, text, image_tokens, image_latents, control, control_scale, frame_offset, attend_for, cache,
        feature_indices, features_only,
    ):  # fmt: skip
        cfg = self.cfg
        B, _, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (T // pt, H // ph, W // pw)
        if image_latents is not None:
            x = torch.cat([x, image_latents.to(x.dtype)], dim=1)  # I2V: (B, 16 + 4 + 16, F, H, W)
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"the model takes {cfg.in_channels} input channels, got {x.shape[1]} (I2V models need "
                             f"image_latents from i2v_latents)")  # fmt: skip

        t = torch.as_tensor(t, device=x.device)
        t = (t.reshape(-1, 1) if t.ndim <= 1 else t).expand(B, grid[0])  # (B, F)
        temb, mod = self.condition_embedder.time(t)  # (B, F, D), (B, F, 6, D)
        angles = rope_angles(cfg, *grid, frame_offset, x.device)[:, None]  # (L, 1, D_head / 2)
        # cos + i sin, complex64 (FSDP keeps it; complex128 in a float64 model)
        real = precision(self.proj_out.weight.dtype)
        rope = torch.complex(angles.cos().to(real), angles.sin().to(real))

        # (B, L, D), L = F' H' W'; made contiguous once, else every residual add keeps the channels-first layout and
        # each norm of the blocks copies it again
        h = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        # The embedded text (and image) tokens, from which each block computes its cross-attention keys and values;
        # not needed when a cache already holds them all and gradients are off.
        fresh = cache is None or torch.is_grad_enabled() or any(c is None for c in cache.context)
        context = self._embed_context(text, image_tokens) if fresh else None

        hints = []
        if cfg.vace_layers:
            if control is None:
                raise ValueError("a VACE model needs control latents (B, vace_in_channels, F, H, W)")
            c = self.vace_patch_embedding(control.to(x.dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
            if c.shape != h.shape:
                raise ValueError(f"control tokens {tuple(c.shape)} do not match the video tokens {tuple(h.shape)}")
            scales = torch.as_tensor(control_scale, dtype=torch.float32).expand(len(cfg.vace_layers)).tolist()
            for j, block in enumerate(self.vace_blocks):
                layer = cfg.num_layers + j
                hint, c = block(h, c, mod, rope, context, attend_for(layer), cache, layer)
                hints.append(hint * scales[j])

        features, last = [], max(feature_indices, default=-1)
        for i, block in enumerate(self.blocks):
            if features_only and i > last:
                return features
            h = block(h, mod, rope, context, attend_for(i), cache, i)  # (B, L, D)
            if i in cfg.vace_layers:
                h = h + hints[cfg.vace_layers.index(i)]
            if i in feature_indices:
                features.append(self.unpatchify(h, grid))
        if features_only:
            return features

        shift, scale = (self.scale_shift_table[:, None] + upcast(temb)[:, :, None]).unbind(2)  # (B, F, D) each
        h = modulate(layer_norm(h, cfg.eps), grid[0], shift[:, :, None], scale[:, :, None])
        out = self.unpatchify(self.proj_out(h.type_as(x)), grid)  # (B, C_out, F, H, W)
        return (out, features) if len(feature_indices) else out

    def _embed_context(self, text, image_tokens):
        """Text tokens (B, L, text_dim) -> (B, L, D), and I2V image tokens -> (B, 257, D) (else None)."""
        text = self.condition_embedder.text_embedder(text.to(self.proj_out.weight.dtype))
        if image_tokens is None:
            return text, None
        if self.condition_embedder.image_embedder is None:
            raise ValueError("image_tokens given to a model without an image embedder (not I2V)")
        return text, self.condition_embedder.image_embedder(image_tokens.to(text.dtype)).type_as(text)


def i2v_latents(first_frame_latents):
    """Wan 2.1 I2V conditioning (B, 20, F, H, W): a 4-channel mask that marks the first latent frame as given (its
    4 channels stand for the VAE's 4 video frames per latent frame), then the VAE latents of the clip
    [first image, zeros, ...] (B, 16, F, H, W)."""
    B, _, T, H, W = first_frame_latents.shape
    mask = torch.zeros(B, 4, T, H, W, device=first_frame_latents.device, dtype=first_frame_latents.dtype)
    mask[:, :, 0] = 1
    return torch.cat([mask, first_frame_latents], dim=1)


def vace_control(inactive_latents, reactive_latents, mask, stride=(4, 8, 8)):
    """VACE's control input (B, 2 C + 64, F, H, W) (Jiang et al. 2025, Sec. 3.2; official vace.py): the VAE latents of
    the kept video, video * (1 - mask), and of the part to regenerate, video * mask (B, C, F, H, W) each; then the
    pixel mask (B, 1, T, 8 H, 8 W), 1 = regenerate, folded to latent resolution: each 8 x 8 patch of pixels becomes 64
    channels, and its T frames are resampled (nearest) to the F latent frames."""
    B, _, F_lat, H, W = inactive_latents.shape
    T, s = mask.shape[2], stride[1]
    folded = mask[:, 0].reshape(B, T, H, s, W, s).permute(0, 3, 5, 1, 2, 4).reshape(B, s * s, T, H, W)
    folded = F.interpolate(folded.float(), size=(F_lat, H, W), mode="nearest-exact").to(inactive_latents.dtype)
    return torch.cat([inactive_latents, reactive_latents, folded], dim=1)


# ----------------------------------------------------------------------------
# Samplers


def guided_flow(model, x, t, text, neg_text=None, guidance=1.0, **cond):
    """Flow with classifier-free guidance u + w (c - u), u from the negative prompt, in one batch of 2B."""
    if neg_text is None or guidance == 1.0:
        return model(x, t, text, **cond)
    t = torch.as_tensor(t, device=x.device)
    t2 = torch.cat([t.expand(len(x)), t.expand(len(x))]) if t.ndim <= 1 else torch.cat([t, t])
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim > 1 else v for k, v in cond.items()}
    c, u = model(torch.cat([x, x]), t2, torch.cat([text, neg_text.expand_as(text)]), **doubled).chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def sample_euler(model, noise, text, neg_text=None, steps=50, guidance=5.0, shift=None, progress=False, **cond):
    """The teacher's reference sampler: Euler on dx/dt = flow from t = 1 to 0 on shifted times (Wan uses UniPC on
    the same times; Euler needs more steps for the same quality). `cond`: image_tokens, image_latents, control..."""
    times = shift_time(
        torch.linspace(1, 0, steps + 1, dtype=torch.float64), model.cfg.shift if shift is None else shift
    )
    x = noise.double()
    for i in _progress(range(steps), progress):
        t = times[i].expand(len(x)).to(noise.device)
        v = guided_flow(model, x.to(noise.dtype), t, text, neg_text, guidance, **cond).double()
        x = x + (times[i + 1] - times[i]) * v
    return x.to(noise.dtype)


@torch.no_grad()
def sample_student(model, noise, text, times=SELF_FORCING_T_LIST, neg_text=None, guidance=1.0, generator=None, **cond):
    """Few-step sampling of a bidirectional student: predict x0, re-noise it to the next time with fresh noise."""
    times = torch.as_tensor(times, dtype=torch.float64)
    x = add_noise(torch.zeros_like(noise), noise, times[0])
    for i in range(len(times) - 1):
        x0 = to_x0(x, guided_flow(model, x, times[i].expand(len(x)), text, neg_text, guidance, **cond), times[i])
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = add_noise(x0, fresh, times[i + 1]) if times[i + 1] > 0 else x0
    return x


def causal_sample(
    model,
    noise,
    text,
    times=SELF_FORCING_T_LIST,
    chunk_size=3,
    neg_text=None,
    guidance=1.0,
    stochastic=True,
    context_noise=0.0,
    image_tokens=None,
    image_latents=None,
    control=None,
    control_scale=1.0,
    generator=None,
    on_chunk=None,
):
    """Chunk-by-chunk generation with a KV cache (CausVid / Self-Forcing inference, FastGen's AR sampler).

    For each chunk (the first absorbing the remainder): from noise at times[0], predict x0 and move to the next time,
    by fresh noise (`stochastic`, the students' default) or along the predicted noise (deterministic: with a many-step
    shifted grid this is the Euler ODE sampler of a causal teacher); then commit the finished chunk with one more pass
    at t = context_noise (0: the clean chunk; > 0: re-noised, which Self-Forcing found robust to its own errors).
    Returns the x0 latents (B, C, F, H, W); `on_chunk(start_frame, latents)` is called as each chunk is finished.
    Gradients follow torch's grad mode; Self-Forcing's training rollout, with
    gradient at one exit step per chunk, is written in the training script on top of `forward_chunk`.
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    B, _, T, H, W = noise.shape
    caches = [KVCache(model, B, T, H, W, device=noise.device, dtype=noise.dtype)]
    if neg_text is not None and guidance != 1.0:
        caches.append(KVCache(model, B, T, H, W, device=noise.device, dtype=noise.dtype))

    def flow(x, t, start, commit):
        sl = slice(start, start + x.shape[2])
        cond = dict(image_tokens=image_tokens, control_scale=control_scale)
        cond["image_latents"] = image_latents[:, :, sl] if image_latents is not None else None
        cond["control"] = control[:, :, sl] if control is not None else None
        c = model.forward_chunk(x, t, text, caches[0], commit=commit, start_frame=start, **cond)
        if len(caches) == 1:
            return c
        u = model.forward_chunk(x, t, neg_text.expand_as(text), caches[1], commit=commit, start_frame=start, **cond)
        return u + guidance * (c - u)

    chunks, start = [], 0
    for n in chunk_frames(T, chunk_size):
        x = add_noise(torch.zeros_like(noise[:, :, start : start + n]), noise[:, :, start : start + n], times[0])
        for i in range(len(times) - 1):
            t = times[i].expand(B).to(noise.device)
            x0 = to_x0(x, flow(x, t, start, False), times[i])
            if times[i + 1] == 0:
                x = x0
            elif stochastic:
                x = add_noise(
                    x0, torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), times[i + 1]
                )
            else:
                x = add_noise(x0, from_x0(x, x0, times[i], "eps"), times[i + 1])
        context = x
        if context_noise > 0:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            context = add_noise(x, eps, context_noise)
        flow(context, torch.full((B,), float(context_noise), dtype=torch.float64, device=noise.device), start, True)
        chunks.append(x)
        if on_chunk is not None:  # streaming: the caller may decode and show the chunk while the next one runs
            on_chunk(start, x)
        start += n
    return torch.cat(chunks, dim=2)


def _progress(iterable, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, unit="step", leave=False)


# ----------------------------------------------------------------------------
# Checkpoint loading


def _read_safetensors(path):
    """State dict from one safetensors file, or from a sharded `*.safetensors.index.json`. A file that cannot be read
    (truncated, empty, damaged, a folder) is a ValueError that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.endswith(".index.json"):
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, IsADirectoryError) as e:
            raise ValueError(f"{path} is not a safetensors index ({type(e).__name__}: {e}): write or download it again") from e  # fmt: skip
        state = {}
        for shard in shards:
            state.update(_read_safetensors(os.path.join(os.path.dirname(path), shard)))
        return state
    try:
        return load_file(path)
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; write or download it again") from e  # fmt: skip


def check_keys(model, state, source="checkpoint"):
    """Fail with a readable list unless `state` has exactly the model's keys and shapes, and only finite values (NaN
    or Inf weights would sample black images). `source`, the file, names it in the error."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or wrong:
        lines = [f"  missing:    {k} {expected[k]}" for k in missing]
        lines += [f"  unexpected: {k} {got[k]}" for k in unexpected]
        lines += [f"  shape:      {k} checkpoint {got[k]} != model {expected[k]}" for k in wrong]
        raise ValueError(
            f"{source} does not match the model:\n" + "\n".join(lines[:50]) + ("\n  ..." if len(lines) > 50 else "")
        )
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.is_meta and not v.isfinite().all())
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"NaN or Inf in {len(bad)} of {len(state)} tensors ({source}: {names}): the run that saved it diverged or "
            "the file is damaged; load an earlier checkpoint"
        )


# The official Wan layout (and Self-Forcing's) -> this file's (diffusers') names, module paths without .weight/.bias.
# Inside blocks.N. and vace_blocks.N. the BLOCK table applies; elsewhere the TOP table. Official norm3 is the
# cross-attention LayerNorm, which diffusers calls norm2 (their norm2 is the parameter-free pre-MLP norm).
OFFICIAL_KEYS = {
    "TOP": {
        "patch_embedding": "patch_embedding",
        "vace_patch_embedding": "vace_patch_embedding",
        "text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "text_embedding.2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.0": "condition_embedder.time_embedder.linear_1",
        "time_embedding.2": "condition_embedder.time_embedder.linear_2",
        "time_projection.1": "condition_embedder.time_proj",
        "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
        "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
        "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
        "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
        "head.head": "proj_out",
        "head.modulation": "scale_shift_table",
    },
    "BLOCK": {
        "modulation": "scale_shift_table",
        "self_attn.q": "attn1.to_q",
        "self_attn.k": "attn1.to_k",
        "self_attn.v": "attn1.to_v",
        "self_attn.o": "attn1.to_out.0",
        "self_attn.norm_q": "attn1.norm_q",
        "self_attn.norm_k": "attn1.norm_k",
        "cross_attn.q": "attn2.to_q",
        "cross_attn.k": "attn2.to_k",
        "cross_attn.v": "attn2.to_v",
        "cross_attn.o": "attn2.to_out.0",
        "cross_attn.norm_q": "attn2.norm_q",
        "cross_attn.norm_k": "attn2.norm_k",
        "cross_attn.k_img": "attn2.add_k_proj",
        "cross_attn.v_img": "attn2.add_v_proj",
        "cross_attn.norm_k_img": "attn2.norm_added_k",
        "norm3": "norm2",
        "ffn.0": "ffn.net.0.proj",
        "ffn.2": "ffn.net.2",
        "before_proj": "proj_in",
        "after_proj": "proj_out",
    },
}


def rename_official_key(key):
    """One official-layout key -> its name here; a key the table does not know is an error."""
    parts = key.split(".")
    prefix, table = "", OFFICIAL_KEYS["TOP"]
    if parts[0] in ("blocks", "vace_blocks") and len(parts) > 2:
        prefix, parts, table = f"{parts[0]}.{parts[1]}.", parts[2:], OFFICIAL_KEYS["BLOCK"]
    rest = ".".join(parts)
    if rest in table:  # a parameter named by the table itself (modulation)
        return prefix + table[rest]
    module, _, param = rest.rpartition(".")
    if module in table and param in ("weight", "bias"):
        return prefix + table[module] + "." + param
    raise ValueError(f"{key} is not a key of the official Wan layout this file knows")


def is_official_layout(state):
    return any(k.startswith(("head.head.", "text_embedding.", "time_embedding.")) for k in state)


def from_official(state):
    """Rename an official-layout state dict; fails if two keys land on one name."""
    renamed = {}
    for key, value in state.items():
        new = rename_official_key(key)
        if new in renamed:
            raise ValueError(f"two checkpoint keys map to {new}")
        renamed[new] = value
    return renamed


def read_pt(path, entry=None):
    """Tensors of a .pt checkpoint, unpickled with weights_only=True (plain containers of tensors only, no code runs).

    Self-Forcing files hold {"generator": {"model.blocks.0...": tensor}, ...} (self_forcing_dmd.pt also a
    "generator_ema" entry): `entry` picks one, default "generator" when the file is not a flat state dict. A common
    "model." prefix is removed.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a plain checkpoint of tensors (refused by torch.load(weights_only=True)): {e}"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a dict")
    if entry is not None or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        entry = entry or "generator"
        if entry not in obj or not isinstance(obj[entry], dict):
            raise ValueError(f"{path} has no state dict under {entry!r} (entries: {sorted(obj)}); pass entry=")
        obj = obj[entry]
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: the state dict holds non-tensor values")
    if obj and all(k.startswith("model.") for k in obj):
        obj = {k[len("model.") :]: v for k, v in obj.items()}
    return obj


def load_checkpoint(model, path, entry=None):
    """Load a diffusers-layout safetensors file (or sharded index), or an official-layout .pt / .safetensors
    (renamed through OFFICIAL_KEYS), strictly: any missing, unexpected or misshapen key is an error."""
    state = read_pt(path, entry) if path.endswith((".pt", ".pth")) else _read_safetensors(path)
    if is_official_layout(state):
        state = from_official(state)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path"}
_DIFFUSERS_FIXED = {"qk_norm": "rms_norm_across_heads", "pos_embed_seq_len": None}  # what this file implements


def config_from_diffusers(d):
    """Config from a diffusers WanTransformer3DModel / WanVACETransformer3DModel config.json; values this file does
    not implement are an error."""
    if d.get("_class_name", "WanTransformer3DModel") not in ("WanTransformer3DModel", "WanVACETransformer3DModel"):
        raise ValueError(f"config.json describes a {d['_class_name']}, not a Wan 2.1 transformer")
    known = {f.name for f in fields(Config)} - {"shift", "repo", "subfolder", "file"}
    if unknown := set(d) - known - _DIFFUSERS_IGNORED - _DIFFUSERS_FIXED.keys():
        raise ValueError(f"config.json has fields this file does not know: {sorted(unknown)}")
    for name, value in _DIFFUSERS_FIXED.items():
        if d.get(name, value) != value:
            raise ValueError(f"config.json sets {name}={d[name]!r}; only {value!r} is implemented")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
    if d.get("_class_name") != "WanVACETransformer3DModel":
        values.pop("vace_layers", None)
    elif "vace_layers" not in values:
        values["vace_layers"] = (0, 5, 10, 15, 20, 25, 30, 35)  # diffusers' default
    # diffusers' defaults differ from this Config's (its class defaults to the 14B layout)
    defaults = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
    return Config(**{**defaults, **values})


_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _hub_folder(repo, subfolder):
    """Local snapshot of a Hub repo's config.json and weights in `subfolder`, through the Hugging Face cache.

    huggingface_hub honours HF_HOME (cache location), HF_HUB_OFFLINE=1 and HF_TOKEN itself; LOCAL_FILES_ONLY=true
    (FastGen's switch) is honoured here."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    prefix = f"{subfolder}/" if subfolder else ""
    shards = "diffusion_pytorch_model-*"  # diffusion_pytorch_model-0000N-of-0000M.safetensors, if sharded
    patterns = [prefix + name for name in ("config.json", _WEIGHTS, _WEIGHTS + ".index.json", shards)]
    local_only = os.environ.get("LOCAL_FILES_ONLY", "").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only)
    except GatedRepoError as e:
        raise RuntimeError(
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and set HF_TOKEN to a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise RuntimeError(f"{repo} is not a known model name ({', '.join(CONFIGS)}), local path or Hub repo") from e
    except LocalEntryNotFoundError as e:  # not cached, and no download: say why, as it is
        from huggingface_hub import constants, get_token

        off = [name for name, on in (("HF_HUB_OFFLINE=1", constants.HF_HUB_OFFLINE), ("LOCAL_FILES_ONLY=true", local_only)) if on]  # fmt: skip
        why = f"downloads are off ({' and '.join(off)})" if off else "the Hugging Face Hub could not be reached (no network?)"  # fmt: skip
        token = "" if get_token() else " (a gated repo also needs HF_TOKEN)"
        raise FileNotFoundError(
            f"{repo} is not in the Hugging Face cache (HF_HOME) and {why}: fetch it once with network access, "
            f"`hf download {repo} --include '{prefix}*'`{token}"
        ) from e
    return os.path.join(folder, subfolder)


def _hub_file(repo, filename):
    from huggingface_hub import hf_hub_download

    local_only = os.environ.get("LOCAL_FILES_ONLY", "").lower() in ("1", "true", "yes")
    return hf_hub_download(repo, filename, local_files_only=local_only)


def _is_repo_id(name):
    """Spelled like a Hub repo id, org/name, rather than a path to a file."""
    org, _, repo = name.partition("/")
    return bool(org and repo) and "/" not in repo and not name.startswith(".") and not name.endswith(".safetensors")


def from_pretrained(
    name_or_path, config=None, subfolder="transformer", entry=None, root=None, device="cpu", dtype=torch.float32
):
    """Build a Wan transformer on the meta device and load its weights strictly.

    `name_or_path`: a CONFIGS name (its Hub repo; for the self-forcing-* names Self-Forcing's .pt, looked up first under
    `root` (default $CKPT_ROOT_DIR or ./checkpoints) in the seed's Self-Forcing/ folder, then in the Hugging Face
    cache), a Hub repo id, a
    local diffusers folder (the pipeline root or its `transformer/`), or one file: .safetensors (diffusers or official
    keys), a sharded .index.json, or an official-layout .pt (Self-Forcing; `entry` picks its state dict). The
    architecture comes from `config` (a CONFIGS name or a Config), else the preset, else config.json next to the weights.
    """
    if isinstance(config, str):
        config = CONFIGS[config]
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(f"{name_or_path} has no released weights; build it with WanModel(CONFIGS[...])")
        config = config or preset
        if preset.file:
            local = os.path.join(root or os.environ.get("CKPT_ROOT_DIR", "checkpoints"), "Self-Forcing", preset.file)
            path = local if os.path.exists(local) else _hub_file(preset.repo, preset.file)
            return _load(path, config, entry, device, dtype)
        folder = _hub_folder(preset.repo, preset.subfolder)
    elif os.path.isfile(name_or_path):
        folder = os.path.dirname(name_or_path)
    elif os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder)
        folder = folder if os.path.isdir(folder) else name_or_path
    elif _is_repo_id(name_or_path):
        folder = _hub_folder(name_or_path, subfolder)
    else:
        raise FileNotFoundError(f"{name_or_path} is not a known model name ({', '.join(CONFIGS)}), file or Hub repo")

    if os.path.isfile(name_or_path):
        weights = name_or_path
    elif os.path.exists(os.path.join(folder, _WEIGHTS)):
        weights = os.path.join(folder, _WEIGHTS)
    elif os.path.exists(os.path.join(folder, _WEIGHTS + ".index.json")):
        weights = os.path.join(folder, _WEIGHTS + ".index.json")
    else:
        raise FileNotFoundError(f"no {_WEIGHTS} (or its sharded index) in {folder}")
    if config is None:
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json next to {weights}; pass config=, a Config or a CONFIGS name")
        with open(config_path) as f:
            config = config_from_diffusers(json.load(f))
    return _load(weights, config, entry, device, dtype)


def _load(path, config, entry, device, dtype):
    if config is None:
        raise ValueError(f"pass config= (a Config or a CONFIGS name) to load {path}")
    with torch.device("meta"):
        model = WanModel(config)
    load_checkpoint(model, path, entry)
    return model.to(device=device, dtype=dtype).eval()


if __name__ == "__main__":
    torch.manual_seed(0)
    for name in ("tiny", "tiny-i2v", "tiny-vace"):
        model = WanModel(CONFIGS[name]).eval()
        x, t, text = torch.randn(1, 4, 3, 8, 8), torch.tensor([0.7]), torch.randn(1, 6, 32)
        cond = {}
        if name == "tiny-i2v":
            cond = dict(image_tokens=torch.randn(1, 5, 20), image_latents=torch.randn(1, 8, 3, 8, 8))
        if name == "tiny-vace":
            cond = dict(control=torch.randn(1, 12, 3, 8, 8))
        with torch.no_grad():
            out, features = model(x, t, text, feature_indices={1}, **cond)
            causal = causal_sample(model, torch.randn(1, 4, 3, 8, 8), text, chunk_size=1, **cond)
        n = sum(p.numel() for p in model.parameters())
        print(f"wan {name}: {n:,} parameters, out {tuple(out.shape)}, features {tuple(features[0].shape)}, "
              f"causal rollout {tuple(causal.shape)}")  # fmt: skip
