"""The CogVideoX 3-D causal VAE: videos (B, 3, T, H, W) in [-1, 1] <-> latents (B, 16, 1 + (T - 1) / 4, H / 8, W / 8).

Paper: Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer", 2024 (arXiv:2408.06072),
Sec. 2.1; the decoder's spatially conditioned norm is MoVQ's (Zheng et al., NeurIPS 2022, arXiv:2209.09002). Official
code: https://github.com/THUDM/CogVideo (sat/vae_modules/cp_enc_dec.py). The checkpoints are the diffusers
`AutoencoderKLCogVideoX` files (`vae/diffusion_pytorch_model.safetensors` with its `config.json` in THUDM/CogVideoX-2b
and THUDM/CogVideoX-5b; the two VAEs share one layout and differ in scaling_factor), and module names equal their keys
(`encoder.down_blocks.0.resnets.0.conv1.conv.weight`, ...), so they load strictly.

Layout: every tensor is (B, C, T, H, W). Each 3-D conv is causal in time: at frame t it sees frames t-2..t, and the
first frame is padded with copies of itself. The first two levels halve T by averaging pairs of frames while the first
frame of an odd-length clip stays alone, so a clip of 1 + 8k frames becomes 1 + 2k latent frames (49 -> 13), and the
decoder undoes it (13 -> 49). As in diffusers (and the released pipelines), the encoder runs on batches of 8 frames
(the first batch takes the extra one) and the decoder on batches of 2 latent frames (the first takes the extra one);
the last frames each causal conv saw are carried from one batch to the next in a cache, but every batch is
group-normalised on its own, so the batch split is part of the model's output, and it is reproduced exactly here.

The encoder predicts a diagonal Gaussian posterior; the diffusion model sees z * scaling_factor (CogVideoX-2b
1.15258426, -5b 0.7), and `decode` undoes that. `tiled=True` bounds the memory of large frames the way diffusers'
enable_tiling() does (tiles of half the training size, cross-faded; each tile is normalised on its own, so results
differ from untiled ones). Left out: batch slicing (decode a few videos at a time instead), diffusers' splitting of
very large convolutions along time (same result, less peak memory), the original SAT checkpoint layout, the VAE
training losses.

    vae = from_pretrained("cogvideox-5b")                  # THUDM/CogVideoX-5b, subfolder vae
    latents = vae.encode(video)                            # video (B, 3, 49, 480, 720) in [-1, 1] -> (B, 16, 13, 60, 90)
    video = vae.decode(latents, tiled=True)                # back to (B, 3, 49, 480, 720), clamped to [-1, 1]
"""

import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    in_channels: int = 3  # video channels in
    out_channels: int = 3  # video channels out
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 256, 512)  # width per level; each level after the first halves H, W
    layers_per_block: int = 3  # ResNet blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    scaling_factor: float = 1.15258426  # latents seen by the diffusion model: z * scaling_factor
    sample_height: int = 480  # video size the VAE was trained at; tiles are half of it
    sample_width: int = 720
    force_upcast: bool = True  # diffusers' hint: keep this VAE in float32 when the denoiser runs in float16
    repo: str = ""  # Hugging Face Hub repo holding the weights
    subfolder: str = "vae"  # folder of the repo with config.json and diffusion_pytorch_model.safetensors


# fmt: off
CONFIGS = {
    "cogvideox-2b": Config(scaling_factor=1.15258426, repo="THUDM/CogVideoX-2b"),
    "cogvideox-5b": Config(scaling_factor=0.7, repo="THUDM/CogVideoX-5b"),
    "tiny":         Config(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                           sample_height=96, sample_width=80),  # tiles of 48 x 40 pixels, 6 x 5 latents
}
# fmt: on

TIME_LEVELS = 2  # the first two levels halve T: time is compressed 4x
VIDEO_FRAMES_PER_BATCH = 8  # frames the encoder sees at once (the first batch one more)
LATENT_FRAMES_PER_BATCH = 2  # latent frames the decoder sees at once (the first batch one more)

# ----------------------------------------------------------------------------
# Building blocks. Every GroupNorm uses eps 1e-6, as the released weights were trained with.


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class CausalConv3d(nn.Module):
    """3-D conv that keeps T, H, W: H and W are zero-padded on both sides, T only on the past side. The past of the
    first frame is copies of that frame; the past of a later batch of frames is the end of the previous batch, which
    `cache` (a dict the caller creates per video, keyed by module) carries."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.past = kernel_size - 1  # frames of the past each output frame sees
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x, cache):
        if self.past:
            past = cache.get(self)
            if past is None:
                past = x[:, :, :1].expand(-1, -1, self.past, -1, -1)
            x = torch.cat([past, x], dim=2)  # (B, C, past + T, H, W)
            cache[self] = x[:, :, -self.past :].clone()  # a copy, so the whole padded input can be freed
        return self.conv(x)


class SpatialNorm3D(nn.Module):
    """GroupNorm whose per-position scale and shift are 1x1x1 convs of the latents z, resized nearest-neighbour to the
    features (MoVQ eq. 5). When the features have an odd number of frames > 1, the first latent frame is stretched
    over the first frame alone and the others over the rest, mirroring how the encoder compressed time."""

    def __init__(self, channels, latent_channels, groups):
        super().__init__()
        self.norm_layer = group_norm(channels, groups)
        self.conv_y = CausalConv3d(latent_channels, channels, 1)
        self.conv_b = CausalConv3d(latent_channels, channels, 1)

    def forward(self, x, z, cache):
        T, H, W = x.shape[2:]
        if T > 1 and T % 2 == 1:
            first = F.interpolate(z[:, :, :1], size=(1, H, W))
            z = torch.cat([first, F.interpolate(z[:, :, 1:], size=(T - 1, H, W))], dim=2)
        else:
            z = F.interpolate(z, size=(T, H, W))  # (B, latent_channels, T, H, W)
        return self.norm_layer(x) * self.conv_y(z, cache) + self.conv_b(z, cache)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (norm, SiLU, 3x3x3 causal conv) twice, 1x1x1 conv on the skip when the width
    changes. The norms are plain GroupNorms in the encoder and latent-conditioned SpatialNorm3Ds in the decoder."""

    def __init__(self, in_channels, out_channels, groups, latent_channels=None):
        super().__init__()
        if latent_channels is None:
            self.norm1, self.norm2 = group_norm(in_channels, groups), group_norm(out_channels, groups)
        else:
            self.norm1 = SpatialNorm3D(in_channels, latent_channels, groups)
            self.norm2 = SpatialNorm3D(out_channels, latent_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def norm(self, norm, x, z, cache):
        return norm(x) if z is None else norm(x, z, cache)

    def forward(self, x, cache, z=None):
        h = self.conv1(F.silu(self.norm(self.norm1, x, z, cache)), cache)
        h = self.conv2(F.silu(self.norm(self.norm2, h, z, cache)), cache)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve H, W with a stride-2 3x3 conv per frame (zeros added at the bottom and right only, as in the released
    weights); with `compress_time`, first halve T by averaging pairs of frames, leaving an odd first frame alone."""

    def __init__(self, channels, compress_time):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        if self.compress_time:
            lone = x.shape[2] % 2  # an odd first frame stands for one video frame
            rest = x[:, :, lone:]
            x = torch.cat([x[:, :, :lone], (rest[:, :, 0::2] + rest[:, :, 1::2]) / 2], dim=2)
        B, C, T = x.shape[:3]
        x = F.pad(x, (0, 1, 0, 1)).transpose(1, 2).flatten(0, 1)  # (B*T, C, H+1, W+1)
        x = self.conv(x)  # (B*T, C, H/2, W/2)
        return x.unflatten(0, (B, T)).transpose(1, 2)  # (B, C, T, H/2, W/2)


class Upsample(nn.Module):
    """Double H, W nearest-neighbour, then a 3x3 conv per frame; with `compress_time`, also repeat every frame twice
    in time, except an odd first frame (the inverse of Downsample's frame pairs)."""

    def __init__(self, channels, compress_time):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # (B, C, T, 2H, 2W)
        if self.compress_time and x.shape[2] > 1:
            lone = x.shape[2] % 2
            x = torch.cat([x[:, :, :lone], x[:, :, lone:].repeat_interleave(2, dim=2)], dim=2)
        B, C, T = x.shape[:3]
        x = self.conv(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, 2H, 2W)
        return x.unflatten(0, (B, T)).transpose(1, 2)


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, downsample, compress_time):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels, compress_time)]) if downsample else None

    def forward(self, x, cache):
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, latent_channels, upsample, compress_time):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, latent_channels)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels, compress_time)]) if upsample else None

    def forward(self, x, z, cache):
        for resnet in self.resnets:
            x = resnet(x, cache, z)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Two ResNet blocks at the lowest resolution (no attention in this VAE)."""

    def __init__(self, channels, groups, latent_channels=None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, latent_channels) for _ in range(2))

    def forward(self, x, cache, z=None):
        for resnet in self.resnets:
            x = resnet(x, cache, z)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        widths, groups, levels = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block, groups, i < levels - 1, i < TIME_LEVELS)
            for i in range(levels)
        )
        self.mid_block = MidBlock(widths[-1], groups)
        self.norm_out = group_norm(widths[-1], groups)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.latent_channels, 3)  # mean and log-variance

    def forward(self, x, cache):
        x = self.conv_in(x, cache)  # (B, widths[0], T, H, W)
        for block in self.down_blocks:
            x = block(x, cache)  # (B, widths[-1], t, H/8, W/8) after the last one
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, 2 * latent_channels, t, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        widths, groups, levels = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        c = cfg.latent_channels
        self.conv_in = CausalConv3d(c, widths[0], 3)
        self.mid_block = MidBlock(widths[0], groups, c)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1, groups, c, i < levels - 1, i < TIME_LEVELS
            )
            for i in range(levels)
        )
        self.norm_out = SpatialNorm3D(widths[-1], c, groups)
        self.conv_out = CausalConv3d(widths[-1], cfg.out_channels, 3)

    def forward(self, z, cache):
        x = self.mid_block(self.conv_in(z, cache), cache, z)  # (B, widest, t, h, w)
        for block in self.up_blocks:
            x = block(x, z, cache)  # (B, block_out_channels[0], T, 8h, 8w) after the last one
        return self.conv_out(F.silu(self.norm_out(x, z, cache)), cache)  # (B, out_channels, T, 8h, 8w)


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
# Frame batches and spatial tiles


def frame_batches(frames, size):
    """(start, end) of the batches diffusers splits `frames` frames into: `size` each, the remainder in the first."""
    if frames <= size:
        return [(0, frames)]
    first = size + frames % size
    return [(0, first)] + [(start, start + size) for start in range(first, frames, size)]


TILE_OVERLAP = (1 / 6, 1 / 5)  # fraction of a tile shared with the next one, along H and along W


def _fade_into(previous, tile, extent, dim):
    """Cross-fade, in place, the first `extent` rows (dim 3) or columns (dim 4) of `tile` from the last ones of
    `previous`: weight y / extent on the tile at row y, the rest on its neighbour."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    shape = [1] * tile.ndim
    shape[dim] = extent
    # Weights in float64 then cast, as diffusers' Python-float arithmetic gives them.
    w = (torch.arange(extent, dtype=torch.float64) / extent).reshape(shape)
    head, tail = tile.narrow(dim, 0, extent), previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail * (1 - w).to(tile) + head * w.to(tile))


def _tiled(fn, x, tile, stride, blend, keep):
    """Apply `fn` to tiles of `x` (B, C, T, H, W) of side `tile` (h, w) every `stride` (h, w), cross-fade each
    result over `blend` rows and columns with its upper and left neighbours (already faded), cut it to `keep` and put
    the pieces together: diffusers' tiled encode and decode. `tile` and `stride` count positions of x, `blend` and
    `keep` positions of fn's output. Tiles are normalised on their own, so the result differs from the untiled one.
    """
    H, W = x.shape[-2:]
    rows = [
        [fn(x[..., i : i + tile[0], j : j + tile[1]]) for j in range(0, W, stride[1])] for i in range(0, H, stride[0])
    ]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i > 0:
                _fade_into(rows[i - 1][j], out, blend[0], dim=3)
            if j > 0:
                _fade_into(row[j - 1], out, blend[1], dim=4)
    return torch.cat([torch.cat([out[..., : keep[0], : keep[1]] for out in row], dim=4) for row in rows], dim=3)


# ----------------------------------------------------------------------------
# Model


class AutoencoderKLCogVideoX(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if len(cfg.block_out_channels) <= TIME_LEVELS:
            raise ValueError(f"CogVideoX's VAE needs at least {TIME_LEVELS + 1} levels to compress time 4x")
        self.cfg = cfg
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)  # frame side / latent side
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _tiling(self, decoding):
        """diffusers' enable_tiling() defaults: tiles of half the training size, overlapping by TILE_OVERLAP. Returns
        tile and stride in input positions, blend and keep in output positions (latents and pixels, or the reverse)."""
        pixels = [self.cfg.sample_height // 2, self.cfg.sample_width // 2]
        latents = [int(side / self.factor) for side in pixels]
        tile, out_tile = (latents, pixels) if decoding else (pixels, latents)
        stride = [int(side * (1 - overlap)) for side, overlap in zip(tile, TILE_OVERLAP)]
        blend = [int(side * overlap) for side, overlap in zip(out_tile, TILE_OVERLAP)]
        keep = [side - b for side, b in zip(out_tile, blend)]
        # Each tile's kept part must cover exactly one stride, or the pieces would not line up (diffusers does not
        # check; the released 480 x 720 sizes satisfy it).
        scale = self.factor if decoding else 1 / self.factor
        if min(stride) < 1 or any(s * scale != k for s, k in zip(stride, keep)):
            raise ValueError(
                f"tiles of {tile} every {stride} keeping {keep} do not line up; choose sample_height / sample_width "
                "whose halves split evenly into latents, as 480 x 720 does"
            )
        return tile, stride, blend, keep

    def _encode_frames(self, x):
        """Moments of x in frame batches, the conv cache carried from each batch to the next."""
        cache = {}
        return torch.cat(
            [self.encoder(x[:, :, a:b], cache) for a, b in frame_batches(x.shape[2], VIDEO_FRAMES_PER_BATCH)], 2
        )

    def _decode_frames(self, z):
        """Frames of z in latent-frame batches, the conv cache carried from each batch to the next."""
        cache = {}
        return torch.cat(
            [self.decoder(z[:, :, a:b], cache) for a, b in frame_batches(z.shape[2], LATENT_FRAMES_PER_BATCH)], 2
        )

    def posterior(self, x, tiled=False):
        """The Gaussian posterior of videos x (B, C, 1 + 8k, H, W) in [-1, 1]; mean and logvar are
        (B, latent_channels, 1 + 2k, H/8, W/8). `tiled` encodes frames larger than half the training size in
        overlapping tiles, as diffusers does after enable_tiling(), to bound memory."""
        if x.ndim != 5:
            raise ValueError(f"expected videos (B, C, T, H, W), got a tensor of shape {tuple(x.shape)}")
        T, H, W = x.shape[2:]
        if T % 8 != 1:
            raise ValueError(
                f"CogVideoX's VAE encodes 1 + 8k frames (1, 9, 17, ..., 49), got {T}: other counts give an even number "
                "of latent frames, which the decoder expands to 4x as many frames instead of 1 + 4 * (latents - 1)"
            )
        if H % self.factor or W % self.factor:
            raise ValueError(f"frame sides {(H, W)} must be multiples of {self.factor}")
        if tiled:
            tile, stride, blend, keep = self._tiling(decoding=False)
            if H > tile[0] or W > tile[1]:
                return DiagonalGaussian(_tiled(self._encode_frames, x, tile, stride, blend, keep))
        return DiagonalGaussian(self._encode_frames(x))

    def decode_raw(self, z, tiled=False):
        """Videos (B, C, 1 + 4 * (t - 1), 8h, 8w) from un-normalised latents z (B, latent_channels, t, h, w) with an
        odd t (what `posterior` describes), not clamped; `tiled` as in `posterior`."""
        if z.ndim != 5:
            raise ValueError(f"expected latents (B, C, T, H, W), got a tensor of shape {tuple(z.shape)}")
        t, h, w = z.shape[2:]
        if t % 2 != 1:
            raise ValueError(f"CogVideoX's VAE decodes an odd number of latent frames (1 + 2k), got {t}")
        if tiled:
            tile, stride, blend, keep = self._tiling(decoding=True)
            if h > tile[0] or w > tile[1]:
                return _tiled(self._decode_frames, z, tile, stride, blend, keep)
        return self._decode_frames(z)

    def encode(self, x, sample=True, generator=None, tiled=False):
        """Videos in [-1, 1] to the normalised latents a diffusion model sees. `sample=True` draws from the posterior
        (what FastGen's encoders do), `sample=False` takes its mean."""
        posterior = self.posterior(x, tiled)
        z = posterior.sample(generator) if sample else posterior.mean
        return z * self.cfg.scaling_factor

    def decode(self, latents, tiled=False):
        """Normalised latents back to videos, clamped to [-1, 1]."""
        return self.decode_raw(latents / self.cfg.scaling_factor, tiled).clamp(-1.0, 1.0)

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


def load_checkpoint(model, path):
    """Load a diffusers-layout safetensors file into `model`, strictly (assign=True keeps meta-built models cheap)."""
    state = _read_safetensors(path)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
_DIFFUSERS_FIXED = {  # the only values this file implements
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "temporal_compression_ratio": 4,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "invert_scale_latents": False,
}


def config_from_diffusers(d):
    """Config from the fields of a diffusers AutoencoderKLCogVideoX config.json; values this file does not implement
    are an error."""
    if d.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
        raise ValueError(f"config.json describes a {d['_class_name']}, not an AutoencoderKLCogVideoX")
    known = {f.name for f in fields(Config)} - {"repo", "subfolder"}
    allowed = known | _DIFFUSERS_IGNORED | _DIFFUSERS_FIXED.keys() | {"down_block_types", "up_block_types"}
    if unknown := set(d) - allowed:
        raise ValueError(f"config.json has fields this AutoencoderKLCogVideoX does not know: {sorted(unknown)}")
    for name, value in _DIFFUSERS_FIXED.items():
        if d.get(name, value) != value:
            raise ValueError(f"config.json sets {name}={d[name]!r}; only {value!r} is implemented")
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})
    levels = len(cfg.block_out_channels)
    for name, block in (("down_block_types", "CogVideoXDownBlock3D"), ("up_block_types", "CogVideoXUpBlock3D")):
        types = list(d.get(name, [block] * levels))
        if types != [block] * levels:
            raise ValueError(f"config.json sets {name}={types}; only {levels} x {block} is implemented")
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
    """Build an AutoencoderKLCogVideoX on the meta device and load its weights strictly.

    `name_or_path`: a name in CONFIGS (its Hub repo and folder), a Hub repo id, a local directory (its `subfolder`
    if that exists, else the directory itself), or a single .safetensors file (or sharded index). The architecture
    comes from `config` (a CONFIGS name or a Config) if given, else from the preset, else from the config.json next
    to the weights. The model comes back in eval mode with gradients off, as the diffusion methods use it.
    """
    if name_or_path in CONFIGS:
        preset = CONFIGS[name_or_path]
        if not preset.repo:
            raise ValueError(
                f"{name_or_path} has no released weights; build it with AutoencoderKLCogVideoX(CONFIGS[...])"
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
            config = config_from_diffusers(json.load(f))

    with torch.device("meta"):
        model = AutoencoderKLCogVideoX(config)
    load_checkpoint(model, weights)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = AutoencoderKLCogVideoX(CONFIGS["tiny"]).eval()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode(video, generator=torch.Generator().manual_seed(0))
        decoded = model.decode(latents)
    n = sum(p.numel() for p in model.parameters())
    shapes = " -> ".join(str(tuple(t.shape)) for t in (video, latents, decoded))
    print(f"cogvideox_vae tiny: {n:,} parameters, video -> latents -> video {shapes}")
