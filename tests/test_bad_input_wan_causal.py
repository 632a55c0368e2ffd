"""Runs of train_wan_causal.py that can be trusted: bad input ends with one line `error: <what> (<where>): <fix>`,
exit code 2, no traceback and nothing on disk changed; a non-finite step is skipped and a run that keeps diverging
stops without saving; run directories never mix; metrics.jsonl reads as one run after a resume. The structure and
the helpers are tests/test_bad_input.py's (train_edm.py), copied so each file stands alone.

The runs call the script's main in-process (a tiny run takes a second or two); one subprocess checks what the user
sees from the command line: the exit code and the absence of a traceback."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_wan_causal as twc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tiny", "--method", "sft", "--num_threads", "1", "--sample_every", "0"]


def run(argv, capsys=None):
    """train_wan_causal's main in-process: (exit code, stderr)."""
    try:
        twc.main(twc.parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err if capsys else ""


def run_subprocess(*flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "train_wan_causal.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
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


def ckpt_names(out):
    return sorted(d for d in os.listdir(out) if d.startswith("ckpt_"))


# ----------------------------------------------------------------------------
# Flags: every numeric flag validated before anything loads


def test_every_numeric_flag_has_a_range():
    numeric = {a.dest for a in twc.parser._actions if a.type in (int, float)}
    listed = [name for names in twc.FLAG_RANGES.values() for name in names]
    assert len(listed) == len(set(listed)), "a flag is listed under two ranges"
    assert numeric == set(listed), f"unlisted: {numeric - set(listed)}, not flags: {set(listed) - numeric}"


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--batch_size", "-4"], "--batch_size"),
        (["--batch_size", "3", "--micro_batch", "2"], "--micro_batch"),
        (["--micro_batch", "0"], "--micro_batch"),
        (["--max_steps", "-5"], "--max_steps"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "1e6"], "--lr"),
        (["--beta2", "1.5"], "--beta2"),
        (["--frames", "0"], "--frames"),
        (["--t_min", "0.6", "--t_max", "0.4"], "--t_min"),
        (["--t_list", "0.5,0.9,0"], "--t_list"),
        (["--t_list", "1,nan,0"], "--t_list"),
        (["--t_list", "one,0"], "--t_list"),
        (["--ema", "0.9,fast"], "--ema"),
        (["--method", "self_forcing", "--start_gradient_frame", "6"], "--start_gradient_frame"),
        (["--save_every", "-1"], "--save_every"),
        (["--method", "causvid", "--gan_weight", "-0.1"], "--gan_weight"),
        (["--method", "sft", "--gan_weight", "0.1"], "--gan_weight"),
        (["--method", "causvid", "--gan_weight", "0.1", "--disc_blocks", "1,x"], "--disc_blocks"),
        (["--method", "causvid", "--gan_weight", "0.1", "--disc_blocks", "-1"], "--disc_blocks"),
        (["--method", "causvid", "--gan_weight", "0.1", "--disc_blocks", "1,2"], "--disc_blocks"),  # 2 blocks
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


def test_no_method_is_one_line(capsys):
    code, err = run(["--tiny"], capsys)
    assert_clean_error(code, err, "--method")


def test_print_config_resolves_a_preset_without_loading(monkeypatch, capsys):
    """Its teacher, text encoder and prompts are not on this machine; eight processes, a global batch of 16."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    code, _ = run(["--preset", "self-forcing-wan1.3b", "--batch_size", "16", "--ema", "0.99", "--print_config"])
    config = json.loads(capsys.readouterr().out)
    assert code == 0 and config["method"] == "self_forcing" and config["student_init"] == "self-forcing-ode-init"
    assert config["derived"] == dict(world_size=8, global_batch=16, micro_batch_per_process=1, accumulation_steps=2, emas=[dict(name="ema_0.99", kind="constant", value=0.99)], gan_blocks=[15, 22, 29])  # fmt: skip
    assert config["out_dir"] == os.path.join("out", "train_wan_causal", "self-forcing-wan1.3b")
    assert not os.path.exists(os.path.join(ROOT, config["out_dir"]))


def test_default_run_directories_do_not_collide():
    names = {twc.parse_args(["--preset", p]).out_dir for p in twc.PRESETS}
    names |= {twc.parse_args(["--method", m]).out_dir for m in ("sft", "kd", "causvid", "self_forcing")}
    names |= {twc.parse_args(["--method", m, "--tiny"]).out_dir for m in ("sft", "kd", "causvid", "self_forcing")}
    assert len(names) == len(twc.PRESETS) + 8


def test_a_preset_does_not_leak_into_the_next_parse():
    """parse_args twice in one process: the second run gets the argparse defaults, not the first one's preset."""
    first = twc.parse_args(["--preset", "causvid-wan1.3b"])
    second = twc.parse_args(["--method", "sft"])
    assert first.student_init == "self-forcing-ode-init" and first.lr == 5e-5
    assert second.student_init == "" and second.lr == 5e-6 and second.frames == 21 and not second.fsdp


# ----------------------------------------------------------------------------
# Run directories: one run each


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny sft run of 4 steps with checkpoints at 2 and 4; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    code, _ = run([*TINY, "--max_steps", "4", "--save_every", "2", "--ema", "0.9", "--out_dir", str(out)])
    assert code == 0
    return out


def copy_run(src, dst):
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
    assert ckpt_names(out) == ["ckpt_0000001"]
    assert [r["step"] for r in metric_lines(out)] == [1]


@pytest.mark.parametrize("other", [["--method", "causvid"], ["--chunk_size", "1"], ["--teacher", "wan2.1-t2v-14b"]])
def test_resume_refuses_another_run(finished_run, tmp_path, capsys, other):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run([*TINY, *other, "--ema", "0.9", "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "another run", other[0])
    assert snapshot(out) == before


def test_resume_refuses_a_checkpoint_of_another_shape(finished_run, tmp_path, capsys):
    """The run's identity matches but a tensor's shape does not: the loader's size mismatch is bad input."""
    out = copy_run(finished_run, tmp_path / "run")
    path = out / "ckpt_0000004" / "student.safetensors"
    weights = load_file(path)
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = torch.zeros(1, *weights[name].shape[1:])
    save_file(weights, path)
    before = snapshot(out)
    code, err = run([*TINY, "--ema", "0.9", "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
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


def test_resume_refuses_another_scripts_run(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    args_file = out / "ckpt_0000004" / "args.json"
    args_file.write_text(json.dumps(json.loads(args_file.read_text()) | {"script": "train_video.py"}))
    before = snapshot(out)
    code, err = run([*TINY, "--ema", "0.9", "--max_steps", "6", "--out_dir", str(out), "--resume"], capsys)
    assert_clean_error(code, err, "train_video.py")
    assert snapshot(out) == before


def test_stale_temporary_checkpoints_are_removed_and_metrics_read_as_one_run(finished_run, tmp_path, capsys):
    """A crash after step 3 (logged, not saved) and in the middle of writing checkpoint 4: the resumed run drops the
    log lines past its checkpoint and the half-written directory, and logs each step once."""
    out = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(out / "ckpt_0000004")
    (out / "ckpt_0000004.tmp").mkdir()
    (out / "ckpt_0000004.tmp" / "student.safetensors").write_bytes(b"half")
    code, _ = run([*TINY, "--ema", "0.9", "--max_steps", "5", "--save_every", "5", "--out_dir", str(out), "--resume"])  # fmt: skip
    assert code == 0
    assert "removed ckpt_0000004.tmp" in capsys.readouterr().out
    assert not (out / "ckpt_0000004.tmp").exists()
    assert [r["step"] for r in metric_lines(out)] == [1, 2, 3, 4, 5]
    assert ckpt_names(out) == ["ckpt_0000002", "ckpt_0000005"]


def test_metrics_reach_the_file_line_by_line(tmp_path, monkeypatch):
    """Each record is on disk when the next step starts (a kill -9 loses at most the step in flight)."""
    seen = []
    original = twc.sft_loss

    def spy(net, x0, text, args):
        seen.append(len(metric_lines(tmp_path / "run")))
        return original(net, x0, text, args)

    monkeypatch.setattr(twc, "sft_loss", spy)
    assert run([*TINY, "--max_steps", "3", "--save_every", "0", "--out_dir", str(tmp_path / "run")])[0] == 0
    assert seen == [0, 1, 2]


# ----------------------------------------------------------------------------
# Non-finite steps


def nan_at(steps):
    """An sft loss that is NaN at the given (0-based) steps."""
    original = twc.sft_loss
    calls = {"n": 0}

    def loss(net, x0, text, args):
        value, logs = original(net, x0, text, args)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return (value * float("nan") if step in steps else value), logs

    return loss


def test_a_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch):
    """Step 3's loss is NaN: its update is skipped (student and EMA after it equal step 2's checkpoint), the true
    gradient norm (NaN, not the 0 of zeroed gradients) and the skip count are logged, and the run ends finite."""
    monkeypatch.setattr(twc, "sft_loss", nan_at({2}))
    out = tmp_path / "run"
    student = twc.main(twc.parse_args([*TINY, "--ema", "0.9", "--max_steps", "4", "--save_every", "1", "--out_dir", str(out)]))  # fmt: skip
    records = metric_lines(out)
    assert [r["skipped"] for r in records] == [0, 0, 1, 1]
    assert records[2]["grad_norm"] != records[2]["grad_norm"]  # NaN, as computed
    assert all(r["grad_norm"] == r["grad_norm"] for r in records[:2] + records[3:])
    for name in ("student", "ema_0.9"):
        two, three, four = (load_file(out / f"ckpt_{s:07d}" / f"{name}.safetensors") for s in (2, 3, 4))
        assert all(torch.equal(two[k], three[k]) for k in two), name  # the skipped step changed nothing
        assert not all(torch.equal(three[k], four[k]) for k in three), name  # the next one trained
        assert all(torch.isfinite(v).all() for v in four.values())
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(finished_run, tmp_path, monkeypatch, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out / "ckpt_0000004")
    monkeypatch.setattr(twc, "sft_loss", nan_at(set(range(100))))
    argv = [*TINY, "--ema", "0.9", "--max_steps", "20", "--save_every", "10", "--max_skipped_steps", "3", "--out_dir", str(out), "--resume"]  # fmt: skip
    code, err = run(argv, capsys)
    assert_clean_error(code, err, "3 consecutive steps", "ckpt_0000004", expected=1)
    assert snapshot(out / "ckpt_0000004") == before
    assert ckpt_names(out) == ["ckpt_0000002", "ckpt_0000004"]


def test_no_checkpoint_with_nonfinite_weights_is_written(tmp_path, capsys):
    sd = {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}
    with pytest.raises(SystemExit) as e:
        twc.save_checkpoint(str(tmp_path), 5, {"ema_0.9": sd}, {"ema_0.9": {}}, {}, "{}")
    assert e.value.code == 1 and "ema_0.9.w" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# What the script reads from the user: prompts, latent videos, kd's pairs, checkpoints, folders


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["does not exist"]),
        (b"", ["holds no prompts"]),
        (b"\n   \n\t\n", ["holds no prompts"]),
        (b"a cat\x00\x01\x02\x00", ["binary"]),
        (b"\xff\xfe\x00a\x00 \x00c\x00a\x00t", ["not readable text"]),
    ],
    ids=["missing", "empty", "blank", "binary", "not_utf8"],
)
def test_bad_prompts_are_named(tmp_path, capsys, content, words):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_bytes(content)
    out = tmp_path / "run"
    code, err = run([*TINY, "--method", "self_forcing", "--prompts", str(prompts), "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, "--prompts", "prompts.txt", *words)
    assert not out.exists()


def write_latents(path, latents, prompts="default", **extra):
    n = len(latents)
    meta = {} if prompts is None else {"prompts": json.dumps([f"clip {i}" for i in range(n)] if prompts == "default" else prompts)}  # fmt: skip
    save_file({"latents": latents, **extra}, str(path), metadata=meta)


def make_data(kind, root):
    """A --data directory (or file) with one problem."""
    folder = root / "data"
    if kind == "missing":
        return folder
    if kind == "a_file":
        folder.write_text("not a folder")
        return folder
    folder.mkdir()
    if kind == "empty":
        return folder
    write_latents(folder / "a.safetensors", torch.randn(2, 4, 7, 4, 4))  # a good file first
    bad = folder / "b.safetensors"
    if kind == "garbage":
        bad.write_bytes(b"this is not a safetensors file")
    elif kind == "truncated":
        write_latents(bad, torch.randn(2, 4, 7, 4, 4))
        bad.write_bytes(bad.read_bytes()[:-100])
    elif kind == "no_latents":
        save_file({"video": torch.randn(1, 4, 7, 4, 4)}, str(bad), metadata={"prompts": '["x"]'})
    elif kind == "no_prompts":
        write_latents(bad, torch.randn(1, 4, 7, 4, 4), prompts=None)
    elif kind == "prompt_count":
        write_latents(bad, torch.randn(2, 4, 7, 4, 4), prompts=["one"])
    elif kind == "prompts_not_strings":
        write_latents(bad, torch.randn(2, 4, 7, 4, 4), prompts=[1, 2])
    elif kind == "clip_shape":
        write_latents(bad, torch.randn(2, 4, 5, 4, 4))
    elif kind == "channels":
        shutil.rmtree(folder)
        folder.mkdir()
        write_latents(folder / "a.safetensors", torch.randn(2, 16, 7, 4, 4))
    elif kind == "integers":
        write_latents(bad, torch.zeros(2, 4, 7, 4, 4, dtype=torch.int64))
    return folder


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", ["missing"]),
        ("a_file", ["is a file"]),
        ("empty", ["holds no latent videos"]),
        ("garbage", ["b.safetensors", "not a readable safetensors"]),
        ("truncated", ["b.safetensors", "not a readable safetensors"]),
        ("no_latents", ["b.safetensors", "'latents' tensor"]),
        ("no_prompts", ["b.safetensors", "'prompts' metadata"]),
        ("prompt_count", ["b.safetensors", "2 latent videos but 1 prompts"]),
        ("prompts_not_strings", ["b.safetensors", "not all strings"]),
        ("clip_shape", ["b.safetensors", "(2, 4, 5, 4, 4)", "--frames 5"]),
        ("channels", ["16 channels", "the network 4"]),
        ("integers", ["b.safetensors", "I64"]),
    ],
)
def test_bad_data_is_named(tmp_path, capsys, kind, words):
    data = make_data(kind, tmp_path)
    out = tmp_path / "run"
    code, err = run([*TINY, "--data", str(data), "--max_steps", "2", "--out_dir", str(out)], capsys)
    assert_clean_error(code, err, "--data", *words)
    assert not out.exists()


def test_sft_without_data_is_refused_at_full_size(tmp_path, capsys):
    code, err = run(["--method", "sft", "--out_dir", str(tmp_path / "run")], capsys)
    assert_clean_error(code, err, "--data", "latent videos")
    assert not (tmp_path / "run").exists()


def test_self_forcing_gan_without_data_is_refused_at_full_size(tmp_path, capsys):
    """The preset's GAN heads need real clips: without --data, one line that offers --gan_weight 0."""
    code, err = run(["--preset", "self-forcing-wan1.3b", "--prompts", "p.txt", "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_clean_error(code, err, "--gan_weight", "--data DIR", "--gan_weight 0")
    assert not (tmp_path / "run").exists()


KD = ["--tiny", "--method", "kd", "--num_threads", "1", "--sample_every", "0", "--num_pairs", "2", "--micro_batch", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def kd_pairs(tmp_path_factory):
    """A --pairs directory of one shard written by a kd run; tests copy it."""
    root = tmp_path_factory.mktemp("kd")
    assert run([*KD, "--max_steps", "0", "--pairs", str(root / "pairs"), "--out_dir", str(root / "run")])[0] == 0
    return root / "pairs"


@pytest.mark.parametrize("kind", ["a_file", "bad_index", "other_settings", "bad_shard"])
def test_bad_pairs_directories_are_named(kd_pairs, tmp_path, capsys, kind):
    """kd's --pairs: a file, an unreadable pairs.json, pairs of other teacher settings, a corrupt finished shard.
    Refused before the run directory is claimed; the pairs are left as they were."""
    pairs = tmp_path / "pairs"
    if kind == "a_file":
        pairs.write_text("not a folder")
    else:
        shutil.copytree(kd_pairs, pairs)
    if kind == "bad_index":
        (pairs / "pairs.json").write_text("{not json")
    if kind == "bad_shard":
        (pairs / "pairs_00000000.safetensors").write_bytes(b"half a shard")
    before = snapshot(tmp_path)
    flags = ["--guidance", "2"] if kind == "other_settings" else []
    code, err = run([*KD, *flags, "--max_steps", "1", "--pairs", str(pairs), "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    words = {"a_file": ["is a file"], "bad_index": ["pairs.json"], "other_settings": ["other settings", "guidance"], "bad_shard": ["pairs_00000000.safetensors", "delete"]}  # fmt: skip
    assert_clean_error(code, err, "--pairs", *words[kind])
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_an_embedding_cache_that_is_a_file_is_refused(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("keep me")
    code, err = run([*TINY, "--embed_cache", str(cache), "--out_dir", str(tmp_path / "run")], capsys)
    assert_clean_error(code, err, "--embed_cache")
    assert cache.read_text() == "keep me" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["missing", "garbage", "other_architecture", "nonfinite"])
def test_bad_student_init_is_named(tmp_path, capsys, kind):
    """A misspelt path is refused before the run directory is claimed; a file is read (and refused) after."""
    path = tmp_path / "init.safetensors"
    state = twc.wan.WanModel(twc.wan.CONFIGS["tiny"]).state_dict()
    if kind == "garbage":
        path.write_bytes(b"garbage")
    elif kind == "other_architecture":
        save_file({k: v for k, v in list(state.items())[:-1]}, str(path))
    elif kind == "nonfinite":
        state["proj_out.bias"][0] = float("inf")
        save_file(state, str(path))
    argv = [*TINY, "--method", "self_forcing", "--student_init", str(path), "--max_steps", "1", "--out_dir", str(tmp_path / "run")]  # fmt: skip
    code, err = run(argv, capsys)
    assert_clean_error(code, err, "--student_init", "init.safetensors", *(["proj_out.bias"] if kind == "nonfinite" else []))  # fmt: skip
    assert kind != "missing" or not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    code, err = run([*TINY, "--max_steps", "1", "--out_dir", str(target)], capsys)
    assert_clean_error(code, err, "is a file", "--out_dir")
    assert target.read_text() == "keep me"


def test_a_missing_teacher_is_one_line_from_the_command_line(tmp_path):
    """The one subprocess: exit code 2 and no traceback as the user sees them (full size, the teacher a path that
    does not exist: refused before the run directory is claimed)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n")
    code, err = run_subprocess("--method", "self_forcing", "--teacher", str(tmp_path / "wan.safetensors"), "--prompts", str(prompts), "--out_dir", str(tmp_path / "run"))  # fmt: skip
    assert_clean_error(code, err, "--teacher", "wan.safetensors", "download.py")
    assert not (tmp_path / "run").exists()


def test_a_teacher_that_is_not_a_wan_checkpoint_is_one_line(tmp_path, capsys):
    """A file that exists but is not a Wan checkpoint (a tiny run reads a .safetensors teacher at the tiny size)."""
    teacher = tmp_path / "wan.safetensors"
    save_file({"weight": torch.zeros(2)}, str(teacher))
    code, err = run([*TINY, "--method", "self_forcing", "--teacher", str(teacher), "--out_dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_clean_error(code, err, "--teacher", "wan.safetensors", "does not match")
