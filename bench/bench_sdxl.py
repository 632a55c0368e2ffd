"""Forward+backward time and peak memory of a mid-size SDXL-style UNet: models/sdxl.py against diffusers'
UNet2DConditionModel with the same config and weights.

    pip install diffusers                                   # requirements-dev.txt; the bench only, never the tests
    python bench/bench_sdxl.py --threads 2                  # batch 2, 64x64 latents, fp32, CPU

The configuration is sdxl.CONFIGS["mid"] (channels 128/256/512, transformer depths 1/2/2 with no attention on the
first level, SDXL's text-time micro-conditioning; 166M parameters). The script checks that both networks give the same
output, alternates timed iterations of the two (so machine load affects both alike; which one goes first swaps every
iteration, so neither always runs in the other's wake), and reports median times with their range; peak
memory is the resident-set high-water mark of a fresh process per implementation during one forward+backward (read from
/proc, so Linux only).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from models import sdxl  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
parser.add_argument("--iters", type=int, default=6, help="timed iterations per implementation")
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
parser.add_argument("--memory_of", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # the child processes
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

cfg = sdxl.CONFIGS["mid"]


def diffusers_config():
    """diffusers' UNet2DConditionModel arguments for `cfg` (SDXL's unet/config.json with the mid sizes)."""
    levels = len(cfg.block_out_channels)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)]
    return dict(
        sample_size=args.latent, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=list(cfg.transformer_layers_per_block),
        attention_head_dim=list(cfg.num_attention_heads), cross_attention_dim=cfg.cross_attention_dim,
        use_linear_projection=cfg.use_linear_projection, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim,
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu", upcast_attention=False,
    ) if levels else None  # fmt: skip


def build(which):
    torch.manual_seed(0)
    ours = sdxl.UNet(cfg)
    if which == "ours":
        return ours, lambda x, t, c: ours(x, t, c["text"], c["pooled"], c["time_ids"])
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch: make it look absent to transformers
        sys.modules["torchvision"] = None
    from diffusers import UNet2DConditionModel

    theirs = UNet2DConditionModel(**diffusers_config())
    theirs.load_state_dict(ours.state_dict(), strict=True)

    def call(x, t, c):
        added = {"text_embeds": c["pooled"], "time_ids": c["time_ids"]}
        return theirs(x, t, encoder_hidden_states=c["text"], added_cond_kwargs=added).sample

    return theirs, call


torch.manual_seed(1)
B, S = args.batch, args.latent
x = torch.randn(B, cfg.in_channels, S, S)
t = torch.tensor([999.0, 500.0][:B] + [250.0] * max(B - 2, 0))
pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
cond = dict(text=torch.randn(B, 77, cfg.cross_attention_dim), pooled=torch.randn(B, pooled_dim),
            time_ids=sdxl.add_time_ids((8 * S, 8 * S), (0, 0), (8 * S, 8 * S), batch=B))  # fmt: skip


def step(net, call):
    net.zero_grad(set_to_none=True)
    start = time.perf_counter()
    call(x, t, cond).square().mean().backward()
    return time.perf_counter() - start


def rss_kb(field):
    """VmRSS (now) or VmHWM (high-water mark) of this process in kB, from /proc (Linux). getrusage's ru_maxrss would
    not do: it outlives exec, so a child of the big benchmark process would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


if args.memory_of:  # child: one forward+backward, then the high-water mark of the step alone
    net, call = build(args.memory_of)  # the diffusers child also built (and freed) ours for its weights
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set, forgetting the peak of building the networks
    before = rss_kb("VmRSS")
    step(net, call)
    peak = rss_kb("VmHWM")
    print(json.dumps(dict(before_kb=before, peak_kb=peak)))
    sys.exit()

nets = {name: build(name) for name in ("ours", "diffusers")}
with torch.no_grad():
    out, ref = (call(x, t, cond) for _, call in nets.values())
print(f"outputs agree: max abs error {((out - ref).abs().max() / ref.abs().max()).item():.1e} of the output scale")
params = sum(p.numel() for p in nets["ours"][0].parameters())
for _ in range(args.warmup):
    for net, call in nets.values():
        step(net, call)
times = {name: [] for name in nets}
for i in range(args.iters):
    for name in list(nets) if i % 2 == 0 else list(nets)[::-1]:
        times[name].append(step(*nets[name]))
med = {k: statistics.median(v) for k, v in times.items()}

memory = {}
for name in nets:
    command = [sys.executable, __file__, "--memory_of", name, "--batch", str(B), "--latent", str(S)]
    command += ["--threads", str(args.threads)] if args.threads else []
    memory[name] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])  # fmt: skip

print(f"SDXL-style mid UNet ({params / 1e6:.1f}M parameters), batch {B}, latents {S}x{S}, fp32, CPU, "
      f"{torch.get_num_threads()} threads, median of {args.iters}:")  # fmt: skip
for name in nets:
    m = memory[name]
    spread = f"({min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f})"
    print(f"  {name:10s} {med[name] * 1e3:8.0f} ms {spread:>13s} / forward+backward   "
          f"peak RSS {m['peak_kb'] / 2**20:.2f} GB "
          f"(+{(m['peak_kb'] - m['before_kb']) / 2**20:.2f} GB in the step)")  # fmt: skip
step_kb = {name: m["peak_kb"] - m["before_kb"] for name, m in memory.items()}  # without the imports and weights
print(f"  ratio ours/diffusers: time {med['ours'] / med['diffusers']:.3f}, "
      f"peak memory {memory['ours']['peak_kb'] / memory['diffusers']['peak_kb']:.3f} "
      f"(in the step {step_kb['ours'] / step_kb['diffusers']:.3f})")  # fmt: skip
