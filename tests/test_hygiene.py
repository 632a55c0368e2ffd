"""House rules that keep model files copyable on their own: no project imports, no diffusers, and the deliberate
copies between model files stay identical."""

import ast
import importlib
import inspect
import os
import subprocess
import sys

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


# The section "Runs that can be trusted for a week" of the training scripts, word for word, so that a fix to one
# reaches every script (what differs per script is its FLAG_RANGES and RUN_IDENTITY); train_edm.py's is the original.
RUN_SAFETY = [
    "fail", "check_flag_ranges", "split_batch", "checkpoints", "prepare_run_dir", "claim_run_dir", "write_atomic",
    "open_metrics", "all_finite", "nonfinite_tensors", "save_checkpoint",
]  # fmt: skip
SCRIPT_COPIES = [("train_edm", script, RUN_SAFETY) for script in ("train_flux", "train_wan_causal", "train_video")]
# The sample-grid helpers: each script keeps its own copy of sample.py's so that it imports no other family's models.
SCRIPT_COPIES += [("sample", script, ["image_grid", "to_uint8"]) for script in ("train_edm", "train_flux", "train_wan_causal", "train_video")]  # fmt: skip
# The video GAN heads: train_wan_causal's causvid / self_forcing use train_video's.
SCRIPT_COPIES += [("train_video", "train_wan_causal", ["Discriminator"])]


@pytest.mark.parametrize("original, copy, name", [(o, c, n) for o, c, names in SCRIPT_COPIES for n in names])
def test_training_scripts_share_the_run_safety_section(original, copy, name):
    source = inspect.getsource(getattr(importlib.import_module(original), name))
    assert inspect.getsource(getattr(importlib.import_module(copy), name)) == source, (
        f"{copy}.py's {name} differs from {original}.py's; keep the copies identical"
    )


@pytest.mark.parametrize("script, family", [("train_edm", {"edm", "edm2", "dit"}), ("train_flux", {"flux", "sd15", "sdxl", "autoencoder_kl"}), ("train_wan_causal", {"wan", "wan_vae"}), ("train_video", {"wan", "wan_vae", "cogvideox", "cogvideox_vae", "cosmos_predict2"})])  # fmt: skip
def test_a_training_script_imports_only_its_own_family(script, family):
    """Forking one script must not pull in the whole project: a fresh interpreter imports the script and lists the
    project's model files it loaded (lazy imports inside functions, e.g. a VAE for sample grids, are allowed)."""
    code = f"import sys, {script}; print(sorted(m[7:] for m in sys.modules if m.startswith('models.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert set(ast.literal_eval(out.stdout)) <= family, f"{script} imports {out.stdout.strip()}"
