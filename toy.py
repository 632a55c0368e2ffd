"""The embedded default's data and quality metric: procedural 32x32 images in 10 classes, a small classifier, toy FID.

`python train_edm.py` with no flags needs a dataset, a teacher and a quality measure that all live in this repository
and run offline on a CPU. This file supplies the data and the measure:

- `toy_batch`: class-conditional 32x32 RGB images drawn on the fly. Each class is one shape in one hue (a red disc, an
  orange ring, ...) at a random position, size and tilt, with jittered colour, anti-aliased edges and a smooth tinted
  background. Rendering is a few tensor ops over a coordinate grid, so there is no dataset to download or store.
- `ToyClassifier`: a four-layer CNN trained on that data (`python toy.py train-classifier`); the trained weights ship
  as assets/toy_classifier.safetensors and `load_classifier` reads them.
- `evaluate`: the toy FID (Frechet distance between Gaussians fitted to the classifier's 128-d penultimate features of
  samples and of fresh toy images, the way FID uses Inception features) and the class accuracy of conditional samples
  (how often the classifier names the class a sample was asked for).

Toy FID numbers are only comparable with each other: same classifier, same reference set, same number of samples
(the estimate is biased upwards for small sample counts, as FID is).

    images, labels = toy.toy_batch(256, generator=torch.Generator().manual_seed(0))   # training data
    classifier = toy.load_classifier()
    labels = torch.arange(1000) % 10                     # every class equally often, like the reference set
    toy.evaluate(classifier, model_samples(labels), labels)   # {'fid': ..., 'accuracy': ...}

    python toy.py preview --out out/toy.png          # a grid, one row per class
    python toy.py train-classifier --out assets/toy_classifier.safetensors --steps 600
"""

import argparse
import functools
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from models.inception import feature_stats, frechet_distance

RESOLUTION = 32
DEFAULT_CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_classifier.safetensors")
REFERENCE_SEED = 20240601  # seed of the reference images for toy FID; unused by classifier training and by the tests

# ----------------------------------------------------------------------------
# Shapes as signed distance functions: negative inside, positive outside, in pixels.
# u, v are coordinates relative to the shape's centre, already tilted (u to the right, v downwards); s is the size,
# roughly the shape's half-width. Distances rather than masks give anti-aliased edges for free (see toy_batch).


def _box(u, v, half_u, half_v):
    """Rectangle with half-sides half_u, half_v (the exact Euclidean distance outside, the negative depth inside)."""
    du, dv = u.abs() - half_u, v.abs() - half_v
    return torch.hypot(du.clamp(min=0), dv.clamp(min=0)) + torch.maximum(du, dv).clamp(max=0)


def _disc(u, v, s):
    return torch.hypot(u, v) - 0.9 * s


def _ring(u, v, s):
    return (torch.hypot(u, v) - 0.75 * s).abs() - 0.25 * s


def _square(u, v, s):
    return _box(u, v, 0.75 * s, 0.75 * s)


def _hollow_square(u, v, s):
    return (_box(u, v, 0.7 * s, 0.7 * s)).abs() - 0.2 * s


def _triangle(u, v, s):
    """Equilateral triangle pointing up, circumradius s (Inigo Quilez's exact distance, y flipped to point up)."""
    k = math.sqrt(3)
    x, y = u.abs() - 0.866 * s, 0.5 * s - v  # fold onto the right half; y up, origin moved to the base
    # Points beyond the right edge's normal reflect onto the edge's own frame.
    beyond = x + k * y > 0
    x, y = torch.where(beyond, (x - k * y) / 2, x), torch.where(beyond, (-k * x - y) / 2, y)
    x = x - x.clamp(max=0).maximum(-2 * 0.866 * s)  # distance along the edge beyond its end points
    return -torch.hypot(x, y) * torch.sign(y)


def _plus(u, v, s):
    return torch.minimum(_box(u, v, s, 0.3 * s), _box(u, v, 0.3 * s, s))


def _horizontal_bar(u, v, s):
    return _box(u, v, 1.1 * s, 0.35 * s)


def _vertical_bar(u, v, s):
    return _box(u, v, 0.35 * s, 1.1 * s)


def _diagonal_stripe(u, v, s):
    return _box((u - v) / math.sqrt(2), (u + v) / math.sqrt(2), 1.25 * s, 0.3 * s)  # from bottom-left to top-right


def _two_dots(u, v, s):
    return torch.minimum(torch.hypot(u - 0.55 * s, v), torch.hypot(u + 0.55 * s, v)) - 0.4 * s


# Class k draws shape k in hue k * 36 degrees. Similar shapes sit next to each other and so get neighbouring hues:
# telling a red disc from an orange ring takes both the shape and the colour.
SHAPES = [_disc, _ring, _square, _hollow_square, _triangle, _plus, _horizontal_bar, _vertical_bar, _diagonal_stripe, _two_dots]  # fmt: skip
class_names = [
    "red disc", "orange ring", "yellow square", "lime hollow square", "green triangle",
    "cyan plus", "azure horizontal bar", "blue vertical bar", "violet diagonal stripe", "magenta two dots",
]  # fmt: skip
NUM_CLASSES = len(class_names)

# ----------------------------------------------------------------------------
# Data


def hsv_to_rgb(h, s, v):
    """Colours in HSV, each (n,) in [0, 1] (hue wraps around), to RGB (n, 3) in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0], device=h.device) + 6 * h[:, None]) % 6
    return v[:, None] - v[:, None] * s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def toy_batch(n, generator=None, device=None, labels=None):
    """n toy images (n, 3, 32, 32) float32 in [-1, 1] and their classes (n,) int64, uniform unless `labels` is given.

    Everything random is drawn first, from `generator` on its own device (a CPU generator by default), and only then
    moved to `device` for rendering: a seeded generator gives the same images on any device.
    """
    rng = generator.device if generator is not None else torch.device("cpu")

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator, device=rng)

    if labels is None:
        labels = torch.randint(NUM_CLASSES, (n,), generator=generator, device=rng)
    labels = torch.as_tensor(labels, dtype=torch.int64, device=rng)
    size = uniform(5.5, 9.5)
    centre = uniform(10.0, 22.0, 2)
    tilt = uniform(-0.2, 0.2)  # radians, about 11 degrees either way
    hue = labels / NUM_CLASSES + uniform(-0.02, 0.02)
    colour = hsv_to_rgb(hue, uniform(0.6, 0.95), uniform(0.75, 1.0)) * 2 - 1
    background = uniform(-0.8, 0.0)  # a grey level below the shapes' brightness
    direction = uniform(0.0, 2 * math.pi)
    gradient = uniform(0.0, 0.25)[:, None] * torch.stack([direction.cos(), direction.sin()], 1)  # centre to edge
    haze = 0.06 * torch.randn(n, 3, 4, 4, generator=generator, device=rng)  # low-frequency colour noise
    labels, size, centre, tilt, colour, background, gradient, haze = (
        t.to(device) for t in (labels, size, centre, tilt, colour, background, gradient, haze)
    )

    # Coordinates of the pixel centres relative to each shape's centre, rotated by its tilt.
    grid = torch.arange(RESOLUTION, dtype=torch.float32, device=labels.device) + 0.5
    dx = grid[None, None, :] - centre[:, 0, None, None]  # (n, 1, W)
    dy = grid[None, :, None] - centre[:, 1, None, None]  # (n, H, 1)
    cos, sin = tilt.cos()[:, None, None], tilt.sin()[:, None, None]
    u, v = dx * cos + dy * sin, dy * cos - dx * sin  # (n, H, W)
    distance = torch.empty_like(u)
    for k, shape in enumerate(SHAPES):
        index = (labels == k).nonzero().squeeze(1)
        distance[index] = shape(u[index], v[index], size[index, None, None])
    # A pixel is covered by the fraction of it inside the shape; a distance ramp one pixel wide approximates that
    # (exact for a straight edge through the pixel), which anti-aliases the edges.
    coverage = (0.5 - distance).clamp(0, 1)[:, None]  # (n, 1, H, W)

    # Background: a grey level, a linear gradient and the haze upsampled bilinearly. The upsampling is written as
    # two small matrix products, which is ten times faster on a CPU than F.interpolate and gives the same result.
    ramp = (grid - RESOLUTION / 2) / (RESOLUTION / 2)  # -1 .. 1 across the image
    tint = gradient[:, 0, None, None] * ramp[None, None, :] + gradient[:, 1, None, None] * ramp[None, :, None]
    upsample = F.interpolate(torch.eye(4, device=grid.device)[:, None], size=RESOLUTION, mode="linear")[:, 0]  # (4, W)
    bg = (background[:, None, None] + tint)[:, None] + upsample.T @ haze @ upsample  # (n, 3, H, W)
    images = torch.lerp(bg, colour[:, :, None, None], coverage)
    return images.clamp(-1, 1), labels


# ----------------------------------------------------------------------------
# Classifier


class ToyClassifier(nn.Module):
    """Four 3x3 convolutions with ReLU (32x32 down to 4x4), a global max pool to 128 features, a linear layer.

    NOTE: max, not the average pool of Inception: averaged features grow with the shape's area, and their spread
    within a class made toy FID two to five times noisier from one sample seed to the next (measured on real toy
    images against blurred, darkened and repeated ones).
    """

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 32, 3, padding=1)  # 32x32
        self.conv1 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # 16x16
        self.conv2 = nn.Conv2d(64, 96, 3, stride=2, padding=1)  # 8x8
        self.conv3 = nn.Conv2d(96, 128, 3, stride=2, padding=1)  # 4x4
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x):
        """Images (B, 3, 32, 32) in [-1, 1] -> penultimate features (B, 128), what toy FID compares."""
        for conv in (self.conv0, self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(x))
        return x.amax((2, 3))

    def forward(self, x):
        return self.head(self.features(x))  # logits (B, 10)


def load_classifier(path=DEFAULT_CLASSIFIER, device=None):
    """The trained classifier from a safetensors file (strict keys), frozen and in eval mode."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"toy classifier not found at {path}; train it with "
            f"`python toy.py train-classifier --out {path}` (see assets/README.md)"
        )
    classifier = ToyClassifier()
    classifier.load_state_dict(load_file(path), strict=True)
    return classifier.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Metrics: toy FID and class accuracy. Statistics and the distance are FID's own (models/inception.py), in float64;
# the features come in float32.


def _batches(items, size=500):
    return (items[i : i + size] for i in range(0, len(items), size))


@torch.no_grad()
def classifier_features(classifier, images):
    """Penultimate features (N, 128) of images (N, 3, 32, 32) in [-1, 1], in batches on the classifier's device.

    Samples are clamped to [-1, 1] first: they are judged as the images they would be saved as.
    """
    device = next(classifier.parameters()).device
    return torch.cat([classifier.features(x.to(device).float().clamp(-1, 1)).cpu() for x in _batches(images)])


@functools.lru_cache(maxsize=4)
def reference_stats(classifier, n=10000, seed=REFERENCE_SEED):
    """Feature mean and covariance of n fresh toy images from `seed`, the classes in equal numbers.

    Deterministic: the same classifier, n and seed always give the same images (drawn in fixed batches of 500 from
    one generator), hence the same statistics. Equal class counts rather than random ones take the multinomial noise
    of the class proportions out of the reference. Cached per classifier object, so evaluating a run many times
    renders the reference set once; the classifier is assumed frozen.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    features = [classifier_features(classifier, toy_batch(len(c), generator, labels=c)[0]) for c in _batches(labels)]
    return feature_stats(torch.cat(features))


@torch.no_grad()
def evaluate(classifier, images, labels):
    """Toy FID and class accuracy of samples (N, 3, 32, 32) in [-1, 1] asked for the classes `labels` (N,).

    Returns {"fid": float, "accuracy": float}; accuracy is the fraction the classifier assigns to the requested class.
    Ask for the classes in equal numbers (`torch.arange(N) % 10`), as the reference set has them. Like FID, toy FID is
    biased upwards for small N and fluctuates with the samples' seed (real toy images score about 55 +- 20 at
    N = 1000 and 14 +- 4 at N = 5000, noise about 30000): compare runs at the same N. It barely sees mild pixel noise
    (std 0.1 moves it less than the seed does): the classifier never needed to notice noise.
    """
    device = next(classifier.parameters()).device
    features = classifier_features(classifier, images)
    predicted = torch.cat([classifier.head(f.to(device)).argmax(1).cpu() for f in _batches(features)])
    fid = frechet_distance(*feature_stats(features), *reference_stats(classifier))
    return {"fid": fid, "accuracy": (predicted == torch.as_tensor(labels).cpu()).double().mean().item()}


@torch.no_grad()
def accuracy(classifier, n, seed):
    """Fraction of n fresh toy images from `seed` that the classifier labels correctly."""
    device = next(classifier.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for chunk in _batches(range(n)):
        images, labels = toy_batch(len(chunk), generator, device=device)
        correct += (classifier(images).argmax(1) == labels).sum().item()
    return correct / n


# ----------------------------------------------------------------------------
# Command line: train the classifier, preview the data


def train_classifier(args):
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    classifier = ToyClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)  # a stream of fresh images: every batch is new data
    start = time.time()
    for step in (bar := tqdm(range(args.steps), unit="step")):
        for group in optimizer.param_groups:  # cosine decay to zero
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        images, labels = toy_batch(args.batch, generator)
        loss = F.cross_entropy(classifier(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    # Held-out images come from their own seed; every training batch was fresh anyway, so none repeats.
    held_out = accuracy(classifier, args.held_out, seed=args.seed + 1)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s; held-out accuracy {held_out:.4f} on {args.held_out} images")  # fmt: skip

    metadata = {"steps": str(args.steps), "batch": str(args.batch), "lr": str(args.lr), "seed": str(args.seed)}
    metadata.update(held_out_accuracy=f"{held_out:.4f}", held_out_images=str(args.held_out))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")  # write, then rename: an interrupted run leaves no stub
    os.close(fd)
    try:
        save_file(classifier.state_dict(), tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; outputs are ordinary shared files
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out}")


def preview(args):
    from PIL import Image

    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    images, _ = toy_batch(len(labels), torch.Generator().manual_seed(args.seed), labels=labels)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    # (classes * per_class, C, H, W) -> one row per class: (classes * H, per_class * W, C)
    grid = pixels.view(NUM_CLASSES, args.per_class, 3, RESOLUTION, RESOLUTION).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(NUM_CLASSES * RESOLUTION, args.per_class * RESOLUTION, 3).numpy()
    image = Image.fromarray(grid)
    image = image.resize((image.width * args.zoom, image.height * args.zoom), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}: rows are " + ", ".join(class_names))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    train = commands.add_parser("train-classifier", help="train the toy classifier on fresh toy images")
    train.add_argument("--out", default=DEFAULT_CLASSIFIER, help="safetensors file to write")
    train.add_argument("--steps", type=int, default=600, help="optimizer steps, each on a new batch")
    train.add_argument("--batch", type=int, default=128, help="images per step")
    train.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate at the start of the cosine decay")
    train.add_argument(
        "--seed", type=int, default=0, help="seeds the weights and the data; held-out images use seed + 1"
    )
    train.add_argument("--held_out", type=int, default=10000, help="images for the final accuracy")
    show = commands.add_parser("preview", help="write a PNG grid of toy images, one row per class")
    show.add_argument("--out", default="out/toy.png", help="PNG to write")
    show.add_argument("--per_class", type=int, default=12, help="images per row")
    show.add_argument(
        "--zoom", type=int, default=4, help="nearest-neighbour enlargement, so the 32x32 tiles are visible"
    )
    show.add_argument("--seed", type=int, default=0, help="seed of the images")
    args = parser.parse_args()
    if args.command == "train-classifier":
        train_classifier(args)
    elif args.command == "preview":
        preview(args)
    else:
        parser.print_usage()
