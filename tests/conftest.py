"""Shared fixtures: the FID Inception network's weights as tests/generate/make_inception_fixtures.py makes them.

The 23.9M weights are too many to commit; they are remade here from an integer hash of each weight's position
(exact on every machine), the same function as in the generator. Randomly initialised torch layers would not do for
end-to-end FID tests: through 94 layers their activations shrink to nothing and every FID comes out 0.
"""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

INCEPTION_MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests", "inception-2015-12-05.json")


def hashed_uniform(start, n):
    h = torch.arange(start, start + n, dtype=torch.int64) & 0xFFFFFFFF
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    h = (h >> 16) ^ h
    return h.double() / 2**32


def hashed_weights(manifest):
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
        else:
            value = 0.2 * (u - 0.5)
        state[key] = value.float()
    return state


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Path of a .safetensors with the hashed weights under the real key names, as `download.py inception` writes."""
    with open(INCEPTION_MANIFEST) as f:
        manifest = json.load(f)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file(hashed_weights(manifest), str(path))
    return path
