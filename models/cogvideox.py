"""CogVideoX: a text-to-video diffusion transformer over 3-D VAE latents (16 x 13 x 60 x 90 for 49 frames at 480x720).

Paper: Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer", ICLR 2025
(arXiv:2408.06072). Official code: https://github.com/THUDM/CogVideo (sat/); the checkpoints used here are the diffusers
`CogVideoXTransformer3DModel` files of THUDM/CogVideoX-2b and THUDM/CogVideoX-5b (`transformer/config.json` and
`diffusion_pytorch_model.safetensors`, sharded with an index for the 5b), and module names equal their keys
(`patch_embed.proj.weight`, `transformer_blocks.0.attn1.norm_q.weight`, `norm_out.linear.weight`, ...), so they load
strictly.

The network: T5 text tokens (226 x 4096) and 2x2 video patches share one sequence and full attention (Sec. 2.2);
"expert" adaptive LayerNorms modulate the text and the video tokens with separate shift/scale/gate from the time
embedding; q and k get a LayerNorm per head. Positions: the 2b adds a fixed 3-D sin-cos table to the video tokens;
the 5b rotates q and k of the video tokens by a 3-D RoPE on a grid cropped into the 30 x 45 training grid, as
diffusers' CogVideoXPipeline computes it.

Conventions of this project: videos are (B, C, T, H, W); diffusers' transformer takes (B, T, C, H, W), and the model
permutes inside. Time t is the DDPM timestep in [0, 999] (t = 999 is pure noise under zero terminal SNR), fed to the
network as is; the network predicts v (Salimans & Ho 2022). The schedule is scaled-linear betas with the SNR divided by
`snr_shift_scale` (3 for the 2b, 1 for the 5b; the scheduler_config.json of each release) and rescaled to zero
terminal SNR (Lin et al. 2024, Alg. 1), as CogVideoXDDIMScheduler builds it.

Left out: CogVideoX 1.5 (3-D patches, `patch_size_t`), the image-to-video models (learned positions, `ofs` embedding,
image latents in the channels), the 5b's own DPM-Solver sampler (CogVideoXDPMScheduler; DDIM runs both), dynamic CFG,
and FastGen's logvar head.

    model = from_pretrained("cogvideox-2b")                  # THUDM/CogVideoX-2b, subfolder transformer
    noise = torch.randn(1, 16, 13, 60, 90)                   # (B, C, T, H, W) latents of 49 frames at 480x720
    latents = sample_ddim(model, noise, t5_embeds, negative_embeds, steps=50, guidance=6.0)  # T5 (B, 226, 4096)
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
    num_attention_heads: int = 30  # 30 for the 2b, 48 for the 5b
    attention_head_dim: int = 64  # token width = heads x head dim
    in_channels: int = 16  # latent channels
    out_channels: int = 16
    time_embed_dim: int = 512  # width of the time embedding that drives every modulation
    text_embed_dim: int = 4096  # T5-XXL hidden size
    num_layers: int = 30  # 30 for the 2b, 42 for the 5b
    patch_size: int = 2  # side of the square patches of each latent frame
    norm_eps: float = 1e-5  # LayerNorms of the blocks and the output (q/k norms use 1e-6)
    attention_bias: bool = True  # biases on q, k, v
    use_rotary_positional_embeddings: bool = False  # False: 3-D sin-cos table (2b); True: 3-D RoPE (5b)
    spatial_interpolation_scale: float = 1.875  # sin-cos table: positions are divided by these
    temporal_interpolation_scale: float = 1.0
    sample_height: int = 60  # training latent size; RoPE crops the input grid into this one (/ patch)
    sample_width: int = 90
    sample_frames: int = 49  # training video frames (13 latent frames with temporal_compression_ratio 4)
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226  # T5 tokens the releases were trained with (pad or cut prompts to this)
    snr_shift_scale: float = 3.0  # schedule: SNR divided by this; 3.0 for the 2b, 1.0 for the 5b
    repo: str = ""  # Hugging Face Hub repo holding the weights
    subfolder: str = "transformer"  # folder of the repo with config.json and the weights


# fmt: off
_TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16, text_embed_dim=32,
             num_layers=2, sample_height=8, sample_width=12, sample_frames=9, max_text_seq_length=6)
_ROPE = dict(use_rotary_positional_embeddings=True, snr_shift_scale=1.0)
CONFIGS = {
    "cogvideox-2b": Config(repo="THUDM/CogVideoX-2b"),
    "cogvideox-5b": Config(num_attention_heads=48, num_layers=42, **_ROPE, repo="THUDM/CogVideoX-5b"),
    "tiny-2b":      Config(**_TINY),
    "tiny-5b":      Config(**_TINY, **_ROPE),
}
# fmt: on

# ----------------------------------------------------------------------------
# Schedule. Time math runs in float64 on purpose: abar spans 1..0 and the conversions divide by alpha and sigma.

PRED_TYPE = "v"
NUM_TIMESTEPS = 1000
T_RANGE = (0.0, 999.0)  # DDPM timesteps; abar(999) = 0 (zero terminal SNR)


def alphas_cumprod(snr_shift_scale):
    """abar[i] of CogVideoXDDIMScheduler, float64: scaled-linear betas 0.00085..0.012 (sqrt-spaced), the SNR
    abar / (1 - abar) divided by `snr_shift_scale`, then sqrt(abar) shifted and scaled to reach 0 at the last step
    while keeping the first (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, dim=0)
    s = snr_shift_scale
    abar = abar / (s + (1 - s) * abar)  # abar' / (1 - abar') = abar / (s (1 - abar))
    root = abar.sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return root**2


def _alpha_and_slope(t, snr_shift_scale):
    """alpha(t) = sqrt(abar) and d alpha / dt, linear between the integer timesteps (exact at them). Linear in sqrt(abar),
    the coordinate of the zero-SNR rescaling, because abar(999) = 0 leaves log abar no value there."""
    table = alphas_cumprod(snr_shift_scale).sqrt().to(t.device)
    i = t.floor().clamp(0, NUM_TIMESTEPS - 2).long()
    slope = table[i + 1] - table[i]
    return table[i] + (t - i) * slope, slope


def alpha(t, snr_shift_scale):
    return _alpha_and_slope(torch.as_tensor(t, dtype=torch.float64), snr_shift_scale)[0]


def sigma(t, snr_shift_scale):
    return (1 - alpha(t, snr_shift_scale) ** 2).clamp(min=0).sqrt()


def alpha_prime(t, snr_shift_scale):
    return _alpha_and_slope(torch.as_tensor(t, dtype=torch.float64), snr_shift_scale)[1]


def sigma_prime(t, snr_shift_scale):
    """d/dt sqrt(1 - alpha^2) = -alpha alpha' / sigma (sigma >= sqrt(1 - abar[0]) > 0)."""
    a, da = _alpha_and_slope(torch.as_tensor(t, dtype=torch.float64), snr_shift_scale)
    return -a * da / (1 - a**2).sqrt()


def _expand(t, x):
    """Broadcast a per-sample time [B] (or scalar) against x [B, ...], in float64."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def _safe(d, eps=1e-6):
    """Keep a denominator away from zero without changing its sign."""
    return torch.where(d >= 0, d.clamp(min=eps), d.clamp(max=-eps))


def to_x0(x_t, out, t, pred_type, snr_shift_scale):
    """Convert a raw prediction of type `pred_type` at (x_t, t) to an x0 prediction (x_t = alpha x0 + sigma eps)."""
    x, y = x_t.double(), out.double()
    a, s, da, ds = (f(_expand(t, x), snr_shift_scale) for f in (alpha, sigma, alpha_prime, sigma_prime))
    if pred_type == "x0":
        x0 = y
    elif pred_type == "eps":
        x0 = (x - s * y) / _safe(a)
    elif pred_type == "v":  # v = alpha eps - sigma x0 with alpha^2 + sigma^2 = 1 (Salimans & Ho 2022, Sec. 4)
        x0 = a * x - s * y
    elif pred_type == "flow":  # flow = dx_t/dt = alpha' x0 + sigma' eps
        x0 = (x * ds / _safe(s) - y) / _safe(a * ds / _safe(s) - da)
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return x0.to(out.dtype)


def from_x0(x_t, x0, t, pred_type, snr_shift_scale):
    """Express an x0 prediction at (x_t, t) as a prediction of type `pred_type`."""
    x, y = x_t.double(), x0.double()
    a, s, da, ds = (f(_expand(t, x), snr_shift_scale) for f in (alpha, sigma, alpha_prime, sigma_prime))
    eps = (x - a * y) / _safe(s)
    if pred_type == "x0":
        out = y
    elif pred_type == "eps":
        out = eps
    elif pred_type == "v":
        out = a * eps - s * y
    elif pred_type == "flow":
        out = da * y + ds * eps
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return out.to(x0.dtype)


def convert(x_t, out, t, src, dst, snr_shift_scale):
    """Convert a prediction between the types x0, eps, v and flow (through x0)."""
    if src == dst:
        return out
    return from_x0(x_t, to_x0(x_t, out, t, src, snr_shift_scale), t, dst, snr_shift_scale)


def t_list(steps):
    """Default few-step times for students: FastGen's linspace(0.999, 0, steps + 1) in DDPM timesteps (x 1000).

    1 step: [999, 0]; 4 steps: [999, 749.25, 499.5, 249.75, 0]."""
    return torch.linspace(T_RANGE[1], 0.0, steps + 1, dtype=torch.float64)


def sample_t(n, kind="logitnormal", p_mean=0.0, p_std=1.0, t_min=1.0, t_max=999.0, generator=None, device=None):
    """Training-time timesteps, float64 [n], in [t_min, t_max] (FastGen's [0.001, 0.999] x 1000 by default).

    logitnormal: t = t_min + (t_max - t_min) sigmoid(p_mean + p_std n), FastGen's default.
    uniform:     t ~ U[t_min, t_max].
    discrete:    a uniform integer timestep in [t_min, t_max], as CogVideoX itself was trained.
    """
    if kind == "logitnormal":
        u = torch.sigmoid(p_mean + p_std * torch.randn(n, dtype=torch.float64, generator=generator))
    elif kind == "uniform":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
    elif kind == "discrete":
        t = torch.randint(math.ceil(t_min), math.floor(t_max) + 1, (n,), generator=generator).double()
        return t.to(device)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; expected logitnormal, uniform or discrete")
    return (t_min + (t_max - t_min) * u).clamp(t_min, t_max).to(device)


def ddim_timesteps(steps):
    """The scheduler's 'trailing' spacing: round(1000 - i 1000 / steps) - 1 for i < steps; 4 steps: 999, 749, 499, 249."""
    return [round(NUM_TIMESTEPS - i * NUM_TIMESTEPS / steps) - 1 for i in range(steps)]


# ----------------------------------------------------------------------------
# Positions


def precision(dtype):
    """The precision of the position and time tables and of RoPE: float32 (as the original computes them) for float32
    and half-precision models, float64 for a float64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_features(t, dim, dtype=torch.float32):
    """Sinusoidal features [cos | sin] of the timestep with frequencies 10000^(-i / (dim / 2)), in float32 like the
    original: at t up to 999 the rounding of the angles is visible in the output. In float64 for a float64 `dtype`
    (the model's)."""
    half = dim // 2
    real = precision(dtype)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=real, device=t.device) / half)
    angles = t.to(real)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _sincos(pos, dim):
    """1-D sin-cos embedding [sin | cos] of positions (N,) with frequencies 10000^(-i / (dim / 2)), float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = torch.outer(pos, omega)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim, frames, height, width, spatial_scale, temporal_scale, device=None, dtype=torch.float32):
    """The 2b's fixed position table, float32 (float64 for a float64 `dtype`) (frames x height x width, dim) for tokens
    in (t, y, x) row-major order: channels [time (dim / 4) | column (3 dim / 8) | row (3 dim / 8)], positions divided
    by the interpolation scales. The angles are float64 on purpose; diffusers takes positions in float32, which
    differs by < 1e-6."""
    t = torch.arange(frames, dtype=torch.float64, device=device) / temporal_scale
    y = torch.arange(height, dtype=torch.float64, device=device) / spatial_scale
    x = torch.arange(width, dtype=torch.float64, device=device) / spatial_scale
    spatial = dim * 3 // 4
    real = precision(dtype)
    col = _sincos(x, spatial // 2).to(real)[None, :, :].expand(height, -1, -1)  # (height, width, 3 dim / 8)
    row = _sincos(y, spatial // 2).to(real)[:, None, :].expand(-1, width, -1)
    space = torch.cat([col, row], dim=-1).reshape(1, height * width, spatial).expand(frames, -1, -1)
    time = _sincos(t, dim // 4).to(real)[:, None, :].expand(-1, height * width, -1)
    return torch.cat([time, space], dim=-1).reshape(frames * height * width, dim)


def crop_region(grid_height, grid_width, base_height, base_width):
    """Where an input token grid sits in the training grid (CogVideoXPipeline's get_resize_crop_region_for_grid): resized
    to fit the base grid keeping its aspect, centred. Returns ((top, left), (bottom, right)); Python's round, as theirs."""
    if grid_height / grid_width > base_height / base_width:
        height, width = base_height, round(base_height / grid_height * grid_width)
    else:
        height, width = round(base_width / grid_width * grid_height), base_width
    top, left = round((base_height - height) / 2), round((base_width - width) / 2)
    return (top, left), (top + height, left + width)


def rope_3d(
    head_dim, frames, grid_height, grid_width, base_height, base_width, theta=10000.0, device=None, dtype=torch.float32
):
    """The 5b's rotary tables (cos, sin), each (frames x grid_height x grid_width, head_dim): channels [time (head_dim
    / 4) | row (3/8) | column (3/8)], every frequency repeated for the (even, odd) pair it rotates. Rows and columns
    are spread over the crop region of the training grid: position linspace(start, end (n - 1) / n, n), as diffusers'
    get_3d_rotary_pos_embed. float64 on purpose; diffusers computes the angles in float32 (< 3e-6 rad apart). Returned
    in float32, float64 for a float64 `dtype`."""
    (top, left), (bottom, right) = crop_region(grid_height, grid_width, base_height, base_width)
    f64 = dict(dtype=torch.float64, device=device)
    rows = torch.linspace(top, bottom * (grid_height - 1) / grid_height, grid_height, **f64)
    cols = torch.linspace(left, right * (grid_width - 1) / grid_width, grid_width, **f64)
    times = torch.arange(frames, **f64)

    def angles(pos, dim):
        freqs = theta ** -(torch.arange(0, dim, 2, **f64) / dim)
        return torch.outer(pos, freqs).repeat_interleave(2, dim=1)

    d_time, d_space = head_dim // 4, head_dim // 8 * 3
    shape = (frames, grid_height, grid_width)
    a = torch.cat(
        [
            angles(times, d_time)[:, None, None].expand(*shape, -1),
            angles(rows, d_space)[None, :, None].expand(*shape, -1),
            angles(cols, d_space)[None, None, :].expand(*shape, -1),
        ],
        dim=-1,
    ).reshape(-1, head_dim)
    return a.cos().to(precision(dtype)), a.sin().to(precision(dtype))


def apply_rope(x, cos, sin):
    """Rotate each (even, odd) channel pair of x (B, N, L, D) by the angle whose cos/sin are given, in float32 (float64
    for float64 x)."""
    real = precision(x.dtype)
    even, odd = x.to(real).unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    return (x.to(real) * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------
# Building blocks


class PatchEmbed(nn.Module):
    """Video: p x p patches of each frame -> tokens in (t, y, x) order; text: a linear map of the T5 states."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_proj = nn.Linear(cfg.text_embed_dim, dim)

    def forward(self, x):
        B, C, T, H, W = x.shape
        frames = self.proj(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B T, D, H / p, W / p)
        return frames.reshape(B, T, frames.shape[1], -1).transpose(2, 3).flatten(1, 2)  # (B, T H W / p^2, D)


class TimestepEmbedding(nn.Module):
    """MLP on the timestep features: (B, D) -> (B, time_embed_dim)."""

    def __init__(self, dim, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, features):
        return self.linear_2(F.silu(self.linear_1(features)))


class ExpertNorm(nn.Module):
    """Expert adaptive LayerNorm (CogVideoX Sec. 2.2): one LayerNorm, separate shift/scale/gate for video and text
    tokens from the time embedding."""

    def __init__(self, time_embed_dim, dim, eps):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, video, text, temb):
        shift, scale, gate, text_shift, text_scale, text_gate = self.linear(F.silu(temb))[:, None].chunk(6, dim=-1)
        video = self.norm(video) * (1 + scale) + shift
        text = self.norm(text) * (1 + text_scale) + text_shift
        return video, text, gate, text_gate


class Attention(nn.Module):
    """Full self-attention over the joint [text, video] sequence, LayerNorm on q and k per head, RoPE on video tokens."""

    def __init__(self, dim, heads, head_dim, bias):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=bias)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def forward(self, x, text_length, rope=None):
        q, k, v = (f(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)  # (B, N, L, D)
        if rope is not None:
            n = text_length
            q = torch.cat([q[:, :, :n], apply_rope(q[:, :, n:], *rope)], dim=2)
            k = torch.cat([k[:, :, :n], apply_rope(k[:, :, n:], *rope)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, L, heads x D)


class GELUProjection(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        # net.1 is diffusers' dropout (p = 0); kept so the second linear is named net.2 as in the checkpoints.
        self.net = nn.Sequential(GELUProjection(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Expert norm -> joint attention -> gated residual; expert norm -> shared MLP on both -> gated residual."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.norm1 = ExpertNorm(cfg.time_embed_dim, dim, cfg.norm_eps)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias)
        self.norm2 = ExpertNorm(cfg.time_embed_dim, dim, cfg.norm_eps)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, video, text, temb, rope=None):
        n = text.shape[1]
        norm_video, norm_text, gate, text_gate = self.norm1(video, text, temb)
        out = self.attn1(torch.cat([norm_text, norm_video], dim=1), n, rope)  # (B, L_text + L_video, D)
        video, text = video + gate * out[:, n:], text + text_gate * out[:, :n]
        norm_video, norm_text, gate, text_gate = self.norm2(video, text, temb)
        out = self.ff(torch.cat([norm_text, norm_video], dim=1))
        return video + gate * out[:, n:], text + text_gate * out[:, :n]


class OutputNorm(nn.Module):
    """Final adaptive LayerNorm: shift and scale (in that order) from the time embedding."""

    def __init__(self, time_embed_dim, dim, eps):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, temb):
        shift, scale = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


# ----------------------------------------------------------------------------
# Model


class CogVideoXTransformer(nn.Module):
    """CogVideoX's denoiser: (B, C, T, H, W) latents, timesteps, T5 states -> v prediction (B, C, T, H, W)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.dim = dim
        self.patch_embed = PatchEmbed(cfg, dim)
        self.time_embedding = TimestepEmbedding(dim, cfg.time_embed_dim)
        self.transformer_blocks = nn.ModuleList([Block(cfg, dim) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.norm_out = OutputNorm(cfg.time_embed_dim, dim, cfg.norm_eps)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    def positions(self, frames, grid_height, grid_width, device, dtype=torch.float32):
        """(table, None) of sin-cos positions for the 2b, (None, (cos, sin)) RoPE tables for the 5b; made on `device`
        at each call (diffusers keeps the 2b table of the training size as a buffer, outside the checkpoint); float32,
        float64 for a float64 `dtype` (the model's)."""
        cfg = self.cfg
        if not cfg.use_rotary_positional_embeddings:
            scales = (cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale)
            return sincos_3d(self.dim, frames, grid_height, grid_width, *scales, device=device, dtype=dtype), None
        base = (cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size)
        return None, rope_3d(cfg.attention_head_dim, frames, grid_height, grid_width, *base, device=device, dtype=dtype)

    def unpatchify(self, tokens, frames, grid_height, grid_width):
        """(B, T h w, c p p) -> (B, c, T, h p, w p)."""
        p = self.cfg.patch_size
        x = tokens.reshape(tokens.shape[0], frames, grid_height, grid_width, -1, p, p)
        return x.permute(0, 4, 1, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)

    def forward(self, x, t, text, feature_indices=(), features_only=False):
        """x: (B, C, T, H, W) noisy latents, t: (B,) or scalar DDPM timestep in [0, 999], text: (B, L, 4096) T5 states.

        Returns the v prediction (B, C, T, H, W). With `feature_indices` (block indices) also the list of those
        blocks' video tokens as (B, D / p^2, T, H, W) (FastGen's layout for discriminator heads); with `features_only`
        only that list, without running the blocks after the last index.
        """
        B, C, T, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        if H % p or W % p:
            raise ValueError(f"latent sides ({H}, {W}) must be multiples of the patch size {p}")
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(B)
        dtype = self.proj_out.weight.dtype
        temb = self.time_embedding(timestep_features(t, self.dim, dtype).to(dtype))  # (B, time_embed_dim)

        video = self.patch_embed(x.to(dtype))  # (B, T h w, D)
        text = self.patch_embed.text_proj(text.to(dtype))  # (B, L, D)
        table, rope = self.positions(T, h, w, x.device, dtype)
        if table is not None:
            video = video + table.to(dtype)

        features, last = [], max(feature_indices, default=-1)
        for i, block in enumerate(self.transformer_blocks):
            if features_only and i > last:
                return features
            video, text = block(video, text, temb, rope)  # (B, T h w, D), (B, L, D)
            if i in feature_indices:
                features.append(self.unpatchify(video, T, h, w))
        if features_only:
            return features
        video = self.proj_out(self.norm_out(self.norm_final(video), temb))  # (B, T h w, p p C)
        out = self.unpatchify(video, T, h, w)  # (B, C, T, H, W)
        return (out, features) if len(feature_indices) else out


# ----------------------------------------------------------------------------
# Samplers


def guided(model, x, t, text, negative_text=None, guidance=1.0):
    """v prediction with classifier-free guidance u + w (c - u), u from the negative prompt's T5 states (CogVideoX
    uses the empty prompt), in one batch of 2B."""
    if guidance == 1.0:
        return model(x, t, text)
    if negative_text is None:
        raise ValueError("guidance needs negative_text: the T5 states of the negative (or empty) prompt")
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
    uncond, cond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([negative_text, text])).chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample_ddim(model, noise, text, negative_text=None, steps=50, guidance=6.0, progress=False):
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) on the v prediction, as CogVideoXDDIMScheduler steps
    it on its trailing timesteps: x_prev = a x + b x0 with a = sqrt((1 - abar_prev) / (1 - abar)),
    b = sqrt(abar_prev) - sqrt(abar) a, a form that stays finite at abar = 0. Returns latents (B, C, T, H, W).

    NOTE: like the scheduler, each step lands on t - 1000 // steps, which for step counts that do not divide 1000
    is one off the next timestep of the list (3 steps: 999 -> 666 -> 333, then evaluated at 332)."""
    abar = alphas_cumprod(model.cfg.snr_shift_scale)
    x = noise.double()
    for t in _progress(ddim_timesteps(steps), progress):
        v = guided(model, x.to(noise.dtype), float(t), text, negative_text, guidance).double()
        prev = t - NUM_TIMESTEPS // steps
        abar_t, abar_prev = abar[t], abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = abar_t.sqrt() * x - (1 - abar_t).sqrt() * v
        a = ((1 - abar_prev) / (1 - abar_t)).sqrt()
        x = a * x + (abar_prev.sqrt() - abar_t.sqrt() * a) * x0
    return x.to(noise.dtype)


@torch.no_grad()
def sample_student(model, noise, text, times=None, steps=1, negative_text=None, guidance=1.0, generator=None):
    """Few-step student sampling (FastGen's default): predict x0, re-noise it to the next time with fresh noise."""
    s = model.cfg.snr_shift_scale
    times = t_list(steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
    x = noise * sigma(times[0], s).to(noise.dtype)
    for i in range(len(times) - 1):
        t = times[i].expand(len(x)).to(x.device)
        x0 = to_x0(x, guided(model, x, t, text, negative_text, guidance), t, PRED_TYPE, s)
        if times[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = alpha(times[i + 1], s).to(x.dtype) * x0 + sigma(times[i + 1], s).to(x.dtype) * fresh
    return x0


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


def load_checkpoint(model, path):
    """Load a diffusers-layout safetensors file (or sharded index) into `model`, strictly (assign=True keeps
    meta-built models cheap)."""
    state = _read_safetensors(path)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
_DIFFUSERS_FIXED = {  # the only values this file implements
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_elementwise_affine": True,
    "dropout": 0.0,
    "patch_size_t": None,
    "ofs_embed_dim": None,
    "use_learned_positional_embeddings": False,
    "patch_bias": True,
}


def config_from_diffusers(d, snr_shift_scale=None):
    """Config from a diffusers CogVideoXTransformer3DModel config.json; values this file does not implement are an
    error. The schedule is not in that file: `snr_shift_scale` comes from the repo's scheduler_config.json, else the
    release's (1.0 with RoPE, the 5b; 3.0 without, the 2b)."""
    if d.get("_class_name", "CogVideoXTransformer3DModel") != "CogVideoXTransformer3DModel":
        raise ValueError(f"config.json describes a {d['_class_name']}, not a CogVideoXTransformer3DModel")
    known = {f.name for f in fields(Config)} - {"repo", "subfolder", "snr_shift_scale"}
    if unknown := set(d) - known - _DIFFUSERS_IGNORED - _DIFFUSERS_FIXED.keys():
        raise ValueError(f"config.json has fields this CogVideoX transformer does not know: {sorted(unknown)}")
    for name, value in _DIFFUSERS_FIXED.items():
        if d.get(name, value) != value:
            raise ValueError(f"config.json sets {name}={d[name]!r}; only {value!r} is implemented")
    cfg = Config(**{k: v for k, v in d.items() if k in known})
    if snr_shift_scale is None:
        snr_shift_scale = 1.0 if cfg.use_rotary_positional_embeddings else 3.0
    return replace(cfg, snr_shift_scale=snr_shift_scale)


def _scheduler_shift(folder):
    """snr_shift_scale of the repo's scheduler/scheduler_config.json next to the transformer folder, or None."""
    path = os.path.join(os.path.dirname(os.path.normpath(folder)), "scheduler", "scheduler_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("snr_shift_scale")


_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _hub_folder(repo, subfolder):
    """Local snapshot of a Hub repo's config.json, weights (sharded or not) and scheduler config, through the Hugging
    Face cache. huggingface_hub honours HF_HOME, HF_HUB_OFFLINE=1 and HF_TOKEN itself; LOCAL_FILES_ONLY=true (FastGen's
    switch) is honoured here."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    prefix = f"{subfolder}/" if subfolder else ""
    shards = "diffusion_pytorch_model-*"  # diffusion_pytorch_model-0000N-of-0000M.safetensors, if sharded
    patterns = [prefix + name for name in ("config.json", _WEIGHTS, _WEIGHTS + ".index.json", shards)]
    patterns.append("scheduler/scheduler_config.json")
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


def _is_repo_id(name):
    """Spelled like a Hub repo id, org/name, rather than a path to a file."""
    org, _, repo = name.partition("/")
    return bool(org and repo) and "/" not in repo and not name.startswith(".") and not name.endswith(".safetensors")


def from_pretrained(name_or_path, subfolder="transformer", config=None, device="cpu", dtype=torch.float32):
    """Build a CogVideoX transformer on the meta device and load its weights strictly.

    `name_or_path`: a name in CONFIGS (its Hub repo and folder), a Hub repo id, a local directory (its `subfolder` if
    that exists, else the directory itself), or a single .safetensors file (or sharded .index.json). The architecture
    comes from `config` (a CONFIGS name or a Config) if given, else from the preset, else from the config.json next to
    the weights (with the schedule from ../scheduler/scheduler_config.json when present). Returns the model in eval mode.
    """
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(
                f"{name_or_path} has no released weights; build it with CogVideoXTransformer(CONFIGS[...])"
            )
        folder = _hub_folder(preset.repo, preset.subfolder)
        config = preset if config is None else config
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

    if isinstance(config, str):
        config = CONFIGS[config]
    if config is None:
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json next to {weights}; pass config=, a Config or a CONFIGS name")
        with open(config_path) as f:
            config = config_from_diffusers(json.load(f), _scheduler_shift(folder))

    with torch.device("meta"):
        model = CogVideoXTransformer(config)
    load_checkpoint(model, weights)
    return model.to(device=device, dtype=dtype).eval()


if __name__ == "__main__":
    torch.manual_seed(0)
    for name in ("tiny-2b", "tiny-5b"):
        cfg = CONFIGS[name]
        model = CogVideoXTransformer(cfg).eval()
        x, text = torch.randn(2, cfg.in_channels, 3, 8, 12), torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim)
        with torch.no_grad():
            out, features = model(x, torch.tensor([10.0, 900.0]), text, feature_indices={1})
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n:,} parameters, out {tuple(out.shape)}, features {tuple(features[0].shape)}")
