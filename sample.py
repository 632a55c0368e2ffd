"""Sample from a teacher or a student: a PNG grid (and an .npz of uint8 images on request).

    python sample.py --model edm --tiny                                       # random tiny network, seconds on a CPU
    python download.py edm-cifar10-32x32-cond-vp
    python sample.py --model edm --ckpt edm-cifar10-32x32-cond-vp --steps 18  # EDM's Heun sampler, 35 evaluations
    python sample.py --model edm2 --ckpt edm2-img64-s-fid --class 88 --guidance 1.4 --n 16
    python sample.py --model edm --ckpt runs/dmd2/student.safetensors --sampler student --steps 1

`--ckpt` is a name from the model file's CONFIGS (looked up under --root, where download.py writes it) or a
.safetensors file that carries its config in the metadata (what train_edm.py writes).
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models import edm, edm2

# model name -> (model file, model class)
MODELS = {"edm": (edm, edm.EDMPrecond), "edm2": (edm2, edm2.EDM2Precond)}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", choices=sorted(MODELS), default="edm", help="model family")
parser.add_argument("--ckpt", default=None, help="CONFIGS name or .safetensors path (required unless --tiny)")
parser.add_argument("--tiny", action="store_true", help="a tiny randomly initialised network: checks the code path")
parser.add_argument("--root", default=None, help="checkpoint root for CONFIGS names (default $CKPT_ROOT_DIR or ./checkpoints)")  # fmt: skip
parser.add_argument("--sampler", choices=["heun", "euler", "student"], default="heun",
                    help="heun: EDM Alg. 1 (teachers); euler: first-order ODE; student: x0 then re-noise (distilled students)")  # fmt: skip
parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 18 for heun/euler, 1 for student)")
parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale; 1 = off")
parser.add_argument("--class", dest="class_label", type=int, default=None,
                    help="class index for every sample (default: random classes; ignored by unconditional models)")  # fmt: skip
parser.add_argument("--n", type=int, default=64, help="number of images")
parser.add_argument("--batch", type=int, default=64, help="images per network call")
parser.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k for its noise and class")
parser.add_argument(
    "--npz", action="store_true", help="also write samples.npz with uint8 images [N, H, W, C] and labels"
)
parser.add_argument("--out_dir", default="out/samples", help="where samples.png (and samples.npz) are written")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def image_grid(images, cols=None):
    """uint8 [N, H, W, C] -> one uint8 image with the samples on a grid (near-square unless `cols` is given)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img
    return grid


def to_uint8(x):
    """Images in [-1, 1], (B, C, H, W) -> uint8 (B, H, W, C)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def main(args):
    module, model_class = MODELS[args.model]
    if args.tiny:
        torch.manual_seed(args.seed)
        model = model_class(module.CONFIGS["tiny"]).eval()
    elif args.ckpt is None:
        sys.exit("error: give --ckpt NAME_OR_PATH (a CONFIGS name or a .safetensors file), or --tiny")
    else:
        try:
            model = module.from_pretrained(args.ckpt, root=args.root)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
    model = model.to(args.device)
    cfg = model.cfg
    steps = args.steps or (1 if args.sampler == "student" else 18)
    if args.class_label is not None and not 0 <= args.class_label < max(cfg.label_dim, 1):
        sys.exit(f"error: --class {args.class_label} is out of range; this model has {cfg.label_dim} classes")

    images, labels = [], []
    start = time.time()
    for i in tqdm(range(0, args.n, args.batch), unit="batch", desc=f"{args.model} {args.sampler} x{steps}"):
        # Image k draws its noise (and class) from seed `--seed + k`, as EDM's generate.py: results do not depend on
        # --batch, and any subset of images can be regenerated alone.
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        gens = [torch.Generator().manual_seed(args.seed + k) for k in range(i, min(i + args.batch, args.n))]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(args.device)
        y = None
        if cfg.label_dim:
            if args.class_label is not None:
                y = torch.full((len(gens),), args.class_label)
            else:
                y = torch.cat([torch.randint(cfg.label_dim, (1,), generator=g) for g in gens])
            labels.append(y)
            y = y.to(args.device)
        if args.sampler == "heun":
            x = module.sample_heun(model, noise, y, steps=steps, guidance=args.guidance)
        elif args.sampler == "euler":
            x = module.sample_euler(model, noise, y, steps=steps, guidance=args.guidance)
        else:
            x = module.sample_student(model, noise, y, steps=steps, guidance=args.guidance)
        images.append(to_uint8(x))
    images = np.concatenate(images)
    elapsed = time.time() - start

    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, "samples.png")
    Image.fromarray(image_grid(images).squeeze(-1) if images.shape[-1] == 1 else image_grid(images)).save(png)
    print(f"wrote {png}: {len(images)} images in {elapsed:.1f} s ({len(images) / elapsed:.1f} images/s)")
    if args.npz:
        npz = os.path.join(args.out_dir, "samples.npz")
        np.savez(npz, images=images, labels=torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64))
        print(f"wrote {npz}")


if __name__ == "__main__":
    main(parser.parse_args())
