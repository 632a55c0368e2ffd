"""House rules that keep model files copyable on their own: no project imports, no diffusers, and the deliberate
copies between model files stay identical."""

import ast
import inspect
import os

import pytest

from models import autoencoder_kl, cosmos_predict2, dit, edm, edm2, inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "models")) if f.endswith(".py") and f != "__init__.py")
RUNTIME_FILES = [os.path.join("models", f) for f in MODEL_FILES] + ["sample.py", "download.py"]
ALLOWED_IN_MODELS = {"json", "math", "os", "dataclasses", "torch", "safetensors", "huggingface_hub", "tqdm"}


def imports(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_import_only_torch_and_the_standard_few(name):
    for module in imports(os.path.join("models", name)):
        assert module.split(".")[0] in ALLOWED_IN_MODELS, f"models/{name} imports {module}"


@pytest.mark.parametrize("path", RUNTIME_FILES)
def test_runtime_never_imports_diffusers(path):
    assert not any(m.split(".")[0] == "diffusers" for m in imports(path)), f"{path} imports diffusers"


SHARED = [
    "alpha", "sigma", "alpha_prime", "sigma_prime", "_expand", "_safe", "to_x0", "from_x0", "convert",
    "karras_sigmas", "t_list", "sample_t", "_guided_x0", "sample_heun", "sample_euler", "sample_student",
    "_progress", "_read_safetensors", "check_keys", "config_to_json",
]  # fmt: skip


@pytest.mark.parametrize("name", SHARED)
def test_edm_family_copies_are_identical(name):
    """edm.py and edm2.py share the edm schedule, the samplers and the loader by copy; a fix to one goes to both."""
    assert inspect.getsource(getattr(edm, name)) == inspect.getsource(getattr(edm2, name))


def test_inception_key_check_is_the_edm_one():
    """models/inception.py reports checkpoint mismatches with the same copy of check_keys."""
    assert inspect.getsource(inception.check_keys) == inspect.getsource(edm.check_keys)


@pytest.mark.parametrize("name", ["_expand", "_safe", "_progress", "check_keys", "config_to_json"])
def test_dit_copies_of_edm_helpers_are_identical(name):
    """dit.py copies the schedule and loading helpers that do not depend on the schedule; they stay identical."""
    assert inspect.getsource(getattr(edm, name)) == inspect.getsource(getattr(dit, name))


@pytest.mark.parametrize(
    "name, source",
    [("_safe", edm), ("_progress", edm), ("check_keys", edm), ("config_to_json", edm), ("config_from_json", dit),
     ("_read_safetensors", autoencoder_kl)],
)  # fmt: skip
def test_cosmos_predict2_copies_are_identical(name, source):
    """cosmos_predict2.py copies the schedule-free and loading helpers; they stay identical to their originals."""
    assert inspect.getsource(getattr(source, name)) == inspect.getsource(getattr(cosmos_predict2, name))
