"""Shared fixtures: the FID Inception network's weights as tests/generate/make_inception_fixtures.py makes them.

The 23.9M weights are too many to commit; they are remade here from an integer hash of each weight's position
(exact on every machine), the same function as in the generator. Randomly initialised torch layers would not do for
end-to-end FID tests: through 94 layers their activations shrink to nothing and every FID comes out 0.
"""

import json
import os

import pytest
from hashed_weights import hashed_weights
from safetensors.torch import save_file

INCEPTION_MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests", "inception-2015-12-05.json")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Path of a .safetensors with the hashed weights under the real key names, as `download.py inception` writes."""
    with open(INCEPTION_MANIFEST) as f:
        manifest = json.load(f)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file(hashed_weights(manifest), str(path))
    return path
