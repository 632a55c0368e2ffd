"""Forward+backward time and peak memory of the FLUX.1 transformer at the "mid" size (4 double + 8 single blocks,
width 768): models/flux.py against diffusers' FluxTransformer2DModel with the same config and weights.

    python bench/bench_flux.py  # with requirements-dev.txt; CPU, batch 1, 32x32 latents, 128 text tokens
    python bench/bench_flux.py --device cuda --latent 64 --text_len 512 # GPU, 512 px, Flux's T5 length

Run it with a python that has diffusers (it is a bench-only dependency; the project never imports it at runtime).
Both networks get the same weights and inputs; the script checks that their outputs agree, then alternates timed
iterations of the two (so machine load affects both alike) and reports the median times and their ratio. Peak memory:
on CUDA max_memory_allocated around one forward+backward; on the CPU the peak growth of the resident set during one
forward+backward (sampled every millisecond), each implementation measured in a fresh child process.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import flux  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default="mid", help="flux.CONFIGS name")
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
parser.add_argument("--text_len", type=int, default=128)
parser.add_argument("--iters", type=int, default=5, help="timed iterations per implementation")
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--device", default="cpu")
parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
parser.add_argument("--memory_of", choices=["ours", "diffusers"], default=None, help=argparse.SUPPRESS)  # child mode
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)


def import_diffusers():
    try:
        import torchvision  # noqa: F401
    except RuntimeError:  # a CUDA torchvision beside a CPU torch: declare its two operators so diffusers imports
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_diffusers.keep = lib
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
    import diffusers

    return diffusers


def build(which, device):
    """The network `which` with the weights of our seeded FluxModel, and a function that runs one forward+backward."""
    cfg = flux.CONFIGS[args.config]
    torch.manual_seed(0)
    ours = flux.FluxModel(cfg)
    g = torch.Generator().manual_seed(1)
    B, S, L = args.batch, args.latent, args.text_len
    x = torch.randn(B, 16, S, S, generator=g).to(device)
    text = torch.randn(B, L, cfg.joint_attention_dim, generator=g).to(device)
    pooled = torch.randn(B, cfg.pooled_projection_dim, generator=g).to(device)
    t, guidance = torch.full((B,), 0.7, device=device), torch.full((B,), 3.5, device=device)
    if which == "ours":
        net = ours.to(device)

        def forward():
            return net(x, t, text, pooled, guidance)
    else:
        diffusers = import_diffusers()
        net = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim, guidance_embeds=cfg.guidance_embeds,
            axes_dims_rope=list(cfg.axes_dims_rope),
        )  # fmt: skip
        net.load_state_dict(ours.state_dict(), strict=True)
        net = net.to(device)
        img_ids = flux.image_ids(S // 2, S // 2, device)
        txt_ids = flux.text_ids(L, device)

        def forward():
            out = net(flux.pack(x), text, pooled, t, img_ids, txt_ids, guidance).sample
            return flux.unpack(out, S, S)

    def step():
        net.zero_grad(set_to_none=True)
        out = forward()
        out.float().square().mean().backward()
        return out.detach()

    return net, forward, step


def sync():
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(which):
    """Bytes: CUDA peak allocation during one forward+backward, or the growth of the CPU process's peak RSS."""
    net, forward, step = build(which, args.device)
    step()  # warm-up: lazy allocations and caches are not the network's working set
    net.zero_grad(set_to_none=True)  # the measured step allocates its gradients afresh
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = forward()
        saved = torch.cuda.memory_allocated() - base
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, saved
    # CPU: the resident set sampled every millisecond from another thread, its peak during the step minus its size
    # before (the child runs with a fixed malloc mmap threshold, so freed tensors leave the resident set).
    import threading

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    peak, running = [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    base = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    out = forward()
    saved = rss() - base  # the activations kept for the backward pass
    out.float().square().mean().backward()
    running[0] = False
    sampler.join()
    return max(peak[0], rss()) - base, saved


if args.memory_of:
    peak, saved = peak_memory(args.memory_of)
    print(json.dumps({"peak_bytes": peak, "activation_bytes": saved}))
    sys.exit(0)

nets = {which: build(which, args.device) for which in ("ours", "diffusers")}
with torch.no_grad():
    outs = {which: forward().float() for which, (_, forward, _) in nets.items()}
err = (outs["ours"] - outs["diffusers"]).abs().max().item() / outs["diffusers"].abs().max().item()
print(f"config {args.config}: {sum(p.numel() for p in nets['ours'][0].parameters()):,} parameters, batch {args.batch}, "
      f"{(args.latent // 2) ** 2} image + {args.text_len} text tokens, {args.device}; max relative output difference {err:.1e}")  # fmt: skip

times = {which: [] for which in nets}
for i in range(args.warmup + args.iters):
    for which, (_, _, step) in nets.items():
        sync()
        tic = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times[which].append(time.perf_counter() - tic)
del nets

memory = {}
for which in ("ours", "diffusers"):
    child = [sys.executable, os.path.abspath(__file__), "--memory_of", which, "--config", args.config, "--batch", str(args.batch), "--latent", str(args.latent), "--text_len", str(args.text_len), "--device", args.device]  # fmt: skip
    if args.threads:
        child += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16))
    out = subprocess.run(child, capture_output=True, text=True, check=True, env=env)
    memory[which] = json.loads(out.stdout.strip().splitlines()[-1])

median = {which: statistics.median(ts) for which, ts in times.items()}
print("| implementation | forward+backward (median s) | activations kept for backward (MiB) | step peak above weights (MiB) |")  # fmt: skip
print("|---|---|---|---|")
for which in ("ours", "diffusers"):
    print(f"| {which} | {median[which]:.3f} | {memory[which]['activation_bytes'] / 2**20:.0f} | {memory[which]['peak_bytes'] / 2**20:.0f} |")  # fmt: skip
ratio = {k: memory["ours"][k] / max(memory["diffusers"][k], 1) for k in ("activation_bytes", "peak_bytes")}
print(f"ratio ours / diffusers: time {median['ours'] / median['diffusers']:.2f}, activations {ratio['activation_bytes']:.2f}, step peak {ratio['peak_bytes']:.2f}")  # fmt: skip
