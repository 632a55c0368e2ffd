"""CPU benchmark of the causal Wan path in models/wan.py, in one run:

1. the 4-step chunk-by-chunk rollout with the KV cache (wan.causal_sample) against recomputing the whole prefix for
   every chunk and step (one block-causal pass over the committed clean chunks plus the current one), the speedup
   reported at 7 chunks (21 latent frames in chunks of 3, as Self-Forcing on Wan 1.3B);
2. the bidirectional forward of the same small config against diffusers' WanTransformer3DModel with the same weights.

    python bench/bench_wan_causal.py            # a Python with requirements-dev.txt (diffusers)
    python bench/bench_wan_causal.py --no_diffusers                    # part 1 only
    OMP_NUM_THREADS=1 python bench/bench_wan_causal.py --no_rollout --iters 15   # part 2 only

Each part first checks that the two computations agree, then alternates timed runs (machine load hits both alike)
and reports medians with the range. On a shared machine the forward's process CPU time (also reported) varies far
less than the wall clock; with one thread it is the honest comparison.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import wan  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--chunks", type=int, default=7)
parser.add_argument("--chunk_size", type=int, default=3, help="latent frames per chunk")
parser.add_argument("--size", type=int, default=16, help="latent height and width (tokens: size / 2 squared per frame)")
parser.add_argument("--iters", type=int, default=3, help="timed runs per implementation")
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--no_diffusers", action="store_true")
parser.add_argument("--no_rollout", action="store_true", help="skip part 1")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

# A small Wan: 4 blocks of width 240 (4 heads of 60: diffusers splits RoPE as ours only when 6 divides the head
# dimension), the real layout otherwise.
cfg = replace(wan.CONFIGS["tiny"], num_attention_heads=4, attention_head_dim=60, in_channels=16, out_channels=16,
              text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=4, rope_max_seq_len=128)  # fmt: skip
torch.manual_seed(0)
model = wan.WanModel(cfg).eval()
F = args.chunks * args.chunk_size
noise = torch.randn(1, 16, F, args.size, args.size)
text = torch.randn(1, 64, 64)
times = torch.tensor(wan.SELF_FORCING_T_LIST, dtype=torch.float64)


def elapsed(fn):
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def wall_and_cpu(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(seconds):
    return f"{statistics.median(seconds) * 1000:.1f} ms ({min(seconds) * 1000:.0f}-{max(seconds) * 1000:.0f})"


@torch.no_grad()
def cached():
    return wan.causal_sample(model, noise, text, times, chunk_size=args.chunk_size, stochastic=False)


@torch.no_grad()
def recompute():
    """The same rollout without a cache: every denoising step of chunk c runs the block-causal network over the
    committed clean chunks 0..c-1 (at t = 0) and chunk c (at t_k), and keeps chunk c's output."""
    done = []
    for start in range(0, F, args.chunk_size):
        x = wan.add_noise(torch.zeros_like(noise[:, :, start : start + args.chunk_size]), noise[:, :, start : start + args.chunk_size], times[0])  # fmt: skip
        for i in range(len(times) - 1):
            clip = torch.cat(done + [x], dim=2)
            t = torch.zeros(1, clip.shape[2], dtype=torch.float64)
            t[:, start:] = times[i]
            flow = model(clip, t, text, chunk_size=args.chunk_size)[:, :, start:]
            x0 = wan.to_x0(x, flow, times[i])
            x = x0 if times[i + 1] == 0 else wan.add_noise(x0, wan.from_x0(x, x0, times[i], "eps"), times[i + 1])
        done.append(x)
    return torch.cat(done, dim=2)


print(f"config: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {F} latent frames of {args.size}x{args.size} ({(args.size // 2) ** 2} tokens each), {args.chunks} chunks of {args.chunk_size}, 4 steps")  # fmt: skip
if not args.no_rollout:
    a, b = cached(), recompute()
    err = (a - b).abs().max().item()
    print(f"KV-cached rollout vs prefix recomputation: max |diff| {err:.2e}")
    assert err < 1e-3, "the cached rollout does not match the recomputed one"
    t_cache, t_full = [], []
    for _ in range(args.iters):
        t_cache.append(elapsed(cached))
        t_full.append(elapsed(recompute))
    mc, mf = statistics.median(t_cache), statistics.median(t_full)
    print(f"rollout, {args.chunks} chunks: KV cache {mc:.3f} s, recompute prefix {mf:.3f} s -> speedup {mf / mc:.2f}x")


def import_diffusers_wan():
    """diffusers' WanTransformer3DModel. transformers (imported by diffusers' loaders) imports torchvision, which Wan
    does not use; where the installed torchvision does not load (a build for another torch), empty modules stand in
    (as tests/generate/make_wan_fixtures.py does)."""
    import importlib.abc
    import importlib.machinery
    import types
    from unittest import mock

    class Placeholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__path__ = []
            module.__getattr__ = lambda attr: mock.MagicMock(name=f"{spec.name}.{attr}")
            return module

        def exec_module(self, module):
            pass

    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            sys.modules.pop(name)
        sys.meta_path.insert(0, Placeholder())
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


if not args.no_diffusers:
    WanTransformer3DModel = import_diffusers_wan()

    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=cfg.num_attention_heads,
                                attention_head_dim=cfg.attention_head_dim, in_channels=16, out_channels=16,
                                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                eps=1e-6, rope_max_seq_len=cfg.rope_max_seq_len).eval()  # fmt: skip
    ref.load_state_dict(model.state_dict(), strict=True)
    x, t = noise * 0.7, torch.tensor([0.7])
    with torch.no_grad():
        ours = lambda: model(x, t, text)  # noqa: E731
        theirs = lambda: ref(x, 1000 * t, text, return_dict=False)[0]  # noqa: E731
        err = (ours() - theirs()).abs().max().item()
        print(f"bidirectional forward vs diffusers WanTransformer3DModel: max |diff| {err:.2e}")
        assert err < 1e-3, "the forward does not match diffusers"
        t_ours, t_theirs = [], []
        for _ in range(args.iters + 2):
            t_ours.append(wall_and_cpu(ours))
            t_theirs.append(wall_and_cpu(theirs))
    for i, clock in enumerate(("wall", "process CPU")):
        o, d = [t[i] for t in t_ours], [t[i] for t in t_theirs]
        print(
            f"forward ({F} frames, {torch.get_num_threads()} threads), {clock} median (range): models/wan.py {summary(o)}, "
            f"diffusers {summary(d)} -> ratio {statistics.median(d) / statistics.median(o):.2f}x"
        )
