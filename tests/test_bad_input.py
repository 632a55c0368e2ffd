"""Runs that can be trusted: bad input to a training script ends with one line `error: <what> (<where>): <fix>`,
exit code 2, no traceback and nothing on disk changed; a non-finite step is skipped on every process and a run that
keeps diverging stops without saving; run directories never mix; metrics.jsonl reads as one run after a resume.

Most runs here call the script's main in-process (a tiny run takes a second or two, a subprocess five); one
subprocess per behaviour checks what the user sees: the exit code and the absence of a traceback."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

import train_edm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tiny", "--method", "sft", "--num_threads", "1", "--eval_every", "0"]


def run(argv, capsys=None):
    """train_edm's main in-process: (exit code, stderr)."""
    try:
        train_edm.main(train_edm.parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err if capsys else ""


def run_subprocess(*flags, script="train_edm.py"):
    result = subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


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


# ----------------------------------------------------------------------------
# Flags: every numeric flag validated before anything loads


def test_every_numeric_flag_has_a_range():
    numeric = {a.dest for a in train_edm.parser._actions if a.type in (int, float)}
    listed = [name for names in train_edm.FLAG_RANGES.values() for name in names]
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
        (["--p_mean", "nan"], "--p_mean"),
        (["--beta2", "1.5"], "--beta2"),
        (["--ema", "0.9999", "--save_every", "-1"], "--save_every"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flags, flag):
    out = tmp_path / "run"
    code, err = run([*TINY, *flags, "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, flag)
    assert not out.exists()


def test_a_batch_that_does_not_split_over_processes_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run([*TINY, "--batch_size", "8"], capsys)
    assert_clean_error(code, err, "--batch_size", "3 processes")


def test_print_config_resolves_a_preset_without_loading(capsys):
    code, _ = run(["--preset", "dmd2-cifar10", "--print_config"])  # its teacher and data are not on this machine
    config = json.loads(capsys.readouterr().out)
    assert code == 0 and config["method"] == "dmd2" and config["batch_size"] == 2048
    assert config["derived"]["micro_batch_per_process"] * config["derived"]["accumulation_steps"] == 2048
    assert config["out_dir"] == os.path.join("out", "train_edm", "dmd2-cifar10")


def test_default_run_directories_do_not_collide():
    names = {train_edm.parse_args(["--preset", p]).out_dir for p in train_edm.PRESETS}
    names |= {train_edm.parse_args(["--method", m, "--tiny"]).out_dir for m in ("sft", "cm", "dmd2")}
    names.add(train_edm.parse_args(["--method", "sft", "--model", "sit", "--tiny"]).out_dir)
    assert len(names) == len(train_edm.PRESETS) + 4


# ----------------------------------------------------------------------------
# Run directories: one run each


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny sft run of 4 steps with checkpoints at 2 and 4; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    code, _ = run([*TINY, "--max_steps", "4", "--save_every", "2", "--out_dir", str(out)])
    assert code == 0
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_rerun_into_another_runs_directory_is_refused(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run([*TINY, "--max_steps", "2", "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, "holds another run", "--resume", "--overwrite")
    assert snapshot(out) == before


def test_overwrite_replaces_the_earlier_run(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    code, _ = run([*TINY, "--max_steps", "1", "--save_every", "1", "--out_dir", str(out), "--overwrite"])
    assert code == 0
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt_")) == ["ckpt_0000001"]
    assert [r["step"] for r in metric_lines(out)] == [1]


@pytest.mark.parametrize("other", [["--method", "cm"], ["--model", "sit"], ["--arch", "toy"]])
def test_resume_refuses_another_run(finished_run, tmp_path, capsys, other):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run([*TINY, *other, "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "another run", other[0])
    assert snapshot(out) == before


def test_resume_refuses_a_checkpoint_of_another_shape(finished_run, tmp_path, capsys):
    """The run's identity matches but a tensor's shape does not (weights from another architecture): the loader's
    size mismatch is reported as bad input, not as a traceback."""
    from safetensors.torch import save_file

    out = copy_run(finished_run, tmp_path / "run")
    path = out / "ckpt_0000004" / "student.safetensors"
    weights = load_file(path)
    name = next(k for k, v in weights.items() if v.ndim == 4)
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


def test_resume_continues_another_scripts_run_only_with_the_same_script(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    args_file = out / "ckpt_0000004" / "args.json"
    args = json.loads(args_file.read_text())
    args_file.write_text(json.dumps(args | {"script": "train_video.py"}))
    code, err = run([*TINY, "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "train_video.py")


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, err = run_subprocess(*TINY, "--max_steps", "1", "--out_dir", str(target))
    assert_clean_error(code, err, "is a file", "--out_dir")
    assert target.read_text() == "keep me"


def test_stale_temporary_checkpoints_are_removed_and_metrics_read_as_one_run(finished_run, tmp_path, capsys):
    """A crash after step 3 (logged, not saved) and in the middle of writing checkpoint 4: the resumed run drops the
    log lines past its checkpoint and the half-written directory, and logs each step once."""
    out = copy_run(finished_run, tmp_path / "run")
    import shutil

    shutil.rmtree(out / "ckpt_0000004")
    (out / "ckpt_0000004.tmp").mkdir()
    (out / "ckpt_0000004.tmp" / "student.safetensors").write_bytes(b"half")
    code, _ = run([*TINY, "--max_steps", "5", "--save_every", "5", "--out_dir", str(out), "--resume"], capsys)
    assert code == 0
    assert "ckpt_0000004.tmp" in capsys.readouterr().out or not (out / "ckpt_0000004.tmp").exists()
    assert not (out / "ckpt_0000004.tmp").exists()
    assert [r["step"] for r in metric_lines(out)] == [1, 2, 3, 4, 5]


def test_metrics_reach_the_file_line_by_line(tmp_path, monkeypatch):
    """Each record is on disk when the next step starts (a kill -9 loses at most the step in flight)."""
    seen = []
    original = train_edm.sft_loss

    def spy(net, x0, labels, args, module):
        seen.append(len(metric_lines(tmp_path / "run")))
        return original(net, x0, labels, args, module)

    monkeypatch.setattr(train_edm, "sft_loss", spy)
    assert run([*TINY, "--max_steps", "3", "--save_every", "0", "--out_dir", str(tmp_path / "run")])[0] == 0
    assert seen == [0, 1, 2]


# ----------------------------------------------------------------------------
# Non-finite steps


def nan_at(steps, rank=None):
    """An sft loss that is NaN at the given (0-based) steps, on every process or only on `rank`."""
    original = train_edm.sft_loss
    calls = {"n": 0}

    def loss(net, x0, labels, args, module):
        value, logs = original(net, x0, labels, args, module)
        step, calls["n"] = calls["n"], calls["n"] + 1
        if step in steps and (rank is None or int(os.environ.get("RANK", 0)) == rank):
            value = value * float("nan")
        return value, logs

    return loss


def test_a_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch):
    """Step 3's loss is NaN: its update is skipped (the weights after it equal those before), the true gradient norm
    (NaN) and the skip count are logged, and the run ends with finite weights."""
    monkeypatch.setattr(train_edm, "sft_loss", nan_at({2}))
    out = tmp_path / "run"
    student, emas = train_edm.main(train_edm.parse_args([*TINY, "--max_steps", "4", "--save_every", "2", "--out_dir", str(out)]))  # fmt: skip
    records = metric_lines(out)
    assert [r["skipped"] for r in records] == [0, 0, 1, 1]
    assert records[2]["grad_norm"] != records[2]["grad_norm"]  # NaN, as computed
    assert all(torch.isfinite(p).all() for p in student.parameters())
    for name in ("student", "ema_0.9999"):
        assert all(torch.isfinite(v).all() for v in load_file(out / "ckpt_0000004" / f"{name}.safetensors").values())


def test_a_skipped_step_leaves_the_weights_and_emas_unchanged(tmp_path, monkeypatch):
    """Against a run that stops before the bad step: after the skipped step 3, student and EMA equal step 2's."""
    monkeypatch.setattr(train_edm, "sft_loss", nan_at({2}))
    out = tmp_path / "run"
    student, emas = train_edm.main(train_edm.parse_args([*TINY, "--max_steps", "3", "--save_every", "2", "--out_dir", str(out)]))  # fmt: skip
    saved = load_file(out / "ckpt_0000002" / "student.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in student.state_dict().items())
    saved_ema = load_file(out / "ckpt_0000002" / "ema_0.9999.safetensors")
    assert all(torch.equal(v, saved_ema[k]) for k, v in emas["0.9999"].state_dict().items())


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(finished_run, tmp_path, monkeypatch, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out / "ckpt_0000004")
    monkeypatch.setattr(train_edm, "sft_loss", nan_at(set(range(100))))
    argv = [*TINY, "--max_steps", "20", "--save_every", "10", "--max_skipped_steps", "3", "--out_dir", str(out), "--resume"]  # fmt: skip
    code, err = run(argv, capsys)
    assert_clean_error(code, err, "3 consecutive steps", "ckpt_0000004", expected=1)
    assert snapshot(out / "ckpt_0000004") == before
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt_")) == ["ckpt_0000002", "ckpt_0000004"]


def test_no_checkpoint_with_nonfinite_weights_is_written(tmp_path, capsys):
    sd = {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}
    with pytest.raises(SystemExit) as e:
        train_edm.save_checkpoint(str(tmp_path), 5, {"student": sd}, {"student": {}}, {}, "{}")
    assert e.value.code == 1 and "student.w" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_full_disk_at_checkpoint_time_leaves_no_partial_checkpoint(finished_run, tmp_path, monkeypatch, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_edm.torch, "save", full)
    sd = {"w": torch.ones(2)}
    with pytest.raises(SystemExit) as e:
        train_edm.save_checkpoint(str(out), 6, {"student": sd}, {"student": {}}, {}, "{}")
    assert e.value.code == 1 and "No space left" in capsys.readouterr().err
    assert snapshot(out) == before


def test_nan_on_one_process_is_skipped_on_both(tmp_path):
    """Two gloo processes; the loss is NaN on rank 1 only at step 2: both skip it (else DDP's weights would part),
    and the run ends with the same finite weights on both (each rank saves its student for the comparison)."""
    wrapper = tmp_path / "nan_rank1.py"
    wrapper.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "import torch, train_edm, test_bad_input\n"
        "train_edm.sft_loss = test_bad_input.nan_at({1}, rank=1)\n"
        "student, _ = train_edm.main(train_edm.parse_args(sys.argv[1:]))\n"
        "torch.save(student.state_dict(), os.path.join(sys.argv[-1], f'rank{os.environ[\"RANK\"]}.pt'))\n"
    )
    out = tmp_path / "run"
    flags = [*TINY, "--batch_size", "8", "--max_steps", "3", "--save_every", "0", "--out_dir", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(wrapper), *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["skipped"] for r in metric_lines(out)] == [0, 1, 1]
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) and torch.isfinite(a[k]).all() for k in a)


# ----------------------------------------------------------------------------
# Data and checkpoints given by the user


def png_bytes(color=(255, 0, 0)):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_data(kind, root):
    folder = root / "data"
    folder.mkdir()
    if kind == "empty":
        return folder
    if kind == "not_images":
        (folder / "readme.txt").write_text("no images here")
        return folder
    (folder / "a.png").write_bytes(png_bytes())
    if kind == "fake_png":
        (folder / "b.png").write_bytes(b"this is not a png")
    if kind == "missing_label":
        (folder / "b.png").write_bytes(png_bytes((0, 255, 0)))
        (folder / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0]]}))
    if kind in ("corrupt_zip", "truncated_zip"):
        archive = root / "data.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("a.png", png_bytes())
            z.writestr("b.png", png_bytes((0, 0, 255)))
        data = archive.read_bytes()
        archive.write_bytes(data[: len(data) // 2] if kind == "truncated_zip" else b"garbage" + data[7:])
        return archive
    return folder


@pytest.mark.parametrize(
    "kind, words",
    [
        ("empty", ["no PNG"]),
        ("not_images", ["no PNG"]),
        ("fake_png", ["b.png", "not a readable PNG"]),
        ("missing_label", ["b.png", "no label"]),
        ("corrupt_zip", ["data.zip"]),
        ("truncated_zip", ["data.zip"]),
    ],
)
def test_bad_data_is_named(tmp_path, capsys, kind, words):
    data = make_data(kind, tmp_path)
    code, err = run([*TINY, "--data", str(data), "--max_steps", "4", "--batch_size", "4", "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_clean_error(code, err, "--data", *words)
    if kind != "fake_png":  # found before the run starts: the directory stays unclaimed for the fixed command
        assert not (tmp_path / "run" / "args.json").exists()


def test_overwrite_with_bad_input_keeps_the_earlier_run(finished_run, tmp_path, capsys):
    """--overwrite removes the earlier run only once every input has loaded."""
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    data = make_data("empty", tmp_path)
    code, err = run([*TINY, "--data", str(data), "--max_steps", "1", "--out_dir", str(out), "--overwrite"], capsys)
    assert_clean_error(code, err, "--data")
    assert snapshot(out) == before


def test_a_missing_teacher_is_one_line(tmp_path):
    code, err = run_subprocess("--method", "dmd2", "--teacher", "edm-cifar10-32x32-cond-vp", "--max_steps", "1", "--out_dir", str(tmp_path / "run"))  # fmt: skip
    assert_clean_error(code, err, "--teacher", "download.py")


def test_a_critic_that_stays_nonfinite_stops_the_run(tmp_path, monkeypatch, capsys):
    """dmd2 alternates critic and generator steps: skips are counted per kind, so good generator steps in between
    do not hide a critic whose every step is NaN."""
    original = train_edm.dmd2_critic_loss

    def nan_critic(*args, **kwargs):
        loss, logs = original(*args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(train_edm, "dmd2_critic_loss", nan_critic)
    argv = ["--tiny", "--method", "dmd2", "--num_threads", "1", "--eval_every", "0", "--save_every", "0"]
    argv += ["--student_update_freq", "2", "--max_skipped_steps", "3", "--max_steps", "20", "--out_dir", str(tmp_path / "run")]  # fmt: skip
    code, err = run(argv, capsys)
    assert_clean_error(code, err, "3 consecutive critic steps", "up to step 5", expected=1)
    assert [r["skipped"] for r in metric_lines(tmp_path / "run")] == [1, 1, 2, 2]  # generator steps 2 and 4 taken
