"""FLUX.1: the 12B rectified-flow transformer of Black Forest Labs (FLUX.1-dev, FLUX.1-schnell), text-to-image.

Papers: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3, the MM-DiT
double-stream block, logit-normal times, resolution-dependent shift), ICML 2024 (arXiv:2403.03206); Black Forest Labs,
"FLUX.1" (2024; no paper; single-stream blocks after Dehghani et al. 2023, 3-axis RoPE, guidance distillation).
Official code: https://github.com/black-forest-labs/flux (src/flux/model.py, sampling.py).

The network: 16-channel latents (B, 16, H, W) are packed into 2x2 patches, (B, H W / 4, 64) tokens; 19 double-stream
blocks (separate weights for the image and the T5 text tokens, one joint attention), then 38 single-stream blocks over
the concatenated [text, image] sequence (attention and MLP in parallel), conditioned by adaLN on the sum of a timestep,
a pooled CLIP text (768) and, for the guidance-distilled dev model, a guidance-scale embedding. RoPE rotates
attention pairs by the 3 position ids (0, row, col) of each 2x2 patch (text tokens: all zeros), 16 + 56 + 56 dims.

Checkpoints: the diffusers `FluxTransformer2DModel` files (`transformer/` of black-forest-labs/FLUX.1-dev or -schnell:
config.json + three safetensors shards with their index). Module names equal their keys (`transformer_blocks.0.attn.
to_q.weight`, ...), so they load strictly. The original single-file release (`flux1-dev.safetensors`, keys like
`double_blocks.0.img_attn.qkv.weight`) loads through one explicit key table (`original_key_table`).

Time convention: t in [0, 1], t = 1 is pure noise, x_t = (1 - t) x0 + t eps, the network predicts flow = eps - x0.
The backbone sees 1000 t and 1000 g (the diffusers and BFL transformers multiply by 1000 inside; so does this forward).
The guidance g is the distilled guidance scale (3.5 by default for dev), not classifier-free guidance; true CFG with
negative prompts is optional in the sampler.

Left out: FastGen's logvar head, ControlNet/IP-Adapter inputs, LoRA, the text encoders (CLIP-L and T5-XXL come from
`transformers`) and the autoencoder (models/autoencoder_kl.py, "flux" preset).

    model = from_pretrained("flux-dev", dtype=torch.bfloat16, device="cuda")   # gated: accept the licence, set HF_TOKEN
    noise = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)  # 1024 px
    latents = sample_euler(model, noise, t5_embeds, clip_pooled, steps=28, guidance=3.5)  # AE "flux" decodes them
"""

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    in_channels: int = 64  # packed channels: 16 latent channels x 2 x 2
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128  # D per head; the three RoPE axes split it
    num_attention_heads: int = 24  # heads; width = heads x head dim = 3072
    joint_attention_dim: int = 4096  # T5-XXL hidden size
    pooled_projection_dim: int = 768  # CLIP-L pooled output
    guidance_embeds: bool = True  # dev is guidance-distilled (g is an input); schnell is not
    axes_dims_rope: tuple = (16, 56, 56)  # RoPE dims of the ids (0, row, col); sum = head dim
    mlp_ratio: float = 4.0  # MLP width / token width (fixed in the released models)
    repo: str = ""  # Hugging Face Hub repo holding the weights
    subfolder: str = "transformer"  # folder of the repo with config.json and the safetensors shards


# fmt: off
CONFIGS = {
    "flux-dev":     Config(repo="black-forest-labs/FLUX.1-dev"),
    "flux-schnell": Config(guidance_embeds=False, repo="black-forest-labs/FLUX.1-schnell"),
    "mid":          Config(num_layers=4, num_single_layers=8, num_attention_heads=6),  # 768 wide, for benchmarks
    "tiny":         Config(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                           joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
}
# fmt: on

LATENT_CHANNELS = 16  # channels of the FLUX.1 autoencoder's latents; in_channels = 4 x this
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's and FastGen's guidance scale for dev

# ----------------------------------------------------------------------------
# Schedule: rectified flow, x_t = (1 - t) x0 + t eps, flow = eps - x0. Time math runs in float64 on purpose: the
# conversions divide by t and 1 - t, and the shifted times crowd near 1.

PRED_TYPE = "flow"
T_MIN, T_MAX = 0.0, 1.0


def alpha(t):
    return 1 - t


def sigma(t):
    return t


def alpha_prime(t):
    return -torch.ones_like(t)


def sigma_prime(t):
    return torch.ones_like(t)


def _expand(t, x):
    """Broadcast a per-sample time [B] (or scalar) against x [B, ...], in float64."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


def _safe(d, eps=1e-6):
    """Keep a denominator away from zero without changing its sign."""
    return torch.where(d >= 0, d.clamp(min=eps), d.clamp(max=-eps))


def to_x0(x_t, out, t, pred_type):
    """Convert a raw prediction of type `pred_type` at (x_t, t) to an x0 prediction."""
    x, y = x_t.double(), out.double()
    a, s, da, ds = (f(_expand(t, x)) for f in (alpha, sigma, alpha_prime, sigma_prime))
    if pred_type == "x0":
        x0 = y
    elif pred_type == "eps":  # x_t = a x0 + s eps
        x0 = (x - s * y) / _safe(a)
    elif pred_type == "flow":  # flow = dx_t/dt = a' x0 + s' eps
        x0 = (x * ds / _safe(s) - y) / _safe(a * ds / _safe(s) - da)
    elif pred_type == "v":  # v of the variance-preserving rescaling x_t / sqrt(a^2 + s^2) (Salimans & Ho 2022)
        n = (a**2 + s**2).sqrt()
        x0 = (a / n) * (x / n) - (s / n) * y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return x0.to(out.dtype)


def from_x0(x_t, x0, t, pred_type):
    """Express an x0 prediction at (x_t, t) as a prediction of type `pred_type`."""
    x, y = x_t.double(), x0.double()
    a, s, da, ds = (f(_expand(t, x)) for f in (alpha, sigma, alpha_prime, sigma_prime))
    eps = (x - a * y) / _safe(s)
    if pred_type == "x0":
        out = y
    elif pred_type == "eps":
        out = eps
    elif pred_type == "flow":
        out = da * y + ds * eps
    elif pred_type == "v":
        n = (a**2 + s**2).sqrt()
        out = (a / n) * eps - (s / n) * y
    else:
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of x0, eps, v, flow")
    return out.to(x0.dtype)


def convert(x_t, out, t, src, dst):
    """Convert a prediction between the types x0, eps, v and flow (through x0)."""
    return out if src == dst else from_x0(x_t, to_x0(x_t, out, t, src), t, dst)


def shift_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """Resolution-dependent shift parameter: linear in the number of packed image tokens, 0.5 at 256 tokens (512 px)
    and 1.15 at 4096 (1024 px), as FLUX.1's sampler and scheduler config set it (BFL sampling.py get_lin_function)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(t, mu):
    """t' = e^mu / (e^mu + 1/t - 1): the same signal-to-noise shift as SD3 Eq. 23 with shift e^mu, so that more
    tokens (which average away more noise) get more time at high noise. Fixes 0 and 1."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sampling_times(steps, image_seq_len=None, mu=None):
    """The teacher sampler's times, float64 [steps + 1]: linspace(1, 1/steps, steps) shifted by mu (from the image
    token count unless given), then 0 (FluxPipeline with FlowMatchEulerDiscreteScheduler's dynamic shifting).
    FastGen's Flux sampler applies mu as a static shift instead (networks.md Sec. 14 lists it as a bug)."""
    times = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if mu is None and image_seq_len is not None:
        mu = shift_mu(image_seq_len)
    if mu is not None:
        times = time_shift(times, mu)
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


def t_list(steps, mu=None):
    """Default few-step times for students: FastGen's linspace(0.999, 0, steps + 1), the grid its Flux DMD2 config
    uses (4 steps: [0.999, 0.749, 0.4995, 0.2498, 0]); with `mu`, shifted like the teacher's times."""
    times = torch.linspace(0.999, 0.0, steps + 1, dtype=torch.float64)
    return times if mu is None else time_shift(times, mu)


def sample_t(
    n,
    kind="uniform",
    t_min=0.001,
    t_max=0.999,
    p_mean=0.0,
    p_std=1.0,
    shift=3.0,
    mu=None,
    generator=None,
    device=None,
):
    """Training-time times, float64 [n], in [t_min, t_max].

    uniform:     t ~ U[t_min, t_max]: FastGen's Flux configs (sft, dmd2) with [0.001, 0.999].
    logitnormal: t = t_min + (t_max - t_min) sigmoid(p_mean + p_std n), the rf default of FastGen and SD3's choice
                 (SD3 Sec. 3.1, m = 0, s = 1).
    shifted:     u ~ U[0, 1] warped to s u / (1 + (s - 1) u), more weight on high noise (SD3 Eq. 23), then scaled.
    `mu` additionally applies FLUX.1's resolution shift time_shift(t, mu) to the draws (see shift_mu).
    """
    if kind == "uniform":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
    elif kind == "logitnormal":
        u = torch.sigmoid(p_mean + p_std * torch.randn(n, dtype=torch.float64, generator=generator))
    elif kind == "shifted":
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        u = shift * u / (1 + (shift - 1) * u)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; expected uniform, logitnormal or shifted")
    t = t_min + (t_max - t_min) * u
    if mu is not None:
        t = time_shift(t, mu)
    return t.clamp(t_min, t_max).to(device)


# ----------------------------------------------------------------------------
# Latent packing and position ids


def pack(latents):
    """(B, C, H, W) -> (B, H W / 4, 4 C): one token per 2x2 patch, row-major, channels ordered (c, dy, dx)."""
    B, C, H, W = latents.shape
    if H % 2 or W % 2:
        raise ValueError(f"latent sides ({H}, {W}) must be even (2x2 patches)")
    x = latents.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens, height, width):
    """Inverse of pack: (B, H W / 4, 4 C) -> (B, C, H, W)."""
    B, N, D = tokens.shape
    x = tokens.reshape(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def image_ids(rows, cols, device=None):
    """(rows cols, 3) position ids (0, row, col) of the packed image tokens, row-major, float."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3).float()


def text_ids(length, device=None):
    """(L, 3) all-zero ids: text tokens carry no position in RoPE (T5 encodes order itself)."""
    return torch.zeros(length, 3, device=device)


# ----------------------------------------------------------------------------
# Building blocks


def timestep_features(t, dim=256, max_period=10000):
    """Sinusoidal features [cos | sin] of a scalar per sample, frequencies max_period^(-i / (dim / 2)), in float32 as
    the reference computes them, or in float64 for float64 t (a float64 model runs in float64 throughout)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    angles = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def rope_tables(ids, axes_dims, theta=10000.0, dtype=torch.float32):
    """cos and sin (N, head dim) of the rotation angles, each axis of the ids rotating its own slice of the head dims;
    every angle is repeated for its (even, odd) pair. Angles in float64: positions up to ~128 times frequencies near
    1 lose digits in float32. The tables come back in `dtype`: float32 as the reference, float64 for a float64 model."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].double()[:, None] * freqs[None])
    angles = torch.cat(angles, dim=1)  # (N, head dim / 2)
    return angles.cos().repeat_interleave(2, dim=1).to(dtype), angles.sin().repeat_interleave(2, dim=1).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate the (even, odd) pairs of x (B, N, heads, D) by the angles: (a, b) -> (a cos - b sin, b cos + a sin),
    in float32 at least (float64 for float64 x)."""
    x_up = x.to(torch.promote_types(x.dtype, cos.dtype))
    a, b = x_up.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-b, a], dim=-1).flatten(-2)
    return (x_up * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: the timestep, guidance and pooled-text embedders."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """The conditioning vector of every adaLN: embed(1000 t) [+ embed(1000 g)] + embed(pooled CLIP)."""

    def __init__(self, dim, pooled_dim, guidance):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, t, guidance, pooled):
        dtype = self.timestep_embedder.linear_1.weight.dtype
        # NOTE: the scaling by 1000 runs in float32 here (float64 in a float64 model); diffusers and BFL round t to the
        # model dtype first (visible in bfloat16 only).
        math_dtype = torch.promote_types(dtype, torch.float32)
        emb = self.timestep_embedder(timestep_features(t.to(math_dtype) * 1000).to(dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_features(guidance.to(math_dtype) * 1000).to(dtype))
        return emb + self.text_embedder(pooled)


class AdaNorm(nn.Module):
    """LayerNorm without affine weights, followed by n per-sample (shift, scale, gate, ...) vectors from the
    conditioning (adaLN-Zero, DiT Sec. 3.2). The chunks come back in the checkpoint's order."""

    def __init__(self, dim, chunks):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x, emb):
        mods = self.linear(F.silu(emb)).chunk(self.chunks, dim=1)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6), mods


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nn.Module):
    """Linear -> GELU (tanh) -> Linear, with the checkpoint's names net.0.proj and net.2."""

    def __init__(self, dim, hidden):
        super().__init__()
        # net.0 holds the input projection as .proj; net.1 is the weightless slot of a dropout in the checkpoint layout
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim)])
        self.net[0].proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention with RMS-normalised queries and keys (QK-norm) and RoPE. joint=True (double-stream
    blocks) adds a second set of projections for the text tokens, which attend together with the image tokens."""

    def __init__(self, dim, heads, head_dim, joint):
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, heads * head_dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
            self.to_add_out = nn.Linear(heads * head_dim, dim)

    def project(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (f(x).unflatten(-1, (-1, self.head_dim)) for f in (to_q, to_k, to_v))  # (B, N, heads, D)
        return norm_q(q), norm_k(k), v

    def forward(self, x, cos, sin, context=None):
        """x: (B, N, dim) tokens (all of them in single-stream blocks); context: (B, L, dim) text tokens, which go
        first in the joint sequence. Returns (B, N, heads D), or (image out, text out) with a context."""
        q, k, v = self.project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self.project(
                context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
            )
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)  # (B, L + N, heads D)
        if context is None:
            return out
        L = context.shape[1]
        return self.to_out[0](out[:, L:]), self.to_add_out(out[:, :L])


def _clip_fp16(x):
    """Keep float16 activations finite: the residual stream of the released weights exceeds its range."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleBlock(nn.Module):
    """MM-DiT block (SD3 Fig. 2b): image and text tokens keep separate weights and adaLN, and attend jointly."""

    def __init__(self, dim, heads, head_dim, mlp_ratio):
        super().__init__()
        self.norm1 = AdaNorm(dim, 6)
        self.norm1_context = AdaNorm(dim, 6)
        self.attn = Attention(dim, heads, head_dim, joint=True)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, img, txt, emb, cos, sin):
        img_normed, (shift, scale, gate, mlp_shift, mlp_scale, mlp_gate) = self.norm1(img, emb)
        txt_normed, (c_shift, c_scale, c_gate, c_mlp_shift, c_mlp_scale, c_mlp_gate) = self.norm1_context(txt, emb)
        img_attn, txt_attn = self.attn(
            modulate(img_normed, shift, scale), cos, sin, modulate(txt_normed, c_shift, c_scale)
        )

        img = img + gate[:, None] * img_attn
        img_normed = F.layer_norm(img, img.shape[-1:], eps=1e-6)
        img = img + mlp_gate[:, None] * self.ff(modulate(img_normed, mlp_shift, mlp_scale))

        txt = txt + c_gate[:, None] * txt_attn
        txt_normed = F.layer_norm(txt, txt.shape[-1:], eps=1e-6)
        txt = txt + c_mlp_gate[:, None] * self.ff_context(modulate(txt_normed, c_mlp_shift, c_mlp_scale))
        return _clip_fp16(img), _clip_fp16(txt)


class SingleBlock(nn.Module):
    """Parallel block (Dehghani et al. 2023): one adaLN, then attention and MLP side by side, one output projection."""

    def __init__(self, dim, heads, head_dim, mlp_ratio):
        super().__init__()
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, int(dim * mlp_ratio))
        self.attn = Attention(dim, heads, head_dim, joint=False)
        self.proj_out = nn.Linear(dim + int(dim * mlp_ratio), dim)

    def forward(self, x, emb, cos, sin):
        normed, (shift, scale, gate) = self.norm(x, emb)
        h = modulate(normed, shift, scale)  # (B, L + N, dim)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return _clip_fp16(x + gate[:, None] * self.proj_out(torch.cat([self.attn(h, cos, sin), mlp], dim=2)))


class OutputNorm(nn.Module):
    """Final adaLN: LayerNorm, then (scale, shift) from the conditioning, in that order (BFL's file has shift first)."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, emb):
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)


# ----------------------------------------------------------------------------
# Model


class FluxModel(nn.Module):
    """The FLUX.1 transformer on (B, 16, H, W) latents, with the diffusers FluxTransformer2DModel names."""

    def __init__(self, cfg: Config):
        super().__init__()
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to the head dim {cfg.attention_head_dim}")
        self.cfg = cfg
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        block_args = (dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_ratio)
        self.transformer_blocks = nn.ModuleList([DoubleBlock(*block_args) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleBlock(*block_args) for _ in range(cfg.num_single_layers)])
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, cfg.in_channels)

    @property
    def num_blocks(self):
        """Feature taps are numbered over all blocks: double-stream 0..num_layers-1, then the single-stream ones."""
        return self.cfg.num_layers + self.cfg.num_single_layers

    def forward(self, x, t, text, pooled, guidance=None, feature_indices=(), features_only=False):
        """x: (B, 16, H, W) noisy latents (H, W even), t: (B,) or scalar time in [0, 1], text: (B, L, 4096) T5 states,
        pooled: (B, 768) CLIP pooled output, guidance: (B,) or scalar distilled guidance scale (dev only; None -> 3.5).

        Returns the flow prediction (B, 16, H, W). With `feature_indices` (block indices, see num_blocks) also the
        list of those blocks' image tokens as (B, width, H / 2, W / 2), FastGen's discriminator taps; with
        `features_only` only that list, without running the blocks after the last index.
        """
        B, C, H, W = x.shape
        math_dtype = torch.promote_types(x.dtype, torch.float32)  # time, guidance and RoPE: float32, float64 in float64
        t = torch.as_tensor(t, device=x.device).to(math_dtype).expand(B)
        if self.cfg.guidance_embeds:
            guidance = torch.as_tensor(DEFAULT_GUIDANCE if guidance is None else guidance, device=x.device)
            guidance = guidance.to(math_dtype).expand(B)
        elif guidance is not None:
            raise ValueError("this model has no guidance embedding (schnell); pass guidance=None")
        L = text.shape[1]
        ids = torch.cat([text_ids(L, x.device), image_ids(H // 2, W // 2, x.device)])  # (L + N, 3)
        cos, sin = rope_tables(ids, self.cfg.axes_dims_rope, dtype=math_dtype)

        img = self.x_embedder(pack(x))  # (B, N, dim), N = H W / 4
        txt = self.context_embedder(text)  # (B, L, dim)
        emb = self.time_text_embed(t, guidance, pooled)  # (B, dim)
        features, last = [], max(feature_indices, default=-1)
        if features_only and last < 0:
            return features

        def tap(i, tokens):
            if i in feature_indices:
                features.append(tokens.transpose(1, 2).reshape(B, -1, H // 2, W // 2))
            return features_only and i >= last

        for i, block in enumerate(self.transformer_blocks):
            img, txt = block(img, txt, emb, cos, sin)
            if tap(i, img):
                return features
        h = torch.cat([txt, img], dim=1)  # (B, L + N, dim)
        for i, block in enumerate(self.single_transformer_blocks, start=self.cfg.num_layers):
            h = block(h, emb, cos, sin)
            if tap(i, h[:, L:]):
                return features
        if features_only:
            return features
        out = unpack(self.proj_out(self.norm_out(h[:, L:], emb)), H, W)  # (B, 16, H, W)
        return (out, features) if len(feature_indices) else out


# ----------------------------------------------------------------------------
# Samplers


def guided_flow(model, x, t, text, pooled, guidance=DEFAULT_GUIDANCE, neg_text=None, neg_pooled=None, true_cfg=1.0):
    """Flow prediction with the distilled guidance g as an input (dev; ignored for schnell) and, if negative prompt
    embeddings are given and true_cfg > 1, classifier-free guidance u + w (c - u) on top, in one batch of 2B."""
    g = guidance if model.cfg.guidance_embeds else None
    if neg_text is None or true_cfg == 1.0:
        return model(x, t, text, pooled, g)
    if neg_text.shape[1] != text.shape[1]:
        raise ValueError("negative and positive text embeddings must have the same length to share a batch")
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(len(x))
    g2 = None if g is None else torch.as_tensor(g, device=x.device).expand(len(x)).repeat(2)
    cond, uncond = model(
        torch.cat([x, x]), t.repeat(2), torch.cat([text, neg_text]), torch.cat([pooled, neg_pooled]), g2
    ).chunk(2)
    return uncond + true_cfg * (cond - uncond)


@torch.no_grad()
def sample_euler(
    model,
    noise,
    text,
    pooled,
    steps=28,
    guidance=DEFAULT_GUIDANCE,
    neg_text=None,
    neg_pooled=None,
    true_cfg=1.0,
    times=None,
    progress=False,
):
    """FluxPipeline's sampler: Euler on dx/dt = flow(x, t) from t = 1 (noise (B, 16, H, W)) to 0, on the shifted
    times of `sampling_times` for this resolution unless `times` is given. Returns latents."""
    if times is None:
        times = sampling_times(steps, noise.shape[2] * noise.shape[3] // 4)
    times = torch.as_tensor(times, dtype=torch.float64)
    x = noise.double() * sigma(times[0])
    for i in _progress(range(len(times) - 1), progress):
        v = guided_flow(
            model, x.to(noise.dtype), times[i], text, pooled, guidance, neg_text, neg_pooled, true_cfg
        ).double()
        x = x + (times[i + 1] - times[i]) * v
    return x.to(noise.dtype)


@torch.no_grad()
def sample_student(model, noise, text, pooled, times=None, steps=4, guidance=DEFAULT_GUIDANCE, generator=None):
    """Few-step student sampling (FastGen's default): predict x0, re-noise it to the next time with fresh noise."""
    times = t_list(steps) if times is None else torch.as_tensor(times, dtype=torch.float64)
    x = noise * sigma(times[0]).to(noise.dtype)
    for i in range(len(times) - 1):
        t = times[i].expand(len(x)).to(x.device)
        x0 = to_x0(x, guided_flow(model, x, t, text, pooled, guidance), t, PRED_TYPE)
        if times[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = alpha(times[i + 1]).to(x.dtype) * x0 + sigma(times[i + 1]).to(x.dtype) * fresh
    return x0


def _progress(iterable, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, unit="step", leave=False)


# ----------------------------------------------------------------------------
# Checkpoint loading


def _read_safetensors(path):
    """State dict from one safetensors file, or from a sharded `*.safetensors.index.json` (every shard must exist). A
    file that cannot be read (truncated, empty, damaged, a folder) is a ValueError that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.endswith(".index.json"):
        try:
            return load_file(path)
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; write or download it again") from e  # fmt: skip
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError, IsADirectoryError) as e:
        raise ValueError(f"{path} is not a safetensors index ({type(e).__name__}: {e}): write or download it again") from e  # fmt: skip
    folder, state = os.path.dirname(path), {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            n = sum(v == shard for v in weight_map.values())
            raise FileNotFoundError(f"shard {shard} ({n} tensors) listed in {path} is missing from {folder}")
        state.update(_read_safetensors(shard_path))
    return state


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


def original_key_table(cfg):
    """The original BFL single-file names (flux1-dev.safetensors) -> the diffusers names they hold, in order.

    A fused tensor maps to several diffusers tensors concatenated along dim 0: the double blocks' qkv to q, k, v, and
    the single blocks' linear1 to q, k, v and the MLP input. final_layer.adaLN_modulation.1 holds (shift, scale) where
    norm_out.linear holds (scale, shift); see SWAPPED.
    """
    table = {}

    def linear(original, *ours):  # weight and bias of a Linear
        for p in ("weight", "bias"):
            table[f"{original}.{p}"] = [f"{o}.{p}" for o in ours]

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    for original, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder")) + (
        (("guidance_in", "guidance_embedder"),) if cfg.guidance_embeds else ()
    ):
        linear(f"{original}.in_layer", f"time_text_embed.{ours}.linear_1")
        linear(f"{original}.out_layer", f"time_text_embed.{ours}.linear_2")
    for i in range(cfg.num_layers):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        linear(f"{o}.img_mod.lin", f"{d}.norm1.linear")
        linear(f"{o}.txt_mod.lin", f"{d}.norm1_context.linear")
        linear(f"{o}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
        linear(f"{o}.txt_attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")
        linear(f"{o}.img_attn.proj", f"{d}.attn.to_out.0")
        linear(f"{o}.txt_attn.proj", f"{d}.attn.to_add_out")
        linear(f"{o}.img_mlp.0", f"{d}.ff.net.0.proj")
        linear(f"{o}.img_mlp.2", f"{d}.ff.net.2")
        linear(f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        linear(f"{o}.txt_mlp.2", f"{d}.ff_context.net.2")
        table[f"{o}.img_attn.norm.query_norm.scale"] = [f"{d}.attn.norm_q.weight"]
        table[f"{o}.img_attn.norm.key_norm.scale"] = [f"{d}.attn.norm_k.weight"]
        table[f"{o}.txt_attn.norm.query_norm.scale"] = [f"{d}.attn.norm_added_q.weight"]
        table[f"{o}.txt_attn.norm.key_norm.scale"] = [f"{d}.attn.norm_added_k.weight"]
    for i in range(cfg.num_single_layers):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{o}.modulation.lin", f"{d}.norm.linear")
        linear(f"{o}.linear1", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        linear(f"{o}.linear2", f"{d}.proj_out")
        table[f"{o}.norm.query_norm.scale"] = [f"{d}.attn.norm_q.weight"]
        table[f"{o}.norm.key_norm.scale"] = [f"{d}.attn.norm_k.weight"]
    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear")
    return table


SWAPPED = {"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}  # halves swap on convert


def _swap_halves(x):
    first, second = x.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def is_original_layout(state):
    return any(k.startswith(("double_blocks.", "single_blocks.", "model.diffusion_model.")) for k in state)


def from_original(state, cfg):
    """An original BFL state dict -> diffusers names, splitting the fused tensors. Keys outside the table are kept
    as they are (so that check_keys reports them); the `model.diffusion_model.` prefix of some repackagings is dropped."""
    table = original_key_table(cfg)
    with torch.device("meta"):
        sizes = {k: v.shape[0] for k, v in FluxModel(cfg).state_dict().items()}
    out = {}
    for key, value in state.items():
        key = key.removeprefix("model.diffusion_model.")
        if key not in table:
            out[key] = value
            continue
        targets = table[key]
        value = _swap_halves(value) if key in SWAPPED else value
        split = [sizes[t] for t in targets]
        if sum(split) != value.shape[0]:
            raise ValueError(f"{key} {tuple(value.shape)} does not split into {targets} of sizes {split}")
        out.update(zip(targets, torch.split(value, split, dim=0)))
    return out


def to_original(state, cfg):
    """Inverse of from_original: diffusers names -> the original BFL names, fusing q, k, v (and the MLP input)."""
    out = {}
    for key, targets in original_key_table(cfg).items():
        if all(t in state for t in targets):
            value = torch.cat([state[t] for t in targets], dim=0)
            out[key] = _swap_halves(value) if key in SWAPPED else value
    return out


def config_from_original(state):
    """The architecture of an original BFL state dict, read off its tensor shapes (the file carries no config)."""
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}

    def count(prefix):
        return len({k.split(".")[1] for k in state if k.startswith(prefix)})

    width, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if head_dim != Config.attention_head_dim:
        raise ValueError(f"head dim {head_dim}: give config= (the RoPE axes of a non-128 head dim are not known)")
    return Config(
        in_channels=in_channels,
        num_layers=count("double_blocks."),
        num_single_layers=count("single_blocks."),
        num_attention_heads=width // head_dim,
        joint_attention_dim=state["txt_in.weight"].shape[1],
        pooled_projection_dim=state["vector_in.in_layer.weight"].shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in state,
    )


def load_checkpoint(model, path):
    """Load a diffusers-layout safetensors file (or sharded index), or an original BFL file, into `model`, strictly
    (assign=True keeps meta-built models cheap)."""
    state = _read_safetensors(path)
    if is_original_layout(state):
        state = from_original(state, model.cfg)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def config_from_diffusers(d):
    """Config from a diffusers FluxTransformer2DModel config.json; values this file does not implement are an error."""
    if d.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise ValueError(f"config.json describes a {d['_class_name']}, not a FluxTransformer2DModel")
    known = {f.name for f in fields(Config)} - {"repo", "subfolder", "mlp_ratio"}
    if unknown := set(d) - known - _DIFFUSERS_IGNORED - {"patch_size", "out_channels"}:
        raise ValueError(f"config.json has fields this FluxModel does not know: {sorted(unknown)}")
    if d.get("patch_size", 1) != 1:
        raise ValueError(
            f"config.json sets patch_size={d['patch_size']}; only 1 (tokens packed outside) is implemented"
        )
    if d.get("out_channels") not in (None, d.get("in_channels", Config.in_channels)):
        raise ValueError(f"config.json sets out_channels={d['out_channels']}; only in_channels is implemented")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


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


def _is_repo_id(name):
    """Spelled like a Hub repo id, org/name, rather than a path to a file."""
    org, _, repo = name.partition("/")
    return bool(org and repo) and "/" not in repo and not name.startswith(".") and not name.endswith(".safetensors")


def from_pretrained(name_or_path, subfolder="transformer", config=None, device="cpu", dtype=torch.float32):
    """Build a FluxModel on the meta device and load its weights strictly.

    `name_or_path`: a name in CONFIGS (its Hub repo and folder), a Hub repo id, a local directory (its `subfolder`
    if that exists, else the directory itself) holding config.json and the weights (one file or shards with their
    index), or a single .safetensors file, in the diffusers layout or the original BFL one (flux1-dev.safetensors).
    The architecture comes from `config` (a CONFIGS name or a Config) if given, else from the preset, else from the
    config.json next to the weights, else (original files) from the tensor shapes.
    """
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(f"{name_or_path} has no released weights; build it with FluxModel(CONFIGS[...])")
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
    if config is None and os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            config = config_from_diffusers(json.load(f))
    if config is None:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        if not is_original_layout(shapes):
            raise FileNotFoundError(f"no config.json next to {weights}; pass config=, a Config or a CONFIGS name")
        config = config_from_original(shapes)

    with torch.device("meta"):
        model = FluxModel(config)
    load_checkpoint(model, weights)
    return model.to(device=device, dtype=dtype).eval()


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = FluxModel(cfg).eval()
    x, text, pooled = torch.randn(2, 16, 8, 12), torch.randn(2, 7, cfg.joint_attention_dim), torch.randn(2, 16)
    with torch.no_grad():
        out, features = model(x, torch.tensor([0.3, 0.9]), text, pooled, guidance=3.5, feature_indices={1, 3})
    n = sum(p.numel() for p in model.parameters())
    print(f"flux tiny: {n:,} parameters, out {tuple(out.shape)}, features {[tuple(f.shape) for f in features]}")
