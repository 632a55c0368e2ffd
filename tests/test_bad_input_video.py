"""Runs of train_video.py that can be trusted (tests/test_bad_input.py's checks, for the video script): bad input ends
with one line `error: <what> (<where>): <fix>`, exit code 2, no traceback and nothing on disk changed; a non-finite
step is skipped and a run that keeps diverging stops without saving; run directories never mix; metrics.jsonl reads
as one run after a resume; and the video script's own input (--prompts, --data shards, --pairs, --student) is named
when it is wrong.

The runs call the script's main in-process (a tiny run takes a second, a subprocess ten); one subprocess checks what
the user sees from the command line: the exit code and the absence of a traceback."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_video as tv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Two shards of 4 tiny clips (4, 3, 8, 8) with their prompts, and a text cache shared by the runs."""
    root = tmp_path_factory.mktemp("video")
    g = torch.Generator().manual_seed(0)
    (root / "data").mkdir()
    for k in range(2):
        prompts = json.dumps([f"clip {i % 2}" for i in range(4 * k, 4 * k + 4)])
        save_file({"latents": torch.randn(4, 4, 3, 8, 8, generator=g)}, str(root / "data" / f"shard_{k:05d}.safetensors"), metadata={"prompts": prompts})  # fmt: skip
    return root


def tiny(fx, *flags):
    """A tiny sft run on the fixture's shards (no sample grids)."""
    return ["--tiny", "--method", "sft", "--data", str(fx / "data"), "--num_threads", "1", "--eval_every", "0", "--text_cache", str(fx / "cache"), *flags]  # fmt: skip


def run(argv, capsys=None):
    """train_video's main in-process: (exit code, stderr)."""
    try:
        tv.main(tv.parse_args(argv))
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
    numeric = {a.dest for a in tv.parser._actions if a.type in (int, float)}
    listed = [name for names in tv.FLAG_RANGES.values() for name in names]
    assert len(listed) == len(set(listed)), "a flag is listed under two ranges"
    assert numeric == set(listed), f"unlisted: {numeric - set(listed)}, not flags: {set(listed) - numeric}"


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--batch_size", "0"], "--batch_size"),
        (["--batch_size", "-4"], "--batch_size"),
        (["--batch_size", "3", "--micro_batch", "2"], "--micro_batch"),
        (["--micro_batch", "-3"], "--micro_batch"),
        (["--max_steps", "-5"], "--max_steps"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "1e6"], "--lr"),
        (["--p_mean", "nan"], "--p_mean"),
        (["--beta2", "1.5"], "--beta2"),
        (["--student_steps", "0"], "--student_steps"),
        (["--eval_n", "0"], "--eval_n"),
        (["--t_list", "0.9,x"], "--t_list"),
        (["--t_list", "0.9,0.5,0"], "--t_list"),  # 3 times for 4 steps
        (["--latent_shape", "4,3,8"], "--latent_shape"),
        (["--ema", "fast"], "--ema"),
        (["--ema", "1.5"], "--ema"),
        (["--disc_blocks", "1,x"], "--disc_blocks"),
        (["--arch", "nosuch"], "--arch"),
        (["--t_sampler", "nosuch"], "--t_sampler"),
        (["--method", "kd", "--teacher_steps", "6"], "--teacher_steps"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(fx, tmp_path, capsys, flags, flag):
    out = tmp_path / "run"
    code, err = run([*tiny(fx), *flags, "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, flag)
    assert not out.exists()


def test_a_batch_that_does_not_split_over_processes_is_refused(fx, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run([*tiny(fx), "--batch_size", "4"], capsys)
    assert_clean_error(code, err, "--batch_size", "3 processes")


def test_print_config_resolves_a_preset_without_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its teacher, data and prompts are not on this machine; nothing is written
    code, _ = run(["--preset", "dmd2-wan-t2v-1.3b", "--print_config"])
    config = json.loads(capsys.readouterr().out)
    assert code == 0 and config["method"] == "dmd2" and config["batch_size"] == 64 and config["micro_batch"] == 1
    assert config["derived"]["micro_batch_per_process"] * config["derived"]["accumulation_steps"] == 64
    assert config["derived"]["student_times"] == [float(t) for t in tv.WAN_T_LIST.split(",")]
    assert config["out_dir"] == os.path.join("out", "train_video", "dmd2-wan-t2v-1.3b")
    assert os.listdir(tmp_path) == []


def test_a_preset_does_not_leak_into_the_next_parse():
    assert tv.parse_args(["--preset", "dmd2-wan-t2v-1.3b"]).disc_blocks == "15,22,29"
    args = tv.parse_args(["--tiny"])
    assert (args.disc_blocks, args.lr, args.student_update_freq, args.t_list) == ("", 1e-5, 5, "")


def test_default_run_directories_do_not_collide():
    names = {tv.parse_args(["--preset", p]).out_dir for p in tv.PRESETS}
    combos = [(model, method) for model in tv.MODELS for method in ("sft", "kd", "dmd2")]
    names |= {tv.parse_args(["--model", m, "--method", k, "--tiny"]).out_dir for m, k in combos}
    names.add(tv.parse_args(["--model", "wan", "--method", "dmd2"]).out_dir)
    assert len(names) == len(tv.PRESETS) + len(combos) + 1
    assert tv.parse_args(["--method", "kd", "--tiny"]).pairs == os.path.join("out", "train_video", "wan-kd-tiny", "pairs")  # fmt: skip


# ----------------------------------------------------------------------------
# Run directories: one run each


@pytest.fixture(scope="module")
def finished_run(fx, tmp_path_factory):
    """A tiny sft run of 4 steps with checkpoints at 2 and 4 (and an EMA); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    code, _ = run([*tiny(fx), "--ema", "0.9", "--max_steps", "4", "--save_every", "2", "--out_dir", str(out)])
    assert code == 0
    return out


def test_a_rerun_into_another_runs_directory_is_refused(fx, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run([*tiny(fx), "--max_steps", "2", "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, "holds another run", "--resume", "--overwrite")
    assert snapshot(out) == before


def test_overwrite_replaces_the_earlier_run(fx, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    code, _ = run([*tiny(fx), "--max_steps", "1", "--save_every", "1", "--out_dir", str(out), "--overwrite"])
    assert code == 0
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt_")) == ["ckpt_0000001"]
    assert [r["step"] for r in metric_lines(out)] == [1]


@pytest.mark.parametrize(
    "other", [["--method", "dmd2"], ["--model", "cosmos"], ["--arch", "tiny-vace"], ["--disc_blocks", "1"]]
)
def test_resume_refuses_another_run(fx, finished_run, tmp_path, capsys, other):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run([*tiny(fx), "--ema", "0.9", *other, "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "another run", other[0])
    assert snapshot(out) == before


def test_resume_refuses_a_checkpoint_of_another_shape(fx, finished_run, tmp_path, capsys):
    """The run's identity matches but a tensor's shape does not: the size mismatch is bad input, not a traceback."""
    out = copy_run(finished_run, tmp_path / "run")
    path = out / "ckpt_0000004" / "student.safetensors"
    weights = load_file(path)
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = torch.zeros(1, *weights[name].shape[1:])
    save_file(weights, path)
    before = snapshot(out)
    code, err = run([*tiny(fx), "--ema", "0.9", "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "does not fit", "--resume", name)
    assert snapshot(out) == before


@pytest.mark.parametrize("setup", ["missing", "empty", "not_a_checkpoint"])
def test_resume_without_a_checkpoint_is_refused(fx, tmp_path, capsys, setup):
    out = tmp_path / "run"
    if setup != "missing":
        out.mkdir()
    if setup == "not_a_checkpoint":
        (out / "ckpt_good").mkdir()
        (out / "ckpt_0000007").mkdir()  # the right name, but no state.pt or args.json inside
    code, err = run([*tiny(fx), "--max_steps", "2", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "no checkpoint", "--resume")
    assert not any(p.name == "metrics.jsonl" for p in tmp_path.rglob("*"))


def test_resume_refuses_another_scripts_run(fx, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    args_file = out / "ckpt_0000004" / "args.json"
    args_file.write_text(json.dumps(json.loads(args_file.read_text()) | {"script": "train_wan_causal.py"}))
    code, err = run([*tiny(fx), "--ema", "0.9", "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "train_wan_causal.py")


def test_out_dir_that_is_a_file_is_refused(fx, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, err = run([*tiny(fx), "--max_steps", "1", "--out_dir", str(target)], capsys)
    assert_clean_error(code, err, "is a file", "--out_dir")
    assert target.read_text() == "keep me"


def test_stale_temporary_checkpoints_are_removed_and_metrics_read_as_one_run(fx, finished_run, tmp_path, capsys):
    """A crash after step 3 (logged, not saved) and in the middle of writing checkpoint 4: the resumed run drops the
    log lines past its checkpoint and the half-written directory, logs each step once and ends where the run that
    never crashed ends (exact resume)."""
    out = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(out / "ckpt_0000004")
    (out / "ckpt_0000004.tmp").mkdir()
    (out / "ckpt_0000004.tmp" / "student.safetensors").write_bytes(b"half")
    code, _ = run([*tiny(fx), "--ema", "0.9", "--max_steps", "4", "--save_every", "2", "--out_dir", str(out), "--resume"])  # fmt: skip
    assert code == 0 and "removed ckpt_0000004.tmp" in capsys.readouterr().out
    assert not (out / "ckpt_0000004.tmp").exists()
    assert [r["step"] for r in metric_lines(out)] == [1, 2, 3, 4]
    for name in ("student", "ema_0.9"):
        a, b = (load_file(d / "ckpt_0000004" / f"{name}.safetensors") for d in (out, finished_run))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_metrics_reach_the_file_line_by_line(fx, tmp_path, monkeypatch):
    """Each record is on disk when the next step starts (a kill -9 loses at most the step in flight)."""
    seen, original = [], tv.sft_loss

    def spy(*args):
        seen.append(len(metric_lines(tmp_path / "run")))
        return original(*args)

    monkeypatch.setattr(tv, "sft_loss", spy)
    assert run([*tiny(fx), "--max_steps", "3", "--save_every", "0", "--out_dir", str(tmp_path / "run")])[0] == 0
    assert seen == [0, 1, 2]


# ----------------------------------------------------------------------------
# Non-finite steps


def nan_at(steps, loss="sft_loss"):
    """The script's loss `loss`, NaN at the given (0-based) calls."""
    original, calls = getattr(tv, loss), {"n": 0}

    def patched(*args):
        value, logs = original(*args)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return (value * float("nan") if step in steps else value), logs

    return patched


def test_a_nonfinite_step_is_skipped_and_logged(fx, tmp_path, monkeypatch):
    """Step 3's loss is NaN: its update is skipped, the true gradient norm (NaN, not the 0 of zeroed gradients) and
    the skip count are logged, and the run ends with finite weights."""
    monkeypatch.setattr(tv, "sft_loss", nan_at({2}))
    out = tmp_path / "run"
    student, _ = tv.main(tv.parse_args([*tiny(fx), "--ema", "0.9", "--max_steps", "4", "--save_every", "2", "--out_dir", str(out)]))  # fmt: skip
    records = metric_lines(out)
    assert [r["skipped"] for r in records] == [0, 0, 1, 1]
    assert records[2]["grad_norm_student"] != records[2]["grad_norm_student"]  # NaN, as computed
    assert all(torch.isfinite(p).all() for p in student.parameters())
    for name in ("student", "ema_0.9"):
        assert all(torch.isfinite(v).all() for v in load_file(out / "ckpt_0000004" / f"{name}.safetensors").values())


def test_a_skipped_step_leaves_the_weights_and_emas_unchanged(fx, tmp_path, monkeypatch):
    """After the skipped step 3, the student and its EMA equal step 2's checkpoint."""
    monkeypatch.setattr(tv, "sft_loss", nan_at({2}))
    out = tmp_path / "run"
    student, emas = tv.main(tv.parse_args([*tiny(fx), "--ema", "0.9", "--max_steps", "3", "--save_every", "2", "--out_dir", str(out)]))  # fmt: skip
    saved = load_file(out / "ckpt_0000002" / "student.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in student.state_dict().items())
    saved_ema = load_file(out / "ckpt_0000002" / "ema_0.9.safetensors")
    assert all(torch.equal(v, saved_ema[k]) for k, v in emas["0.9"].state_dict().items())


def test_a_skipped_critic_step_updates_neither_critic(fx, tmp_path, monkeypatch):
    """dmd2: the first step is a critic step (fake score and GAN heads, two optimizers); with its loss NaN neither
    moves: the fake score still equals the student, both copies of the teacher."""
    monkeypatch.setattr(tv, "dmd2_critic_loss", nan_at({0}, "dmd2_critic_loss"))
    out = tmp_path / "run"
    tv.main(tv.parse_args([*tiny(fx), "--method", "dmd2", "--gan_weight", "0.1", "--student_update_freq", "2", "--max_steps", "1", "--save_every", "1", "--out_dir", str(out)]))  # fmt: skip
    assert metric_lines(out)[0]["skipped"] == 1
    student, fake = (load_file(out / "ckpt_0000001" / f"{n}.safetensors") for n in ("student", "fake_score"))
    assert all(torch.equal(student[k], fake[k]) for k in student)
    assert all(torch.isfinite(v).all() for v in load_file(out / "ckpt_0000001" / "discriminator.safetensors").values())


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(fx, finished_run, tmp_path, monkeypatch, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out / "ckpt_0000004")
    monkeypatch.setattr(tv, "sft_loss", nan_at(set(range(100))))
    argv = [*tiny(fx), "--ema", "0.9", "--max_steps", "20", "--save_every", "10", "--max_skipped_steps", "3", "--out_dir", str(out), "--resume"]  # fmt: skip
    code, err = run(argv, capsys)
    assert_clean_error(code, err, "3 consecutive steps", "ckpt_0000004", expected=1)
    assert snapshot(out / "ckpt_0000004") == before
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt_")) == ["ckpt_0000002", "ckpt_0000004"]


def test_a_critic_that_stays_nonfinite_stops_the_run(fx, tmp_path, monkeypatch, capsys):
    """dmd2 alternates critic and generator steps: a critic whose every step is NaN never makes 3 skips in a row of
    all steps, but it does of its own steps; the run stops there, its checkpoints as they were written."""
    monkeypatch.setattr(tv, "dmd2_critic_loss", nan_at(set(range(100)), "dmd2_critic_loss"))
    out = tmp_path / "run"
    argv = [*tiny(fx), "--method", "dmd2", "--student_update_freq", "2", "--max_steps", "10", "--save_every", "2", "--max_skipped_steps", "3", "--out_dir", str(out)]  # fmt: skip
    code, err = run(argv, capsys)
    assert_clean_error(code, err, "3 consecutive critic steps", "ckpt_0000004", expected=1)
    assert [r["skipped"] for r in metric_lines(out)] == [1, 1, 2, 2]
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt_")) == ["ckpt_0000002", "ckpt_0000004"]


def test_no_checkpoint_with_nonfinite_weights_is_written(tmp_path, capsys):
    sd = {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}
    with pytest.raises(SystemExit) as e:
        tv.save_checkpoint(str(tmp_path), 5, {"student": sd}, {"student": {}}, {}, "{}")
    assert e.value.code == 1 and "student.w" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# The video script's own input: prompts, latent shards, teacher pairs, networks


def make_input(kind, root):
    """A bad --prompts file or --data folder of the given kind, under root."""
    if kind.startswith("prompts_"):
        path = root / "prompts.txt"
        content = {"prompts_empty": b"", "prompts_blank": b"\n  \n\n", "prompts_binary": bytes(range(256)) * 4, "prompts_nul": b"a cat\x00\x00\n"}  # fmt: skip
        if kind == "prompts_dir":
            path.mkdir()
        elif kind != "prompts_missing":
            path.write_bytes(content[kind])
        return path
    folder = root / "data"
    if kind == "data_missing":
        return folder
    if kind == "data_file":
        folder.write_text("not a folder")
        return folder
    folder.mkdir()
    latents, three = torch.zeros(2, 4, 3, 8, 8), json.dumps(["a", "b"])
    if kind == "data_not_shards":
        (folder / "readme.txt").write_text("no shards here")
    elif kind == "data_garbage":
        (folder / "shard_00000.safetensors").write_bytes(b"not a safetensors file at all")
    elif kind == "data_truncated":
        save_file({"latents": latents}, str(folder / "shard_00000.safetensors"), metadata={"prompts": three})
        data = (folder / "shard_00000.safetensors").read_bytes()
        (folder / "shard_00000.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "data_prompts_not_json":
        save_file({"latents": latents}, str(folder / "s.safetensors"), metadata={"prompts": "[not json"})
    elif kind == "data_per_clip":
        save_file({"latents": latents[0]}, str(folder / "clip.safetensors"), metadata={"prompt": "a"})
    elif kind == "data_clip_shapes":
        save_file({"latents": latents}, str(folder / "a.safetensors"), metadata={"prompts": three})
        save_file({"latents": torch.zeros(2, 4, 5, 8, 8)}, str(folder / "b.safetensors"), metadata={"prompts": three})
    elif kind == "data_no_clips":
        save_file({"latents": torch.zeros(0, 4, 3, 8, 8)}, str(folder / "a.safetensors"), metadata={"prompts": "[]"})
    return folder


@pytest.mark.parametrize(
    "kind, flag, words",
    [
        ("prompts_missing", "--prompts", ["does not exist"]),
        ("prompts_empty", "--prompts", ["holds no prompt"]),
        ("prompts_blank", "--prompts", ["holds no prompt"]),
        ("prompts_binary", "--prompts", ["not text"]),
        ("prompts_nul", "--prompts", ["binary"]),
        ("prompts_dir", "--prompts", ["prompts.txt"]),
        ("data_missing", "--data", ["does not exist"]),
        ("data_file", "--data", ["is not a folder"]),
        ("data_not_shards", "--data", ["holds no .safetensors shards"]),
        ("data_garbage", "--data", ["shard_00000.safetensors", "not a readable safetensors"]),
        ("data_truncated", "--data", ["shard_00000.safetensors", "not a readable safetensors"]),
        ("data_prompts_not_json", "--data", ["s.safetensors", "JSON list"]),
        ("data_per_clip", "--data", ["clip.safetensors", "not a shard", "old format", "download.py video-latents"]),
        ("data_clip_shapes", "--data", ["b.safetensors", "same tensors"]),
        ("data_no_clips", "--data", ["no clips"]),
    ],
)
def test_bad_prompts_and_data_are_named(fx, tmp_path, capsys, kind, flag, words):
    """Before anything is written: with --data, an empty --prompts file is refused too (never a silent fallback to
    the single prompt "" or to the data's captions)."""
    path = make_input(kind, tmp_path)
    inputs = ["--prompts", str(path)] if flag == "--prompts" else ["--data", str(path)]
    before = snapshot(tmp_path)
    code, err = run([*tiny(fx), *inputs, "--max_steps", "2", "--out_dir", str(tmp_path / "run")], capsys)
    assert_clean_error(code, err, flag, *words)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--data", ""], ["--method sft trains on real latents", "--data"]),
        (["--data", "", "--method", "dmd2", "--gan_weight", "0.1"], ["GAN heads compare with real latents"]),
        (["--cond_frames", "1"], ["Cosmos Video2World", "--cond_frames"]),
        (["--model", "cosmos", "--cond_frames", "3"], ["leaves no frame", "--cond_frames"]),
        (["--fsdp"], ["--fsdp", "torchrun"]),
        (["--student", "nosuch.safetensors"], ["--student", "nosuch.safetensors"]),
        (["--method", "kd", "--tiny", "--teacher", "nosuch.safetensors"], ["--teacher", "nosuch.safetensors"]),
    ],
)
def test_flags_that_need_each_other_are_refused_before_anything_is_written(fx, tmp_path, capsys, flags, words):
    code, err = run([*tiny(fx), *flags, "--max_steps", "2", "--out_dir", str(tmp_path / "run")], capsys)
    assert_clean_error(code, err, *words)
    assert not (tmp_path / "run").exists()


def test_pairs_and_text_cache_that_are_files_are_refused(fx, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    for flags in (["--method", "kd", "--pairs", str(target)], ["--text_cache", str(target)]):
        code, err = run([*tiny(fx), *flags, "--max_steps", "1", "--out_dir", str(tmp_path / "run")], capsys)
        assert_clean_error(code, err, flags[-2], "is a file")
    assert target.read_text() == "keep me" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["garbage", "nan", "other_architecture"])
def test_a_bad_student_file_is_named(fx, tmp_path, capsys, kind):
    path = tmp_path / "student.safetensors"
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    else:
        torch.manual_seed(0)
        weights = tv.wan.WanModel(tv.wan.CONFIGS["tiny-vace" if kind == "other_architecture" else "tiny"]).state_dict()
        weights = {k: v.clone() for k, v in weights.items()}
        if kind == "nan":
            next(iter(weights.values())).fill_(float("nan"))
        save_file(weights, str(path))
    code, err = run([*tiny(fx), "--student", str(path), "--max_steps", "1", "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_clean_error(code, err, "--student", {"garbage": "not a readable", "nan": "not finite", "other_architecture": "cannot load"}[kind])  # fmt: skip


def test_pairs_of_other_settings_or_unreadable_are_refused(fx, tmp_path, capsys):
    """kd keeps the teacher pairs in --pairs across runs; pairs made for another path (here 4 student steps, then 2
    on their own --t_list) or a shard that cannot be read are named, and the pairs stay as they were."""
    pairs, kd = tmp_path / "pairs", [*tiny(fx), "--method", "kd", "--num_pairs", "4", "--pairs_batch", "2"]
    common = [*kd, "--pairs", str(pairs), "--max_steps", "1", "--save_every", "0"]
    assert run([*common, "--student_steps", "4", "--out_dir", str(tmp_path / "a")])[0] == 0
    before = snapshot(pairs)
    code, err = run([*common, "--student_steps", "2", "--t_list", "0.999,0.8,0", "--teacher_steps", "8", "--out_dir", str(tmp_path / "b")], capsys)  # fmt: skip
    assert_clean_error(code, err, "--pairs", "other settings", "times")
    assert snapshot(pairs) == before
    (pairs / "pairs_00001.safetensors").write_bytes(b"garbage")
    code, err = run([*common, "--student_steps", "4", "--out_dir", str(tmp_path / "d")], capsys)
    assert_clean_error(code, err, "--pairs", "pairs_00001.safetensors", "remove it")


def test_the_command_line_shows_one_line_and_exit_code_2(fx, tmp_path):
    """From the shell: an empty prompts file, exit code 2, one line, no traceback, nothing written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n")
    cmd = [sys.executable, "train_video.py", "--tiny", "--method", "dmd2", "--prompts", str(prompts), "--out_dir", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_clean_error(result.returncode, result.stderr, "--prompts", "holds no prompt")
    assert not (tmp_path / "run").exists()
