"""GPU benchmark: streaming generation with a Wan-1.3B-shaped causal student, as Self-Forcing measures it (Table 1:
17.0 FPS and 0.69 s first-chunk latency on one H100).

A 4-step chunk-by-chunk rollout with the KV cache (models/wan.py forward_chunk; 21 latent frames in 7 chunks of 3,
60 x 104 latents = 832 x 480 pixels, 81 video frames), each finished chunk committed to the cache at t = 0 and decoded
to pixels right away by the Wan 2.1 VAE (models/wan_vae.py, its causal decoder cache carried across chunks), bf16,
random weights (speed does not depend on them), one prompt, no CFG (the distilled student runs without it).

    python bench/bench_wan_causal_gpu.py                 # one GPU
    python bench/bench_wan_causal_gpu.py --tiny          # a CPU check of the same code path in seconds

Reports the latency to the first decoded chunk, the total time and frames per second (81 / total), median over
--iters runs after --warmup. Self-checks: output shape and finiteness; with --tiny also that the streamed rollout
equals wan.causal_sample and the streamed decode equals one decode of the whole clip.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import wan, wan_vae  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", help="tiny Wan and VAE, small clip, float32 on the CPU")
parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
parser.add_argument("--height", type=int, default=60, help="latent height (480 px)")
parser.add_argument("--width", type=int, default=104, help="latent width (832 px)")
parser.add_argument("--chunk_size", type=int, default=3)
parser.add_argument("--iters", type=int, default=3)
parser.add_argument("--warmup", type=int, default=1)
args = parser.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
dtype = torch.float32 if args.tiny else torch.bfloat16
if args.tiny:
    args.frames, args.height, args.width, args.iters, args.warmup = 7, 4, 4, 1, 0
    cfg, vae_cfg = wan.CONFIGS["tiny"], wan_vae.CONFIGS["tiny"]
else:
    cfg, vae_cfg = replace(wan.CONFIGS["wan2.1-t2v-1.3b"], repo=""), wan_vae.CONFIGS["wan2.1"]
torch.manual_seed(0)
with torch.device(device):
    model = wan.WanModel(cfg).to(dtype).eval()
    vae = wan_vae.WanVAE(vae_cfg).to(dtype).eval()
text = torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype) * 0.1
noise = torch.randn(1, cfg.in_channels, args.frames, args.height, args.width, device=device, dtype=dtype)
times = torch.tensor(wan.SELF_FORCING_T_LIST, dtype=torch.float64)
print(f"{'tiny' if args.tiny else 'Wan-1.3B-shaped'} causal student: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "  # fmt: skip
      f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M, {dtype}, {device}"
      f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}")  # fmt: skip


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def stream(generator_seed=0):
    """The rollout, chunk by chunk, decoding each chunk as soon as it is committed. Returns (latents, video, the
    time of the first decoded chunk, the total time)."""
    gen = torch.Generator(device).manual_seed(generator_seed)
    B, _, T, H, W = noise.shape
    cache = wan.KVCache(model, B, T, H, W, device=device, dtype=dtype)
    vae_cache = {}
    mean, std = vae._latent_stats(noise.float())
    latents, video, first, start = [], [], None, 0
    sync()
    tic = time.perf_counter()
    for n in wan.chunk_frames(T, args.chunk_size):
        x = wan.add_noise(torch.zeros_like(noise[:, :, start : start + n]), noise[:, :, start : start + n], times[0])
        for i in range(len(times) - 1):  # 4 denoising steps, fresh noise between them (the students' sampler)
            x0 = wan.to_x0(x, model.forward_chunk(x, times[i].expand(B).to(device), text, cache, start_frame=start), times[i])  # fmt: skip
            if times[i + 1] > 0:
                x = wan.add_noise(x0, torch.randn(x.shape, generator=gen, device=device, dtype=dtype), times[i + 1])
            else:
                x = x0
        model.forward_chunk(x, torch.zeros(B, device=device), text, cache, commit=True, start_frame=start)
        z = vae.post_quant_conv((x.float() * std + mean).to(dtype))
        frames = [vae.decoder(z[:, :, f : f + 1], vae_cache) for f in range(n)]  # the decoder's causal cache
        video.append(torch.cat(frames, dim=2).clamp(-1, 1))
        latents.append(x)
        if first is None:
            sync()
            first = time.perf_counter() - tic
        start += n
    sync()
    return torch.cat(latents, dim=2), torch.cat(video, dim=2), first, time.perf_counter() - tic


latents, video, _, _ = stream()
expected_frames = 1 + 4 * (args.frames - 1)
assert video.shape == (1, 3, expected_frames, 8 * args.height, 8 * args.width), video.shape
assert torch.isfinite(latents).all() and torch.isfinite(video).all(), "non-finite output"
if args.tiny:  # the streamed pieces equal their one-shot references
    with torch.no_grad():
        ref = wan.causal_sample(model, noise, text, times, chunk_size=args.chunk_size, generator=torch.Generator(device).manual_seed(0))  # fmt: skip
        whole = vae.decode(latents)
    assert torch.equal(latents, ref), "streamed rollout differs from wan.causal_sample"
    assert torch.allclose(video, whole, atol=1e-5), "streamed decode differs from one decode of the whole clip"
    print("self-checks passed: rollout = wan.causal_sample, streamed decode = whole-clip decode")

for _ in range(args.warmup):
    stream()
runs = [stream()[2:] for _ in range(args.iters)]
first, total = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
print(f"{expected_frames} frames at {8 * args.width}x{8 * args.height}, {len(wan.chunk_frames(args.frames, args.chunk_size))} chunks, 4 steps, VAE decode included:")  # fmt: skip
print(
    f"  latency to the first chunk {first:.3f} s, total {total:.3f} s, {expected_frames / total:.1f} frames per second"
)
if device.type == "cuda":
    print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
