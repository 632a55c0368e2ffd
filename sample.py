"""Sample from a teacher or a student: a PNG grid (and an .npz of uint8 images on request), and FID.

    python sample.py --model edm --tiny                                       # random tiny network, seconds on a CPU
    python download.py edm-cifar10-32x32-cond-vp
    python sample.py --model edm --ckpt edm-cifar10-32x32-cond-vp --steps 18  # EDM's Heun sampler, 35 evaluations
    python sample.py --model edm2 --ckpt edm2-img64-s-fid --class 88 --guidance 1.4 --n 16
    python sample.py --model edm --ckpt runs/dmd2/student.safetensors --sampler student --steps 1
    python download.py inception && python download.py cifar10 && python download.py fid-ref cifar10
    torchrun --nproc_per_node=8 sample.py --model edm --ckpt edm-cifar10-32x32-cond-vp --fid 50000 --fid_ref cifar10

`--ckpt` is a name from the model file's CONFIGS (looked up under --root, where download.py writes it) or a
.safetensors file that carries its config in the metadata (what train_edm.py writes).

FID (`--fid N`): the N images are judged as they would be saved (uint8), by the FID Inception network
(models/inception.py), against reference statistics from `download.py fid-ref` (--fid_ref: a dataset name or an .npz with
`mu` and `sigma`). Image k uses seed --seed + k, as in EDM's generate.py; EDM's protocol is `--fid 50000` (its paper
reports the best of three such runs with different seeds). Under torchrun each process generates a contiguous share of the images and the
feature statistics are summed over processes; fid.json in --out_dir records the result.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from models import edm, edm2, inception

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
parser.add_argument("--n", type=int, default=64, help="number of images; with --fid, how many of them the grid shows")
parser.add_argument("--batch", type=int, default=64, help="images per network call")
parser.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k for its noise and class")
parser.add_argument(
    "--npz", action="store_true", help="also write samples.npz with uint8 images [N, H, W, C] and labels"
)
parser.add_argument("--fid", type=int, default=0, metavar="N",
                    help="generate N images (instead of --n) and report their FID against --fid_ref")  # fmt: skip
parser.add_argument("--fid_ref", default=None, metavar="NAME_OR_NPZ",
                    help=f"FID reference statistics: {', '.join(inception.REFS)} (written by `download.py fid-ref NAME` under --root) or an .npz with mu and sigma")  # fmt: skip
parser.add_argument("--inception", default=None, metavar="WEIGHTS",
                    help=f"FID Inception .safetensors (default: {inception.FILE} under --root, from `download.py inception`)")  # fmt: skip
parser.add_argument("--save_pairs", default=None, metavar="DIR",
                    help="instead of images, write --n (noise, teacher output) pairs for `train_edm.py --method kd --pairs DIR`: the Heun ODE solution of each noise, --batch pairs per shard; rerunning resumes")  # fmt: skip
parser.add_argument("--pair_states", type=int, default=1, metavar="P",
                    help="with --save_pairs: states of each trajectory kept, at the student times t_list(P) (1 = the noise; 4 for 2- and 4-step students)")  # fmt: skip
parser.add_argument("--out_dir", default="out/samples", help="where samples.png (samples.npz, fid.json) are written")
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


def load_fid_ref(name_or_path, root=None):
    """Reference mean (2048,) and covariance (2048, 2048), float64, from a REFS name or an .npz with mu and sigma."""
    path = name_or_path
    if name_or_path in inception.REFS:
        root = root or os.environ.get("CKPT_ROOT_DIR", "checkpoints")
        path = os.path.join(root, inception.REFS[name_or_path])
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found; compute it with `python download.py fid-ref {name_or_path} --root {root}` "
                f"(it needs `python download.py {name_or_path}` and `python download.py inception` first)"
            )
    elif not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found; --fid_ref takes {', '.join(inception.REFS)} or an .npz with mu and sigma, such as "
            f"`python download.py fid-ref DATASET --out {path}` writes"
        )
    with np.load(path) as ref:  # allow_pickle stays False: arrays only
        if "mu" not in ref or "sigma" not in ref:
            raise ValueError(f"{path} has {', '.join(ref.files)}; FID reference statistics have mu and sigma")
        mu, sigma = torch.from_numpy(ref["mu"]).double(), torch.from_numpy(ref["sigma"]).double()
    dim = inception.FEATURE_DIM
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)}; expected ({dim},), ({dim}, {dim})")
    return mu, sigma, path


def teacher_trajectory(module, model, noise, labels, steps, guidance, states):
    """The teacher's Heun solution (EDM Alg. 1) from t_list(states)[0] down to 0, on a Karras grid of `steps` levels
    that also passes through every t_list(states) time. Returns the states there (B, states, C, H, W), the first
    being the scaled noise, and the output (B, C, H, W)."""
    marks = module.t_list(states)  # t_0 > ... > t_{P-1} > 0
    grid = module.karras_sigmas(steps, module.T_MIN, float(marks[0]))
    grid = torch.unique(torch.cat([grid, marks])).flip(0)  # descending, through every mark, ending at 0
    x, path = noise.double() * marks[0], []
    for t_from, t_to in zip(marks[:-1], marks[1:]):
        path.append(x.float())
        segment = grid[(grid <= t_from) & (grid >= t_to)]
        x = module.sample_heun(model, (x / t_from).float(), labels, guidance=guidance, times=segment).double()
    return torch.stack(path, dim=1), x.float()


def save_pairs(args, module, model, steps, device, rank, world):
    """Teacher pairs for knowledge distillation, in shards of --batch written atomically; shards already on disk are
    kept, so an interrupted run continues where it stopped. Pair k uses seed --seed + k, as the image samples do."""
    from safetensors.torch import save_file

    cfg, out = model.cfg, args.save_pairs
    settings = dict(model=args.model, ckpt="tiny" if args.tiny else args.ckpt, steps=steps, guidance=args.guidance,
                    seed=args.seed, n=args.n, shard_size=args.batch, states=args.pair_states,
                    times=module.t_list(args.pair_states)[:-1].tolist(), label_dim=cfg.label_dim,
                    class_label=args.class_label)  # fmt: skip
    index_file = os.path.join(out, "pairs.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            old = {k: v for k, v in json.load(f).items() if k != "shards"}
        if old != settings:
            sys.exit(f"error: {out} holds pairs made with other settings ({old}); choose another --save_pairs DIR")
    os.makedirs(out, exist_ok=True)
    if rank == 0 and not os.path.exists(index_file):  # the settings first, so that a resumed run can be checked
        with open(index_file + ".tmp", "w") as f:
            json.dump(settings | {"shards": []}, f, indent=1)
        os.replace(index_file + ".tmp", index_file)
    starts = list(range(0, args.n, args.batch))
    names = [f"pairs_{i:08d}.safetensors" for i in starts]
    mine = [(i, name) for j, (i, name) in enumerate(zip(starts, names)) if j % world == rank]
    todo = [(i, name) for i, name in mine if not os.path.exists(os.path.join(out, name))]
    for i, name in tqdm(todo, unit="shard", desc=f"teacher pairs ({len(mine) - len(todo)} of {len(mine)} on disk)", disable=rank != 0):  # fmt: skip
        gens = [torch.Generator().manual_seed(args.seed + k) for k in range(i, min(i + args.batch, args.n))]
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        labels = torch.zeros(len(gens), dtype=torch.long)
        if cfg.label_dim:
            labels = torch.full((len(gens),), args.class_label) if args.class_label is not None else torch.cat([torch.randint(cfg.label_dim, (1,), generator=g) for g in gens])  # fmt: skip
        states, x0 = teacher_trajectory(module, model, noise, labels.to(device) if cfg.label_dim else None, steps, args.guidance, args.pair_states)  # fmt: skip
        tmp = os.path.join(out, name + ".tmp")
        save_file({"states": states.cpu().contiguous(), "x0": x0.cpu().contiguous(), "labels": labels}, tmp)
        os.replace(tmp, os.path.join(out, name))
    if world > 1:
        dist.barrier()
    if rank == 0:
        with open(index_file + ".tmp", "w") as f:
            json.dump(settings | {"shards": names}, f, indent=1)
        os.replace(index_file + ".tmp", index_file)
        print(f"wrote {args.n} teacher pairs ({args.pair_states} states each) to {out}")


def main(args):
    # Distributed setup: torchrun sets these; a plain `python` run is one process.
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    master = rank == 0

    module, model_class = MODELS[args.model]
    if args.fid and args.fid_ref is None:
        sys.exit(f"error: --fid needs --fid_ref: {', '.join(inception.REFS)} or an .npz with mu and sigma")
    try:
        if args.tiny:
            torch.manual_seed(args.seed)
            model = model_class(module.CONFIGS["tiny"]).eval()
        elif args.ckpt is None:
            sys.exit("error: give --ckpt NAME_OR_PATH (a CONFIGS name or a .safetensors file), or --tiny")
        else:
            model = module.from_pretrained(args.ckpt, root=args.root)
        if args.fid:  # before sampling: a missing file should not cost a sampling run
            ref_mu, ref_sigma, ref_path = load_fid_ref(args.fid_ref, args.root)
            detector = inception.from_pretrained(args.inception, root=args.root, device=device)
            stats = inception.FeatureStats(device=device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model = model.to(device)
    cfg = model.cfg
    steps = args.steps or (1 if args.sampler == "student" else 18)
    if args.class_label is not None and not 0 <= args.class_label < max(cfg.label_dim, 1):
        sys.exit(f"error: --class {args.class_label} is out of range; this model has {cfg.label_dim} classes")

    if args.save_pairs:
        if args.sampler != "heun" or args.fid:
            sys.exit("error: --save_pairs solves the teacher's ODE with Heun; drop --sampler/--fid")
        save_pairs(args, module, model, steps, device, rank, world)
        if distributed:
            dist.destroy_process_group()
        return

    # This process's images: a contiguous share of 0..n-1, so that rank 0 holds the first ones (the grid).
    n = args.fid or args.n
    first, last = rank * n // world, (rank + 1) * n // world
    images, labels = [], []
    start = time.time()
    bar = tqdm(range(first, last, args.batch), unit="batch", desc=f"{args.model} {args.sampler} x{steps}", disable=not master)  # fmt: skip
    for i in bar:
        # Image k draws its noise (and class) from seed `--seed + k`, as EDM's generate.py: results do not depend on
        # --batch or the number of processes, and any subset of images can be regenerated alone.
        shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        gens = [torch.Generator().manual_seed(args.seed + k) for k in range(i, min(i + args.batch, last))]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        y = None
        if cfg.label_dim:
            if args.class_label is not None:
                y = torch.full((len(gens),), args.class_label)
            else:
                y = torch.cat([torch.randint(cfg.label_dim, (1,), generator=g) for g in gens])
            labels.append(y)
            y = y.to(device)
        if args.sampler == "heun":
            x = module.sample_heun(model, noise, y, steps=steps, guidance=args.guidance)
        elif args.sampler == "euler":
            x = module.sample_euler(model, noise, y, steps=steps, guidance=args.guidance)
        else:
            x = module.sample_student(model, noise, y, steps=steps, guidance=args.guidance)
        batch = to_uint8(x)  # (B, H, W, C): what a saved PNG would hold
        if args.fid:
            with torch.no_grad():
                stats.update(detector(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)))
        images.append(batch if args.npz else batch[: max(args.n - (i - first), 0)])  # the grid needs the first --n
    empty = np.zeros((0, cfg.img_resolution, cfg.img_resolution, cfg.img_channels), dtype=np.uint8)  # n < processes
    images = np.concatenate(images) if images else empty
    labels = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)

    if distributed:
        shares = [None] * world if master else None
        dist.gather_object((images, labels), shares, dst=0)
        if master:
            images, labels = (np.concatenate(parts) for parts in zip(*shares))
        if args.fid:
            for total in (stats.n, stats.total, stats.gram):
                dist.all_reduce(total)
    elapsed = time.time() - start

    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        grid = image_grid(images[: args.n])
        png = os.path.join(args.out_dir, "samples.png")
        Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(png)
        print(f"wrote {png}: {n} images in {elapsed:.1f} s ({n / elapsed:.1f} images/s)")
        if args.npz:
            npz = os.path.join(args.out_dir, "samples.npz")
            np.savez(npz, images=images, labels=labels)
            print(f"wrote {npz}")
        if args.fid:
            mu, sigma = stats.mean_cov()
            fid = inception.frechet_distance(mu.cpu(), sigma.cpu(), ref_mu, ref_sigma)
            print(f"FID {fid:.4f} ({n} images against {ref_path})")
            record = dict(fid=fid, n=n, ref=ref_path, model=args.model, ckpt="tiny" if args.tiny else args.ckpt,
                          sampler=args.sampler, steps=steps, guidance=args.guidance, seed=args.seed,
                          class_label=args.class_label)  # fmt: skip
            path = os.path.join(args.out_dir, "fid.json")
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file
            print(f"wrote {path}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parser.parse_args())
