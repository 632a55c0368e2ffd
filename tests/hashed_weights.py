"""Deterministic stand-in weights for the FID Inception network: each weight is an integer hash of its position,
the same on every machine. The fixture generator and the tests both make them here (23.9M weights are too many to
commit). Randomly initialised torch layers would not do: through 94 layers their activations shrink to nothing."""

import math

import torch


def hashed_uniform(start, n):
    """Numbers in [0, 1) at positions start .. start + n - 1 of a fixed stream: an integer hash of the position.
    Integer arithmetic below 2^63, so the values are exact on every machine and torch version."""
    h = torch.arange(start, start + n, dtype=torch.int64) & 0xFFFFFFFF
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    h = (h >> 16) ^ h
    return h.double() / 2**32


def hashed_weights(manifest):
    """Weights of sensible scale for every key of the manifest, in its order: He-scaled convolutions, batch-norm
    statistics near (0, 1), so that activations keep their size through the 94 layers."""
    state, start = {}, 0
    for key, shape in manifest.items():
        n = math.prod(shape)
        u = hashed_uniform(start, n).reshape(shape)
        start += n
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = math.prod(shape[1:])
            value = (u - 0.5) * math.sqrt(12) * math.sqrt((2 if key.endswith("conv.weight") else 1) / fan_in)
        elif key.endswith("bn.weight"):
            value = 0.8 + 0.4 * u
        elif key.endswith("running_var"):
            value = 0.5 + u
        else:  # bn.bias, bn.running_mean, fc.bias
            value = 0.2 * (u - 0.5)
        state[key] = value.float()
    return state
