"""FID Inception-v3: the 2048-d pool features that FID is computed from, and the Frechet distance between them.

Paper: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017
(arXiv:1706.08500), on the network of Szegedy et al., "Rethinking the Inception Architecture for Computer Vision",
CVPR 2016. The network is TensorFlow's 2015-12-05 Inception graph (inception-2015-12-05.tgz) that the original FID code
used, in the PyTorch form of pytorch-fid (https://github.com/mseitzer/pytorch-fid, src/pytorch_fid/inception.py).
It is not torchvision's Inception-v3: the average pool of the A, C and E blocks' pool branch leaves the zero padding
out of the mean (as TF's avg_pool does), the last E block (Mixed_7c) max-pools in that branch, and the classifier has
1008 classes.

Checkpoint: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a torch state dict; `python download.py inception`
reads it with `torch.load(weights_only=True)` and writes it as safetensors. Module names here equal its keys
(`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, ..., `fc.weight`), so it loads strictly.

Numbers: features and FIDs equal pytorch-fid's. EDM and StyleGAN compute FID with another port of the same TF graph
that resizes images the TF way; pytorch-fid's README reports FIDs within about 0.1% of the TF ones, not identical.
Compare an FID only with FIDs computed from the same features: reference statistics for these features come from
`python download.py fid-ref`. Reference statistics are .npz files with `mu` (2048,) and `sigma` (2048, 2048) in
float64, the format of EDM's fid-refs/*.npz.

Left out: pytorch-fid's choice of earlier feature layers (64, 192, 768 channels); FID uses the 2048-d pool features.

    model = from_pretrained()                                 # after `python download.py inception`
    features = model(images_uint8)                            # (N, 3, H, W) uint8 -> (N, 2048)
    fid = frechet_distance(*feature_stats(features), ref_mu, ref_sigma)
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------
# Config: one released network, so constants instead of a Config dataclass.

URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FILE = "inception/pt_inception-2015-12-05.safetensors"  # where `download.py inception` writes it, under the root
RESOLUTION = 299  # every image is resized to this before the first layer
FEATURE_DIM = 2048  # width of the pool3 features
NUM_CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes and 8 unused outputs
# Reference statistics that `python download.py fid-ref NAME` computes from a dataset, relative to the root.
REFS = {"cifar10": "fid-refs/cifar10-32x32.npz"}

# ----------------------------------------------------------------------------
# Building blocks. Every convolution is bias-free and followed by batch norm (eps 1e-3, TF's) and a ReLU.


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 average pool, stride 1, 'same' padding, that divides by the number of pixels inside the image (TF's
    avg_pool); PyTorch's default would count the zero padding and darken the borders."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..5d, 35x35: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by strided 3x3 convolutions and a max pool."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..6e, 17x17: 7x7 convolutions factored into 1x7 and 7x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b and 7c, 8x8: 3x3 convolutions split into parallel 1x3 and 3x1 halves.

    `pool`: "avg" (TF-style average) in Mixed_7b; "max" in Mixed_7c, where the TF graph max-pools (a quirk of that
    graph, not of the paper) and FID inherits it.
    """

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


# ----------------------------------------------------------------------------
# Model


class InceptionV3(nn.Module):
    """Images (N, 3, H, W) -> pool3 features (N, 2048). `fc` is the graph's 1008-way classifier: not used by FID, kept so
    that the checkpoint loads strictly and `model.fc(features)` gives the logits (Inception Score)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images):
        """`images`: uint8 in [0, 255] or floats in [0, 1]; one channel is repeated to three (as EDM's fid.py does)."""
        if images.dtype == torch.uint8:  # to [0, 1] in float32 (also for half-precision weights), float64 for float64
            images = images.to(torch.promote_types(self.fc.weight.dtype, torch.float32)) / 255
        x = images.to(self.fc.weight.dtype).expand(-1, 3, -1, -1)  # (N, 3, H, W)
        # Resize, then scale to [-1, 1], in this order, as pytorch-fid does.
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048)


# ----------------------------------------------------------------------------
# Frechet distance. Statistics and the distance are float64: FID subtracts traces of size ~1e2..1e3 to get
# numbers of size ~1, and the covariances of 2048 correlated features are badly conditioned.


def feature_stats(features):
    """Mean (D,) and covariance (D, D) of features (N, D), float64, with the unbiased 1 / (N - 1) like numpy.cov."""
    features = torch.as_tensor(features).double()
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as in FID (Heusel et al. 2017, eq. 6):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace of the matrix square root is computed through the symmetric matrix A sigma2 A, A = sigma1^(1/2), which
    has the same eigenvalues as sigma1 sigma2 but, being symmetric, takes `eigh`: real eigenvalues, and no complex
    parts to discard as after scipy.linalg.sqrtm of the unsymmetric product. Eigenvalues that rounding pushes below
    zero count as zero.
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t).double() for t in (mu1, sigma1, mu2, sigma2))
    w, q = torch.linalg.eigh(sigma1)
    root1 = (q * w.clamp(min=0).sqrt()) @ q.T
    product = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root
    return max(distance.item(), 0.0)  # a squared distance; below zero only by rounding when the stats are equal


class FeatureStats:
    """Mean and covariance of features seen one batch at a time, for sets too large to keep (ImageNet's 1.28M images):
    running sums in float64, as EDM's fid.py keeps them. Under DDP, all-reduce `n`, `total` and `gram` (sums all)
    before `mean_cov()`."""

    def __init__(self, dim=FEATURE_DIM, device=None):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features):
        f = features.double()  # (N, D)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.gram += f.T @ f

    def mean_cov(self):
        """Mean (D,) and unbiased covariance (D, D), float64: the same numbers as `feature_stats` of all features."""
        n = self.n.item()
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {n:g}")
        mu = self.total / n
        return mu, (self.gram - n * torch.outer(mu, mu)) / (n - 1)


# ----------------------------------------------------------------------------
# Checkpoint loading


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


def from_pretrained(path=None, root=None, device="cpu"):
    """The FID Inception network with its weights, in eval mode (batch norm uses its stored statistics).

    `path`: a .safetensors file; default `FILE` under `root` (default `$CKPT_ROOT_DIR` or ./checkpoints), where
    `python download.py inception` writes it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path is None:
        root = root or os.environ.get("CKPT_ROOT_DIR", "checkpoints")
        path = os.path.join(root, FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; fetch it with `python download.py inception --root {root}`")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; `python download.py inception` fetches the FID Inception weights")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; fetch it again with `python download.py inception --force`") from e  # fmt: skip
    with torch.device("meta"):
        model = InceptionV3()
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = InceptionV3().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features = model(images)
    n = sum(p.numel() for p in model.parameters())
    print(f"inception-v3 (FID): {n:,} parameters, features {tuple(features.shape)}")
