"""Runs of train_flux.py that can be trusted: bad input ends with one line `error: <what> (<where>): <fix>`, exit
code 2, no traceback and nothing on disk changed; a non-finite step is skipped on every process and a run that keeps
diverging stops without saving; run directories never mix; metrics.jsonl reads as one run after a resume. The same
checks as tests/test_bad_input.py makes of train_edm.py (its helpers copied here), and the inputs of this script:
prompt files, image and latent folders, teacher pairs, teacher files.

Runs call the script's main in-process (a tiny run takes a second or two, a subprocess many more); one subprocess
checks what the user sees from the command line: the exit code and the absence of a traceback."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_flux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sft on the tiny teacher's pairs (made in the run directory; 4 teacher steps keep them quick)
TINY = ["--tiny", "--method", "sft", "--num_threads", "1", "--eval_every", "0", "--teacher_steps", "4"]


def run(argv, capsys=None):
    """train_flux's main in-process: (exit code, stderr)."""
    try:
        train_flux.main(train_flux.parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err if capsys else ""


def snapshot(folder):
    """Every file under `folder` with the sha256 of its bytes."""
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def metric_lines(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_clean_error(code, err, *words, expected=2):
    """Exit code, one `error: ` line naming every word, no traceback (a progress bar may share stderr)."""
    assert code == expected, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------
# Flags: every numeric flag validated before anything loads


def test_every_numeric_flag_has_a_range():
    numeric = {a.dest for a in train_flux.parser._actions if a.type in (int, float)}
    listed = [name for names in train_flux.FLAG_RANGES.values() for name in names]
    assert len(listed) == len(set(listed)), "a flag is listed under two ranges"
    assert numeric == set(listed), f"unlisted: {numeric - set(listed)}, not flags: {set(listed) - numeric}"


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--batch_size", "0"], "--batch_size"),
        (["--batch_size", "-4"], "--batch_size"),
        (["--batch_size", "7", "--micro_batch", "4"], "--micro_batch"),
        (["--micro_batch", "-3"], "--micro_batch"),
        (["--max_steps", "-5"], "--max_steps"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "1e6"], "--lr"),
        (["--critic_lr", "2"], "--critic_lr"),
        (["--p_mean", "nan"], "--p_mean"),
        (["--beta2", "1.5"], "--beta2"),
        (["--t_min", "0.5", "--t_max", "0.2"], "--t_min"),
        (["--t_max", "2"], "--t_max"),
        (["--ema", "0.9999,fast"], "--ema"),
        (["--ratio_lower", "5", "--ratio_upper", "2"], "--ratio_lower"),
        (["--disc_features", "middle"], "--disc_features"),
        (["--make_pairs", "8", "--pairs", "p", "--teacher_steps", "6"], "--teacher_steps"),
        (["--save_every", "-1"], "--save_every"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flags, flag):
    out = tmp_path / "run"
    code, err = run([*TINY, *flags, "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, flag)
    assert os.listdir(tmp_path) == []


def test_a_flux_resolution_off_the_latent_patches_is_refused(capsys):
    code, err = run(["--model", "flux", "--resolution", "520", "--print_config"], capsys)
    assert_clean_error(code, err, "--resolution", "multiple of 16")


def test_a_batch_that_does_not_split_over_processes_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run([*TINY, "--batch_size", "8"], capsys)
    assert_clean_error(code, err, "--batch_size", "3 processes")


def test_print_config_resolves_a_preset_without_loading(capsys):
    code, _ = run(["--preset", "dmd2-flux", "--print_config"])  # its 12B teacher is not on this machine
    config = json.loads(capsys.readouterr().out)
    assert code == 0 and config["method"] == "dmd2" and config["batch_size"] == 16 and config["resolution"] == 512
    derived = config["derived"]
    assert derived["micro_batch_per_process"] == 2 and derived["micro_batch_per_process"] * derived["accumulation_steps"] == 16  # fmt: skip
    assert derived["emas"] == [] and derived["latent_side"] == 64
    assert config["out_dir"] == os.path.join("out", "train_flux", "dmd2-flux")


def test_a_preset_does_not_leak_into_the_next_parse():
    assert train_flux.parse_args(["--preset", "dmd2-sdxl"]).lr == 5e-5
    args = train_flux.parse_args(["--method", "sft"])
    assert (args.model, args.lr, args.fsdp, args.resolution, args.guidance) == ("flux", 1e-5, False, 512, 3.5)


def test_default_run_directories_do_not_collide():
    names = {train_flux.parse_args(["--preset", p]).out_dir for p in train_flux.PRESETS}
    methods = ("sft", "kd", "dmd2", "fdistill", "ladd")
    names |= {train_flux.parse_args(["--method", m, "--model", f] + t).out_dir for m in methods for f in ("flux", "sd15") for t in ([], ["--tiny"])}  # fmt: skip
    assert len(names) == len(train_flux.PRESETS) + 20


# ----------------------------------------------------------------------------
# Run directories: one run each


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny sft run of 4 steps with checkpoints at 2 and 4; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    code, _ = run([*TINY, "--max_steps", "4", "--save_every", "2", "--out_dir", str(out)])
    assert code == 0
    return out


def test_a_rerun_into_another_runs_directory_is_refused(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run([*TINY, "--max_steps", "2", "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, "holds another run", "--resume", "--overwrite")
    assert snapshot(out) == before


def test_overwrite_replaces_the_earlier_run(finished_run, tmp_path):
    """The earlier run's checkpoints and metrics go; its pairs, made with other settings, are made anew."""
    out = copy_run(finished_run, tmp_path / "run")
    pairs_before = snapshot(out / "pairs")
    code, _ = run([*TINY, "--teacher_steps", "8", "--max_steps", "1", "--save_every", "1", "--out_dir", str(out), "--overwrite"])  # fmt: skip
    assert code == 0
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt_")) == ["ckpt_0000001"]
    assert [r["step"] for r in metric_lines(out)] == [1]
    assert json.loads((out / "pairs" / "pairs.json").read_text())["settings"]["steps"] == 8
    assert snapshot(out / "pairs") != pairs_before


@pytest.mark.parametrize("other", [["--method", "ladd"], ["--model", "sd15"], ["--disc_features", "1"]])
def test_resume_refuses_another_run(finished_run, tmp_path, capsys, other):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run([*TINY, *other, "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "another run", other[0])
    assert snapshot(out) == before


def test_resume_refuses_a_checkpoint_of_another_shape(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    path = out / "ckpt_0000004" / "student.safetensors"
    weights = load_file(path)
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = torch.zeros(1, *weights[name].shape[1:])
    save_file(weights, path)
    before = snapshot(out)
    code, err = run([*TINY, "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "does not fit", "--resume", name)
    assert snapshot(out) == before


@pytest.mark.parametrize("setup", ["missing", "empty", "not_a_checkpoint"])
def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys, setup):
    out = tmp_path / "run"
    if setup != "missing":
        out.mkdir()
    if setup == "not_a_checkpoint":
        (out / "ckpt_good").mkdir()
        (out / "ckpt_0000007").mkdir()  # the right name, but no state.pt or args.json inside
    code, err = run([*TINY, "--max_steps", "2", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "no checkpoint", "--resume")
    assert not any(p.name == "metrics.jsonl" for p in tmp_path.rglob("*"))


def test_stale_temporary_checkpoints_are_removed_and_metrics_read_as_one_run(finished_run, tmp_path, capsys):
    """A crash after step 3 (logged, not saved) and in the middle of writing checkpoint 4: the resumed run drops the
    log lines past its checkpoint and the half-written directory, and logs each step once."""
    out = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(out / "ckpt_0000004")
    (out / "ckpt_0000004.tmp").mkdir()
    (out / "ckpt_0000004.tmp" / "student.safetensors").write_bytes(b"half")
    code, _ = run([*TINY, "--max_steps", "5", "--save_every", "5", "--out_dir", str(out), "--resume"])
    assert code == 0 and "removed ckpt_0000004.tmp" in capsys.readouterr().out
    assert not (out / "ckpt_0000004.tmp").exists()
    assert [r["step"] for r in metric_lines(out)] == [1, 2, 3, 4, 5]


def test_metrics_reach_the_file_line_by_line(tmp_path, monkeypatch):
    """Each record is on disk when the next step starts (a kill -9 loses at most the step in flight)."""
    seen = []
    original = train_flux.sft_loss

    def spy(*args):
        seen.append(len(metric_lines(tmp_path / "run")))
        return original(*args)

    monkeypatch.setattr(train_flux, "sft_loss", spy)
    assert run([*TINY, "--max_steps", "3", "--save_every", "0", "--out_dir", str(tmp_path / "run")])[0] == 0
    assert seen == [0, 1, 2]


# ----------------------------------------------------------------------------
# Non-finite steps


def nan_at(steps, original):
    """A loss function that is NaN at the given (0-based) calls."""
    calls = {"n": 0}

    def loss(*args):
        value, logs = original(*args)
        call, calls["n"] = calls["n"], calls["n"] + 1
        return (value * float("nan") if call in steps else value), logs

    return loss


def test_a_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch):
    """Step 3's loss is NaN: its update is skipped, the true gradient norm (NaN) and the skip count are logged, the
    run ends with finite weights, and the weights and EMA after the skipped step equal those before it."""
    monkeypatch.setattr(train_flux, "sft_loss", nan_at({2}, train_flux.sft_loss))
    out = tmp_path / "run"
    student = train_flux.main(train_flux.parse_args([*TINY, "--max_steps", "4", "--save_every", "1", "--out_dir", str(out)]))  # fmt: skip
    records = metric_lines(out)
    assert [r["skipped"] for r in records] == [0, 0, 1, 1]
    assert records[2]["grad_norm"] != records[2]["grad_norm"] and records[3]["grad_norm"] == records[3]["grad_norm"]
    assert all(torch.isfinite(p).all() for p in student.parameters())
    for name in ("student", "ema_0.9999"):
        two, three, four = (load_file(out / f"ckpt_000000{s}" / f"{name}.safetensors") for s in (2, 3, 4))
        assert all(torch.equal(two[k], three[k]) for k in two), name
        assert all(torch.isfinite(v).all() for v in four.values()), name
    assert not all(torch.equal(three[k], v) for k, v in student.state_dict().items())  # step 4 was taken


def test_a_nonfinite_critic_step_is_skipped(tmp_path, monkeypatch):
    """DMD2's critic step updates the fake score and the GAN heads together: a NaN there skips both."""
    monkeypatch.setattr(train_flux, "critic_loss", nan_at({0}, train_flux.critic_loss))
    out = tmp_path / "run"
    argv = ["--tiny", "--method", "dmd2", "--num_threads", "1", "--eval_every", "0", "--teacher_steps", "4", "--student_update_freq", "2", "--max_steps", "2", "--save_every", "2", "--out_dir", str(out)]  # fmt: skip
    assert run(argv)[0] == 0
    assert [(r["generator_step"], r["skipped"]) for r in metric_lines(out)] == [(False, 1), (True, 1)]
    torch.manual_seed(train_flux.rng_seed(0, 4))  # the tiny teacher the fake score starts from
    teacher = train_flux.FAMILIES["flux"][1](train_flux.flux.CONFIGS["tiny"]).state_dict()
    fake = load_file(out / "ckpt_0000002" / "fake_score.safetensors")
    assert all(torch.equal(fake[k], teacher[k]) for k in teacher)


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(finished_run, tmp_path, monkeypatch, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out / "ckpt_0000004")
    monkeypatch.setattr(train_flux, "sft_loss", nan_at(set(range(100)), train_flux.sft_loss))
    argv = [*TINY, "--max_steps", "20", "--save_every", "10", "--max_skipped_steps", "3", "--out_dir", str(out), "--resume"]  # fmt: skip
    code, err = run(argv, capsys)
    assert_clean_error(code, err, "3 consecutive steps", "ckpt_0000004", expected=1)
    assert snapshot(out / "ckpt_0000004") == before
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt_")) == ["ckpt_0000002", "ckpt_0000004"]


# ----------------------------------------------------------------------------
# Prompts, data, pairs and teachers given by the user


def png_bytes(color=(255, 0, 0)):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_prompts(kind, root):
    path = root / "prompts.txt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_text("")
    elif kind == "blank":
        path.write_text("\n   \n\t\n")
    elif kind == "binary":
        path.write_bytes(png_bytes())
    elif kind == "nul":
        path.write_text("a cat\x00\x00\x00")
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", ["does not exist"]),
        ("folder", ["is a folder"]),
        ("empty", ["holds no prompt"]),
        ("blank", ["holds no prompt"]),
        ("binary", ["not readable text"]),
        ("nul", ["binary"]),
    ],
)
def test_bad_prompts_are_named(tmp_path, capsys, kind, words):
    """The empty file used to train on the single prompt ""."""
    prompts = make_prompts(kind, tmp_path)
    before = snapshot(tmp_path)
    code, err = run(["--tiny", "--method", "dmd2", "--gan_weight", "0", "--prompts", str(prompts), "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_clean_error(code, err, "--prompts", "prompts.txt", *words)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def write_shard(path, latents, prompts):
    save_file({"latents": latents}, path, metadata={"prompts": json.dumps(prompts)})


def make_data(kind, root):
    folder = root / "data"
    if kind == "missing":
        return folder
    if kind == "file":
        folder.write_text("not a folder")
        return folder
    folder.mkdir()
    if kind == "not_images":
        (folder / "readme.txt").write_text("no images here")
    if kind in ("fake_png", "binary_caption"):
        (folder / "a.png").write_bytes(png_bytes())
        (folder / "b.png").write_bytes(png_bytes((0, 255, 0)) if kind == "binary_caption" else b"this is not a png")
    if kind == "binary_caption":
        (folder / "b.txt").write_bytes(b"\xff\xfe\x00caption")
    good = torch.zeros(2, 16, 8, 8)
    if kind == "corrupt_shard":
        write_shard(folder / "a.safetensors", good, ["x", "y"])
        data = (folder / "a.safetensors").read_bytes()
        (folder / "b.safetensors").write_bytes(data[: len(data) // 2])
    if kind == "shard_without_prompts":
        save_file({"latents": good}, folder / "a.safetensors")
    if kind == "prompt_count":
        write_shard(folder / "a.safetensors", good, ["x"])
    if kind == "nonfinite_latents":
        write_shard(folder / "a.safetensors", good.index_fill(1, torch.tensor([3]), float("nan")), ["x", "y"])
    if kind == "shapes_differ":
        write_shard(folder / "a.safetensors", good, ["x", "y"])
        write_shard(folder / "b.safetensors", torch.zeros(2, 16, 4, 4), ["x", "y"])
    if kind == "wrong_shape":
        write_shard(folder / "a.safetensors", torch.zeros(2, 4, 8, 8), ["x", "y"])
    return folder


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", ["does not exist"]),
        ("file", ["is a file"]),
        ("empty", ["no images and no latent shards"]),
        ("not_images", ["no images and no latent shards"]),
        ("fake_png", ["b.png", "not a readable image"]),
        ("binary_caption", ["b.txt", "not readable text"]),
        ("corrupt_shard", ["b.safetensors", "not a readable latent shard"]),
        ("shard_without_prompts", ["a.safetensors", "`prompts` metadata"]),
        ("prompt_count", ["a.safetensors", "1 prompts"]),
        ("nonfinite_latents", ["a.safetensors", "non-finite"]),
        ("shapes_differ", ["b.safetensors", "(16, 8, 8)"]),
        ("wrong_shape", ["needs (16, 8, 8)"]),
    ],
)
def test_bad_data_is_named(tmp_path, capsys, kind, words):
    data = make_data(kind, tmp_path)
    before = snapshot(tmp_path)
    code, err = run([*TINY, "--data", str(data), "--max_steps", "2", "--out_dir", str(tmp_path / "run")], capsys)
    assert_clean_error(code, err, "--data", *words)
    # nothing the user had changed, and no run directory left behind (the one claimed is given back)
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run")} == before
    assert not (tmp_path / "run").exists() or not {"args.json", "metrics.jsonl"} & set(os.listdir(tmp_path / "run"))


def test_the_image_cache_follows_the_data(tmp_path):
    """Images are encoded once into the run directory; other images in a later run (here --overwrite) are encoded
    anew, not replaced by the cache of the earlier ones."""
    for name, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(png_bytes(color))
    out = tmp_path / "run"
    common = [*TINY, "--max_steps", "1", "--save_every", "0", "--out_dir", str(out)]
    assert run([*common, "--data", str(tmp_path / "red")])[0] == 0
    red = load_file(out / "latents" / "shard_00000.safetensors")["latents"]
    assert run([*common, "--data", str(tmp_path / "red"), "--overwrite"])[0] == 0  # the same images: the cache
    assert torch.equal(load_file(out / "latents" / "shard_00000.safetensors")["latents"], red)
    assert run([*common, "--data", str(tmp_path / "blue"), "--overwrite"])[0] == 0
    assert not torch.equal(load_file(out / "latents" / "shard_00000.safetensors")["latents"], red)


@pytest.mark.parametrize("kind", ["missing", "no_index", "corrupt_index", "missing_shard", "corrupt_shard", "states"])
def test_bad_pairs_are_named(finished_run, tmp_path, capsys, kind):
    """kd on the pairs of the finished run (4 trajectory states), damaged in one way each."""
    pairs = tmp_path / "pairs"
    if kind != "missing":
        shutil.copytree(finished_run / "pairs", pairs)
    if kind == "no_index":
        os.remove(pairs / "pairs.json")
    if kind == "corrupt_index":
        (pairs / "pairs.json").write_text('{"settings": ')
    if kind == "missing_shard":
        os.remove(pairs / "shard_00000.safetensors")
    if kind == "corrupt_shard":
        (pairs / "shard_00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    before = snapshot(tmp_path)
    steps = "3" if kind == "states" else "1"
    code, err = run(["--tiny", "--method", "kd", "--pairs", str(pairs), "--student_steps", steps, "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_clean_error(code, err, "--student_steps" if kind == "states" else "--pairs")
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run")} == before
    assert not (tmp_path / "run" / "args.json").exists()


def test_make_pairs_into_pairs_of_other_settings_is_refused(finished_run, tmp_path, capsys):
    pairs = copy_run(finished_run / "pairs", tmp_path / "pairs")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    before = snapshot(pairs)
    code, err = run(["--tiny", "--make_pairs", "4", "--pairs", str(pairs), "--prompts", str(prompts), "--teacher_steps", "8", "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_clean_error(code, err, "other settings", "--pairs")
    assert snapshot(pairs) == before


@pytest.mark.parametrize("kind", ["missing", "corrupt", "no_config", "other_family", "nonfinite"])
def test_a_bad_teacher_file_is_named(finished_run, tmp_path, capsys, kind):
    from dataclasses import asdict

    from models import sd15

    teacher = tmp_path / "teacher.safetensors"
    source = finished_run / "ckpt_0000004" / "student.safetensors"
    weights = load_file(source)
    if kind == "corrupt":
        teacher.write_bytes(source.read_bytes()[:1000])
    if kind == "no_config":
        save_file(weights, teacher)
    if kind == "other_family":
        save_file(weights, teacher, metadata={"config": json.dumps(asdict(sd15.CONFIGS["tiny"]))})
    if kind == "nonfinite":
        name = next(iter(weights))
        weights[name] = torch.full_like(weights[name], float("inf"))
        save_file(weights, teacher, metadata={"config": json.dumps(asdict(train_flux.flux.CONFIGS["tiny"]))})
    before = snapshot(tmp_path)
    code, err = run([*TINY, "--teacher", str(teacher), "--out_dir", str(tmp_path / "run")], capsys)
    assert_clean_error(code, err, "--teacher", "teacher.safetensors")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_an_empty_prompt_file_is_one_line_from_the_command_line(tmp_path):
    """What the user sees: exit code 2 and one line, no traceback, nothing written."""
    prompts = make_prompts("empty", tmp_path)
    argv = ["--tiny", "--method", "dmd2", "--gan_weight", "0", "--prompts", str(prompts), "--out_dir", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run([sys.executable, "train_flux.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_clean_error(result.returncode, result.stderr, "holds no prompt", "--prompts")
    assert os.listdir(tmp_path) == ["prompts.txt"]
