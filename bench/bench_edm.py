"""Forward+backward time of the full-size CIFAR-10 DDPM++ network: models/edm.py against the official NVlabs/edm code.

    git clone https://github.com/NVlabs/edm /tmp/edm
    python bench/bench_edm.py --edm_repo /tmp/edm                # batch 8, fp32, CPU

Both networks get the same weights and inputs; the script checks that their outputs agree, then alternates timed
iterations of the two (so machine load affects both alike) and reports the median times and their ratio.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import edm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--edm_repo", required=True, help="checkout of https://github.com/NVlabs/edm")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--iters", type=int, default=10, help="timed iterations per implementation")
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--device", default="cpu")
parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

sys.path.insert(0, args.edm_repo)
from training.networks import EDMPrecond as OfficialEDMPrecond  # noqa: E402

cfg = edm.CONFIGS["edm-cifar10-32x32-cond-vp"]
torch.manual_seed(0)
official = OfficialEDMPrecond(
    img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.0,
).to(args.device)  # fmt: skip
ours = edm.EDMPrecond(cfg).to(args.device)
ours.load_state_dict(official.state_dict(), strict=True)

x = torch.randn(args.batch, 3, 32, 32, device=args.device)
sigma = torch.logspace(-2, 1.5, args.batch, device=args.device)
labels = torch.nn.functional.one_hot(torch.arange(args.batch) % 10, 10).float().to(args.device)
with torch.no_grad():
    ref, out = official(x, sigma, labels), ours(x, sigma, labels)
err = ((out - ref).abs().max() / ref.abs().max()).item()
print(f"outputs agree: max abs error {err:.1e} of the output scale")


def step(net):
    net.zero_grad(set_to_none=True)
    start = time.perf_counter()
    net(x, sigma, labels).square().mean().backward()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


for _ in range(args.warmup):
    step(official), step(ours)
times = {"official": [], "ours": []}
for _ in range(args.iters):
    times["official"].append(step(official))
    times["ours"].append(step(ours))
med = {k: statistics.median(v) for k, v in times.items()}
print(f"batch {args.batch}, fp32, {args.device}, {torch.get_num_threads()} threads, median of {args.iters}:")
print(f"  official NVlabs/edm  {med['official'] * 1e3:8.1f} ms / forward+backward")
print(f"  models/edm.py        {med['ours'] * 1e3:8.1f} ms / forward+backward")
print(f"  ratio ours/official  {med['ours'] / med['official']:.3f}")
