"""The Wan 2.1 causal 3-D VAE: the video autoencoder of Wan 2.1 (T2V, I2V, VACE, Self-Forcing) and Cosmos Predict 2.5.

Paper: Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models" (arXiv:2503.20314), Sec. 3.1 (Wan-VAE).
Official code: https://github.com/Wan-Video/Wan2.1 (wan/modules/vae.py). The weights used here are the diffusers
`AutoencoderKLWan` files (`vae/diffusion_pytorch_model.safetensors` with its `config.json` in
Wan-AI/Wan2.1-T2V-1.3B-Diffusers); module names equal their keys (`encoder.down_blocks.0.conv1.weight`, ...), so they
load strictly. The original single file `Wan2.1_VAE.pth` (Wan-AI/Wan2.1-T2V-1.3B, and the Cosmos Predict 2.5 tokenizer)
loads through one explicit key table, `original_to_diffusers`. All Wan 2.1 sizes and Cosmos Predict 2.5 share this VAE.

A video in [-1, 1] of 1 + 4k frames and side H becomes 1 + k latent frames of side H / 8 with 16 channels: the first
frame is encoded on its own (so an image is a one-frame video) and every later group of 4 frames becomes one latent
frame. Every convolution is causal in time (zero padding on the past side only), norms act per position over channels
(RMS), and attention runs within each frame, so no frame depends on a later one. That is what lets encode walk the
video in chunks (the first frame, then 4 frames at a time) and decode one latent frame at a time while each causal
convolution keeps the last frames it saw in a cache: memory stays that of one chunk, and the result equals a single
pass over the whole video (`chunked=False`).

The diffusion models see per-channel normalised latents (z - latents_mean) / latents_std (16 values each, from
config.json), as diffusers' Wan pipelines and FastGen's WanVideoEncoder compute them (they multiply by 1 / latents_std,
equal up to rounding); z is a posterior sample by default (FastGen's default), its mean with `sample=False`. `decode`
undoes the normalisation and clamps to [-1, 1], as diffusers' decode does. Left out: the Wan 2.2 VAE (residual down/up blocks, patchified 48-channel latents), spatial tiling,
attention outside the mid blocks (attn_scales, empty in every release), the VAE training losses.

    vae = from_pretrained("wan2.1")                        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers, subfolder vae
    latents = vae.encode(video)                            # (B, 3, 1 + 4k, H, W) in [-1, 1] -> (B, 16, 1 + k, H/8, W/8)
    video = vae.decode(latents)                            # back to (B, 3, 1 + 4k, H, W), clamped to [-1, 1]
"""

import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config

# Per-channel statistics of the Wan 2.1 latents (config.json of the released VAE).
# fmt: off
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# fmt: on


@dataclass
class Config:
    base_dim: int = 96  # width of the first level; level i has base_dim * dim_mult[i]
    z_dim: int = 16  # latent channels
    dim_mult: tuple = (1, 2, 4, 4)  # width multipliers; every level after the first halves H and W
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder has one more)
    temporal_downsample: tuple = (False, True, True)  # per level transition: does it also halve time?
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple = WAN21_LATENTS_MEAN  # the diffusion model sees (z - latents_mean) / latents_std per channel
    latents_std: tuple = WAN21_LATENTS_STD
    repo: str = ""  # Hugging Face Hub repo holding the weights
    subfolder: str = "vae"  # folder of the repo with config.json and diffusion_pytorch_model.safetensors


# fmt: off
CONFIGS = {
    # The same VAE serves Wan2.1-T2V-1.3B/14B, the I2V and VACE models, Self-Forcing and Cosmos Predict 2.5 (2B/14B).
    "wan2.1": Config(repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    # The real model's structure (spatial-only first level, then two spatio-temporal ones) at a CPU size.
    "tiny":   Config(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                     latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0)),
}
# fmt: on

# ----------------------------------------------------------------------------
# Building blocks. A `cache` argument, where present, is a dict shared by all layers during one chunked pass: each
# causal layer keeps under its own module the frames (or state) that the next chunk needs from this one.


class CausalConv3d(nn.Conv3d):
    """3-D convolution that pads time with zeros on the past side only, so output frame t sees input frames <= t.

    With a `cache`, the input is a chunk of a longer video: the layer prepends the last kernel - 1 frames of earlier
    chunks in place of zeros and keeps the last ones of this chunk for the next, which makes chunk-by-chunk outputs
    equal those of one pass over the whole video."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, time_padding=None):
        kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        self.time_padding = kernel_size[0] - 1 if time_padding is None else time_padding
        self.space_padding = (kernel_size[2] // 2, kernel_size[2] // 2, kernel_size[1] // 2, kernel_size[1] // 2)

    def forward(self, x, cache=None):
        zeros = self.time_padding
        if cache is not None and zeros:
            past = cache.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                zeros -= past.shape[2]
            cache[self] = x[:, :, -self.time_padding :].clone()  # a copy, so the whole chunk can be freed
        return super().forward(F.pad(x, (*self.space_padding, zeros, 0)))


class RMSNorm(nn.Module):
    """Scales each position's channel vector to norm sqrt(C), then by a learned per-channel gain (no mean, no bias)."""

    def __init__(self, channels, video=True):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *((1, 1, 1) if video else (1, 1))))

    def forward(self, x):
        # Half-precision sums of squares over hundreds of channels lose digits: normalise in float32.
        normalized = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (RMSNorm, SiLU, causal 3x3x3 conv) twice, 1x1x1 conv on the skip when the width
    changes."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = RMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = RMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, cache=None):
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return skip + h


def _per_frame(fn, x):
    """Apply a 2-D module to every frame: (B, C, T, H, W) -> fn on (B*T, C, H, W) -> (B, C', T, H', W')."""
    B, T = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (B, T)).transpose(1, 2)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, with a residual connection."""

    def __init__(self, channels):
        super().__init__()
        self.norm = RMSNorm(channels, video=False)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def _attend(self, x):
        N, C, H, W = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (N, H*W, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each (N, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, H*W, C)
        return self.proj(h.transpose(1, 2).reshape(N, C, H, W))

    def forward(self, x):
        return x + _per_frame(self._attend, x)


class MidBlock(nn.Module):
    """Residual block, per-frame attention, residual block, at the lowest resolution."""

    def __init__(self, channels):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(channels, channels), ResidualBlock(channels, channels)])
        self.attentions = nn.ModuleList([Attention(channels)])

    def forward(self, x, cache=None):
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv per frame (zeros added on the bottom and right only, as trained); if
    `temporal`, also halve time with a stride-2 conv over 3 frames.

    The time conv has no padding: the first frame passes on unchanged, and then frames (0, 1, 2), (2, 3, 4), ... are
    merged, so 1 + 2m frames become 1 + m. Chunked, each chunk prepends the last frame of the one before."""

    def __init__(self, channels, temporal):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        self.time_conv = (
            CausalConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1), time_padding=0) if temporal else None
        )

    def forward(self, x, cache=None):
        x = _per_frame(self.resample, x)  # (B, C, T, H/2, W/2)
        if self.time_conv is None:
            return x
        past = None if cache is None else cache.get(self)
        if cache is not None:
            cache[self] = x[:, :, -1:].clone()
        if past is not None:
            return self.time_conv(torch.cat([past, x], dim=2))  # (B, C, T/2, H/2, W/2)
        first = x[:, :, :1]
        return torch.cat([first, self.time_conv(x)], dim=2) if x.shape[2] > 1 else first  # (B, C, 1 + (T-1)/2, ...)


class Upsample(nn.Module):
    """If `temporal`, double time first: every frame after the first becomes two, read from the two halves of a causal
    conv's output channels; the first frame stays one frame and is not part of that conv's past (1 + m frames become
    1 + 2m). Then double H and W per frame (nearest neighbour, 3x3 conv to `out_channels`)."""

    def __init__(self, channels, out_channels, temporal):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None

    def forward(self, x, cache=None):
        if self.time_conv is not None:
            B, C, _, H, W = x.shape
            starts_video = cache is None or self not in cache  # does this chunk hold the video's first frame?
            if cache is not None:
                cache[self] = True  # from now on, every frame of a chunk goes through the time conv
            first, rest = (x[:, :, :1], x[:, :, 1:]) if starts_video else (None, x)
            if rest.shape[2] > 0:
                y = self.time_conv(rest, cache)  # (B, 2C, T', H, W): channel half j is output frame 2t + j
                y = y.view(B, 2, C, -1, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, -1, H, W)  # (B, C, 2T', H, W)
                x = y if first is None else torch.cat([first, y], dim=2)
            else:
                x = first
        return _per_frame(self.resample, x)  # (B, out_channels, T, 2H, 2W)


class UpBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, upsample, temporal):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)
        )
        # The 2.1 decoder halves the width while upsampling; the next block starts from that half.
        self.upsamplers = nn.ModuleList([Upsample(out_channels, out_channels // 2, temporal)]) if upsample else None

    def forward(self, x, cache=None):
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        widths = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0], 3)
        layers = []  # one flat list, as the checkpoint numbers them: residual blocks, then a downsample per level
        for i in range(len(cfg.dim_mult)):
            layers += [
                ResidualBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1]) for j in range(cfg.num_res_blocks)
            ]
            if i < len(cfg.dim_mult) - 1:
                layers.append(Downsample(widths[i + 1], cfg.temporal_downsample[i]))
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(widths[-1])
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.z_dim, 3)  # mean and log-variance

    def forward(self, x, cache=None):
        x = self.conv_in(x, cache)  # (B, base_dim, T, H, W)
        for layer in self.down_blocks:
            x = layer(x, cache)  # (B, widest, 1 + (T-1)/4, H/8, W/8) after the last one
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, 2 * z_dim, 1 + (T-1)/4, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        widths = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, widths[0], 3)
        self.mid_block = MidBlock(widths[0])
        last = len(cfg.dim_mult) - 1
        self.up_blocks = nn.ModuleList(
            UpBlock(
                widths[0] if i == 0 else widths[i] // 2,
                widths[i + 1],
                cfg.num_res_blocks + 1,
                upsample=i < last,
                temporal=i < last and temporal[i],
            )
            for i in range(len(cfg.dim_mult))
        )
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], cfg.out_channels, 3)

    def forward(self, z, cache=None):
        x = self.mid_block(self.conv_in(z, cache), cache)  # (B, widest, t, h, w)
        for block in self.up_blocks:
            x = block(x, cache)  # (B, base_dim, 1 + 4(t-1), 8h, 8w) after the last one
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, out_channels, 1 + 4(t-1), 8h, 8w)


# ----------------------------------------------------------------------------
# Posterior


class DiagonalGaussian:
    """The encoder's posterior: independent N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in the LDM code, so that exp() stays finite in every precision.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        # Noise is drawn on the generator's device (a CPU generator also serves GPU tensors), then moved.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


# ----------------------------------------------------------------------------
# Model


class WanVAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs one entry per level transition ({len(cfg.dim_mult) - 1})")
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim = {cfg.z_dim} values each")
        self.cfg = cfg
        self.space_factor = 2 ** (len(cfg.dim_mult) - 1)  # 8: video side / latent side
        self.time_factor = 2 ** sum(cfg.temporal_downsample)  # 4: frames per latent frame after the first
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def _check_video(self, x):
        if x.ndim != 5:
            raise ValueError(f"expected a video (B, C, T, H, W), got shape {tuple(x.shape)}")
        T, H, W = x.shape[2:]
        if (T - 1) % self.time_factor:
            raise ValueError(
                f"a video of {T} frames cannot be encoded: the frame count must be 1 + {self.time_factor}k "
                f"(1, {1 + self.time_factor}, {1 + 2 * self.time_factor}, ...)"
            )
        if H % self.space_factor or W % self.space_factor:
            raise ValueError(f"video sides {(H, W)} must be multiples of {self.space_factor}")

    def posterior(self, x, chunked=True):
        """The Gaussian posterior of a video x (B, C, 1 + 4k, H, W) in [-1, 1]; mean and logvar are
        (B, z_dim, 1 + k, H/8, W/8). `chunked` encodes the first frame, then 4 frames at a time, through the causal
        cache (memory of one chunk); `chunked=False` runs one pass over the whole video, with the same result."""
        self._check_video(x)
        if not chunked:
            return DiagonalGaussian(self.quant_conv(self.encoder(x)))
        cache = {}
        starts = range(1, x.shape[2], self.time_factor)
        chunks = [x[:, :, :1]] + [x[:, :, s : s + self.time_factor] for s in starts]
        moments = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # (B, 2 * z_dim, 1 + k, h, w)
        return DiagonalGaussian(self.quant_conv(moments))

    def decode_raw(self, z, chunked=True):
        """Video from un-normalised latents z (B, z_dim, 1 + k, h, w), not clamped. `chunked` decodes one latent frame
        at a time through the causal cache; `chunked=False` runs one pass, with the same result."""
        if z.ndim != 5:
            raise ValueError(f"expected latents (B, C, T, H, W), got shape {tuple(z.shape)}")
        z = self.post_quant_conv(z)
        if not chunked:
            return self.decoder(z)
        cache = {}
        frames = [self.decoder(z[:, :, t : t + 1], cache) for t in range(z.shape[2])]
        return torch.cat(frames, dim=2)  # (B, out_channels, 1 + 4(t-1), 8h, 8w)

    def _latent_stats(self, like):
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.cfg.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def encode(self, x, sample=True, generator=None, chunked=True):
        """Video in [-1, 1] to the normalised latents a diffusion model sees. `sample=True` draws from the posterior
        (FastGen's default), `sample=False` takes its mean."""
        posterior = self.posterior(x, chunked)
        z = posterior.sample(generator) if sample else posterior.mean
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode(self, latents, chunked=True):
        """Normalised latents back to a video, clamped to [-1, 1]."""
        mean, std = self._latent_stats(latents)
        return self.decode_raw(latents * std + mean, chunked).clamp(-1.0, 1.0)

    def forward(self, x):
        """Reconstruction through the posterior mean, not clamped."""
        return self.decode_raw(self.posterior(x).mean)


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


# The original release (Wan2.1_VAE.pth, wan/modules/vae.py) keeps each residual block's layers in one Sequential and the
# encoder's and decoder's layers in flat Sequentials. Module renames, original -> diffusers, for any config:
# fmt: off
_ORIGINAL_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                      "shortcut": "conv_shortcut"}
_ORIGINAL_SIDE = {"conv1": "conv_in", "middle.0": "mid_block.resnets.0", "middle.1": "mid_block.attentions.0",
                  "middle.2": "mid_block.resnets.1", "head.0": "norm_out", "head.2": "conv_out"}
# fmt: on


def original_key_table(cfg: Config):
    """{original module name: diffusers module name} for every module of the original layout that holds weights."""
    table = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        table.update({f"{side}.{old}": f"{side}.{new}" for old, new in _ORIGINAL_SIDE.items()})
    levels = len(cfg.dim_mult)
    encoder_layers = levels * cfg.num_res_blocks + levels - 1  # residual blocks, and a downsample between levels
    table.update({f"encoder.downsamples.{n}": f"encoder.down_blocks.{n}" for n in range(encoder_layers)})
    per_level = cfg.num_res_blocks + 2  # the decoder's residual blocks of one level, then its upsample
    for i in range(levels):
        for j in range(cfg.num_res_blocks + 1):
            table[f"decoder.upsamples.{i * per_level + j}"] = f"decoder.up_blocks.{i}.resnets.{j}"
        if i < levels - 1:
            table[f"decoder.upsamples.{i * per_level + per_level - 1}"] = f"decoder.up_blocks.{i}.upsamplers.0"
    return table


def original_to_diffusers(state, cfg: Config):
    """Rename a state dict of the original layout to this file's (diffusers') names. Keys the table does not know
    are kept as they are, so that check_keys reports them."""
    table = original_key_table(cfg)
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest module path the table knows
            module, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
            if module in table:
                for old, new in _ORIGINAL_RESIDUAL.items():  # a layer inside a residual block
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                key = f"{table[module]}.{rest}"
                break
        renamed[key] = value
    return renamed


def load_checkpoint(model, path):
    """Load weights into `model` strictly (assign=True keeps meta-built models cheap): a diffusers-layout safetensors
    file or sharded index, or the original release's .pth, read with weights_only=True (tensors only, no pickled code
    runs) and renamed by original_to_diffusers."""
    if path.endswith(".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # refused by weights_only, truncated, not a torch file
            raise ValueError(f"{path} is not a plain state dict of tensors (torch.load(weights_only=True): {e}): download it again") from e  # fmt: skip
        state = original_to_diffusers(state, model.cfg)
    else:
        state = _read_safetensors(path)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
# The only values this file implements: the Wan 2.1 layout (no Wan 2.2 residual blocks or patchifying), no dropout,
# no attention outside the mid blocks, one width for encoder and decoder.
_DIFFUSERS_FIXED = {
    "attn_scales": [],
    "dropout": 0.0,
    "is_residual": False,
    "patch_size": None,
    "decoder_base_dim": None,
}
_DIFFUSERS_RENAMED = {"temperal_downsample": "temporal_downsample"}  # diffusers keeps the original spelling


def config_from_diffusers(d):
    """Config from the fields of a diffusers AutoencoderKLWan config.json; values this file does not implement are an
    error."""
    if d.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"config.json describes a {d['_class_name']}, not an AutoencoderKLWan")
    d = {_DIFFUSERS_RENAMED.get(k, k): v for k, v in d.items()}
    if d.get("decoder_base_dim") == d.get("base_dim", Config.base_dim):
        d["decoder_base_dim"] = None
    known = {f.name for f in fields(Config)} - {"repo", "subfolder"}
    allowed = known | _DIFFUSERS_IGNORED | _DIFFUSERS_FIXED.keys() | {"scale_factor_temporal", "scale_factor_spatial"}
    if unknown := set(d) - allowed:
        raise ValueError(f"config.json has fields this AutoencoderKLWan does not know: {sorted(unknown)}")
    for name, value in _DIFFUSERS_FIXED.items():
        if d.get(name, value) != value:
            raise ValueError(f"config.json sets {name}={d[name]!r}; only {value!r} is implemented")
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})
    factors = {
        "scale_factor_temporal": 2 ** sum(cfg.temporal_downsample),
        "scale_factor_spatial": 2 ** (len(cfg.dim_mult) - 1),
    }
    for name, value in factors.items():
        if d.get(name, value) != value:
            raise ValueError(f"config.json sets {name}={d[name]}, but its levels give {value}")
    return cfg


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


def from_pretrained(name_or_path, subfolder="vae", config=None, device="cpu", dtype=torch.float32):
    """Build a WanVAE on the meta device and load its weights strictly.

    `name_or_path`: a name in CONFIGS (its Hub repo and folder), a Hub repo id, a local directory (its `subfolder`
    if that exists, else the directory itself), a single .safetensors file, or the original release's Wan2.1_VAE.pth.
    The architecture comes from `config` (a CONFIGS name or a Config) if given, else from the preset, else from the
    config.json next to the safetensors weights; a .pth is the Wan 2.1 VAE unless `config` says otherwise (the
    config.json next to it, if any, describes the transformer). The model comes back in eval mode with gradients off,
    as the diffusion methods use it.
    """
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(f"{name_or_path} has no released weights; build it with WanVAE(CONFIGS[...])")
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
    if config is None and weights.endswith(".pth"):
        config = CONFIGS["wan2.1"]
    if config is None:
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json next to {weights}; pass config=, a Config or a CONFIGS name")
        with open(config_path) as f:
            config = config_from_diffusers(json.load(f))

    with torch.device("meta"):
        model = WanVAE(config)
    load_checkpoint(model, weights)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = WanVAE(CONFIGS["tiny"]).eval()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode(video, generator=torch.Generator().manual_seed(0))
        decoded = model.decode(latents)
    n = sum(p.numel() for p in model.parameters())
    shapes = " -> ".join(str(tuple(t.shape)) for t in (video, latents, decoded))
    print(f"wan_vae tiny: {n:,} parameters, video -> latents -> video {shapes}")
