"""House rules that keep model files copyable on their own: no project imports, no diffusers, and the deliberate
copies between model files stay identical."""

import ast
import importlib
import inspect
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "models")) if f.endswith(".py") and f != "__init__.py")
SCRIPTS = sorted(
    f for f in os.listdir(ROOT) if f.endswith(".py")
)  # train_*.py, sample.py, download.py, encoders.py, toy.py
RUNTIME_FILES = [os.path.join("models", f) for f in MODEL_FILES] + SCRIPTS
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


EDM_SHARED = [
    "alpha", "sigma", "alpha_prime", "sigma_prime", "_expand", "_safe", "to_x0", "from_x0", "convert",
    "karras_sigmas", "t_list", "sample_t", "_guided_x0", "sample_heun", "sample_euler", "sample_student",
    "_progress", "_read_safetensors", "check_keys", "config_to_json",
]  # fmt: skip

SD_SHARED = [
    "betas", "alphas_cumprod", "_log_abar", "alpha", "sigma", "alpha_prime", "sigma_prime", "_expand", "_safe",
    "to_x0", "from_x0", "convert", "t_list", "sample_t", "leading_timesteps", "timestep_features",
    "TimestepEmbedding", "ResnetBlock", "Attention", "GEGLU", "FeedForward", "TransformerBlock", "SpatialTransformer",
    "Downsample", "Upsample", "_transformers", "DownBlock", "UpBlock", "MidBlock", "_text_bias", "guided", "_times",
    "sample_ddim", "sample_euler", "sample_student", "_progress", "_read_safetensors", "check_keys",
    "load_checkpoint", "_per_level", "_unet_fields", "config_from_diffusers", "_hub_folder", "_is_repo_id",
    "from_pretrained",
]  # fmt: skip

# Deliberate copies between model files, (original, copy, names): each file stays usable on its own, and a fix to
# the original must reach every copy.
COPIES = [
    ("edm", "edm2", EDM_SHARED),  # the edm schedule, the samplers and the loader
    ("edm", "inception", ["check_keys"]),
    ("edm", "dit", ["_expand", "_safe", "_progress", "check_keys", "config_to_json"]),
    ("autoencoder_kl", "cogvideox", ["_read_safetensors", "check_keys", "_is_repo_id"]),
    ("dit", "cogvideox", ["_expand", "_safe", "_progress"]),
    ("edm", "flux", ["_expand", "_safe", "to_x0", "from_x0", "convert", "_progress", "check_keys"]),
    ("autoencoder_kl", "flux", ["_hub_folder", "_is_repo_id"]),
    ("autoencoder_kl", "wan", ["_read_safetensors", "check_keys", "_hub_folder", "_is_repo_id"]),
    ("dit", "wan", ["_progress"]),
    ("sd15", "sdxl", SD_SHARED),  # one UNet family: only Config and UNet differ
    ("edm", "sd15", ["_expand", "_safe", "to_x0", "from_x0", "convert", "_progress", "check_keys"]),
    ("dit", "sd15", ["_log_abar"]),
    ("autoencoder_kl", "sd15", ["_read_safetensors", "_hub_folder", "_is_repo_id"]),
    ("edm", "cosmos_predict2", ["_safe", "_progress", "check_keys", "config_to_json"]),
    ("dit", "cosmos_predict2", ["config_from_json"]),
    ("autoencoder_kl", "cosmos_predict2", ["_read_safetensors"]),
    ("autoencoder_kl", "cogvideox_vae", ["group_norm", "DiagonalGaussian", "_read_safetensors", "check_keys", "_hub_folder", "_is_repo_id"]),
    ("autoencoder_kl", "wan_vae", ["DiagonalGaussian", "_read_safetensors", "check_keys", "_hub_folder", "_is_repo_id"]),
]  # fmt: skip


@pytest.mark.parametrize("original, copy, name", [(o, c, n) for o, c, names in COPIES for n in names])
def test_deliberate_copies_are_identical(original, copy, name):
    source = inspect.getsource(getattr(importlib.import_module(f"models.{original}"), name))
    assert inspect.getsource(getattr(importlib.import_module(f"models.{copy}"), name)) == source, (
        f"models/{copy}.py's {name} differs from models/{original}.py's; keep the copies identical"
    )


# The section "Runs that can be trusted for a week" of train_edm.py, copied word for word into train_video.py (each
# training script stays readable on its own; a fix to one copy must reach every copy).
RUN_SAFETY = ["fail", "check_flag_ranges", "split_batch", "checkpoints", "prepare_run_dir", "write_atomic", "open_metrics", "all_finite", "nonfinite_tensors", "save_checkpoint"]  # fmt: skip
TRAIN_VIDEO_COPIES = [("train_edm", "train_video", RUN_SAFETY)]


@pytest.mark.parametrize("original, copy, name", [(o, c, n) for o, c, names in TRAIN_VIDEO_COPIES for n in names])
def test_train_video_copies_are_identical(original, copy, name):
    source = inspect.getsource(getattr(importlib.import_module(original), name))
    assert inspect.getsource(getattr(importlib.import_module(copy), name)) == source, (
        f"{copy}.py's {name} differs from {original}.py's; keep the copies identical"
    )
