"""Bad input to sample.py, download.py and the model files' loaders (issue 14; the training scripts have their own
tests/test_bad_input.py): each case ends with one line `error: ...` on stderr that names the problem and the file or
flag, exit code 2, no traceback, and nothing on disk changed. Most cases call `main` in-process (sample.py imports
every model file; a subprocess per case would cost seconds each); two run the real command line."""

import os
import pickle
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_download import EDM_DEST, EDM_NAME, EDM_PKL, server  # noqa: F401  (the local HTTP server fixture)

import download
import sample
from models import (
    autoencoder_kl,
    cogvideox,
    cogvideox_vae,
    cosmos_predict2,
    dit,
    edm,
    edm2,
    flux,
    inception,
    sd15,
    sdxl,
    wan,
    wan_vae,
)

ROOT = Path(__file__).resolve().parents[1]


def files(folder):
    """Every file under `folder` with its bytes: what 'nothing on disk changed' compares."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, main, argv):
    """Run `main(argv)`, which must end with exit code 2; returns its stderr, which must be one `error:` line (tqdm
    bars aside) and no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return err[err.index("error: ") :]


def tiny_checkpoint(path, module=edm, config="tiny", edit=None, metadata=None):
    """A tiny network's weights as train_edm.py writes them (its Config in the metadata); `edit(state)` spoils them."""
    torch.manual_seed(0)
    cfg = module.CONFIGS[config]
    net = edm.EDMPrecond(cfg) if module is edm else edm2.EDM2Precond(cfg)
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    if edit:
        edit(state)
    save_file(state, str(path), metadata=metadata or {"config": module.config_to_json(cfg)})
    return path


def damaged(path, how):
    """A copy of a good checkpoint, spoilt the ways a disk, a copy or a hand can spoil it."""
    good = tiny_checkpoint(path.with_name("good.safetensors")).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    if how == "truncated":
        body = good[: len(good) - 100]
    elif how == "empty":
        body = b""
    elif how == "corrupt":
        body = bytes(range(256)) * 4
    else:  # "bad offset": a header whose first tensor claims bytes far past the end of the file
        header = good[8 : 8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9999999,', 1)
        assert header != good[8 : 8 + n]
        body = good[:8] + header + good[8 + n :]
    path.write_bytes(body)
    return path


def sample_argv(ckpt, out, *flags):
    return ["--model", "edm", "--ckpt", str(ckpt), "--out_dir", str(out), "--sampler", "student", "--n", "1", "--device", "cpu", *flags]  # fmt: skip


# -----------------------------------------------------------------------------
# sample.py and the loaders: damaged files, NaN weights, another family's file


@pytest.mark.parametrize("how", ["truncated", "empty", "corrupt", "bad offset"])
def test_sample_names_a_damaged_checkpoint(how, tmp_path, capsys):
    ckpt = damaged(tmp_path / "student.safetensors", how)
    before = files(tmp_path)
    err = refused(capsys, sample.main, sample_argv(ckpt, tmp_path / "out"))
    assert f"{ckpt} is not a readable safetensors file" in err and "(--ckpt)" in err and "again" in err
    assert files(tmp_path) == before  # no out_dir, the file as it was


@pytest.mark.parametrize(
    "read",
    [
        lambda p: edm._read_safetensors(p),  # edm2's is a checked copy (tests/test_hygiene.py)
        lambda p: autoencoder_kl._read_safetensors(p),  # and cogvideox's, cogvideox_vae's, cosmos', sd15's, ...
        lambda p: flux._read_safetensors(p),
        lambda p: dit.read_state_dict(p),
        lambda p: inception.from_pretrained(p),
    ],
    ids=["edm", "autoencoder_kl", "flux", "dit", "inception"],
)
def test_loaders_name_a_damaged_file(read, tmp_path):
    for how in ("truncated", "bad offset"):
        path = str(damaged(tmp_path / f"{how}.safetensors", how))
        with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file .*truncated or damaged"):
            read(path)
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(ValueError, match="folder.safetensors is not a readable safetensors file"):
        read(str(tmp_path / "folder.safetensors"))


def spoil(state):
    """NaN in one weight, Inf in another: what a diverged run saves."""
    state["model.enc.8x8_conv.weight"][0, 0, 0, 0] = float("nan")
    state["model.dec.8x8_aux_conv.bias"][0] = float("inf")


def test_sample_refuses_non_finite_weights(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "student.safetensors", edit=spoil)
    before = files(tmp_path)
    err = refused(capsys, sample.main, sample_argv(ckpt, tmp_path / "out"))
    n = len(edm.EDMPrecond(edm.CONFIGS["tiny"]).state_dict())
    assert f"NaN or Inf in 2 of {n} tensors ({ckpt}: model.dec.8x8_aux_conv.bias, model.enc.8x8_conv.weight)" in err
    assert "load an earlier checkpoint" in err
    assert files(tmp_path) == before  # no all-black samples.png


def test_loaders_refuse_non_finite_weights(tmp_path):
    """check_keys (one function, copied into every model file) lists the first five tensors and counts the rest."""

    def many(state):
        for k in sorted(state)[:7]:
            state[k].view(-1)[0] = float("nan")

    path = str(tiny_checkpoint(tmp_path / "nan.safetensors", edit=many))
    with torch.device("meta"):
        model = edm.EDMPrecond(edm.CONFIGS["tiny"])
    with pytest.raises(ValueError, match=rf"NaN or Inf in 7 of \d+ tensors \({path}: .+, .+, .+, .+, .+ and 2 more\)"):
        edm.load_checkpoint(model, path)
    with pytest.raises(ValueError, match="NaN or Inf in 2 of"):
        edm.from_pretrained(str(tiny_checkpoint(tmp_path / "two.safetensors", edit=spoil)))


@pytest.mark.parametrize("metadata", ["config", "name"])
def test_edm2_file_given_to_edm_names_its_family(metadata, tmp_path, capsys):
    """A train_edm.py checkpoint (its Config) or a download.py conversion (its CONFIGS name) of EDM2, sampled with
    --model edm: the message names the family and the --model to use."""
    meta = {"config": edm2.config_to_json(edm2.CONFIGS["tiny"])} if metadata == "config" else {"name": "edm2-img64-s-fid"}  # fmt: skip
    ckpt = tiny_checkpoint(tmp_path / "net.safetensors", module=edm2, metadata=meta)
    before = files(tmp_path)
    err = refused(capsys, sample.main, sample_argv(ckpt, tmp_path / "out"))
    assert f"{ckpt} holds a checkpoint of edm2, not edm (--model): sample it with --model edm2" in err
    assert files(tmp_path) == before


def test_sample_prompt_file_missing_or_binary(tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(128, 256)))
    for path in (tmp_path / "missing.txt", binary):
        argv = ["--model", "flux", "--tiny", "--prompt_file", str(path), "--device", "cpu", "--out_dir", str(tmp_path / "out")]  # fmt: skip
        err = refused(capsys, sample.main, argv)
        assert f"cannot read {path} as text" in err and "(--prompt_file): give a UTF-8 file of prompts" in err
    assert files(tmp_path) == {"prompts.txt": bytes(range(128, 256))}


# -----------------------------------------------------------------------------
# The nine model files that fetch from the Hub: say why a repo could not be fetched, as it is


def unreachable(*args, **kwargs):
    """snapshot_download / hf_hub_download without a network: what huggingface_hub raises."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")
    except ConnectionError as cause:
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from cause


HUB_FOLDERS = {  # the nine copies of the message
    "autoencoder_kl": lambda: autoencoder_kl._hub_folder("org/repo", "vae"),
    "cogvideox": lambda: cogvideox._hub_folder("org/repo", "transformer"),
    "cogvideox_vae": lambda: cogvideox_vae._hub_folder("org/repo", "vae"),
    "cosmos_predict2": lambda: cosmos_predict2._hub("org/repo", "model.pt"),
    "flux": lambda: flux._hub_folder("org/repo", "transformer"),
    "sd15": lambda: sd15._hub_folder("org/repo", "unet"),
    "sdxl": lambda: sdxl._hub_folder("org/repo", "unet"),
    "wan": lambda: wan._hub_folder("org/repo", "transformer"),
    "wan_vae": lambda: wan_vae._hub_folder("org/repo", "vae"),
}


@pytest.fixture
def no_hub(monkeypatch):
    """No network, no token, neither offline switch set; each test sets the ones it wants."""
    import huggingface_hub
    from huggingface_hub import constants

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, unreachable)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("LOCAL_FILES_ONLY", raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", sorted(HUB_FOLDERS))
def test_model_files_say_why_the_hub_was_not_reached(name, no_hub):
    from huggingface_hub import constants

    with pytest.raises(FileNotFoundError) as info:
        HUB_FOLDERS[name]()
    message = str(info.value)
    assert "the Hugging Face Hub could not be reached (no network?)" in message and "hf download org/repo" in message
    assert "HF_HUB_OFFLINE" not in message and "LOCAL_FILES_ONLY" not in message and "HF_TOKEN" in message

    no_hub.setenv("LOCAL_FILES_ONLY", "true")
    with pytest.raises(FileNotFoundError, match=r"downloads are off \(LOCAL_FILES_ONLY=true\)"):
        HUB_FOLDERS[name]()
    no_hub.delenv("LOCAL_FILES_ONLY")
    no_hub.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"downloads are off \(HF_HUB_OFFLINE=1\)"):
        HUB_FOLDERS[name]()


def test_sample_flux_offline_says_no_network(no_hub, tmp_path, capsys):
    err = refused(capsys, sample.main, ["--model", "flux", "--ckpt", "flux-dev", "--prompt", "a cat", "--device", "cpu", "--out_dir", str(tmp_path / "out")])  # fmt: skip
    assert "black-forest-labs/FLUX.1-dev is not in the Hugging Face cache (HF_HOME)" in err
    assert "could not be reached (no network?)" in err and "HF_HUB_OFFLINE" not in err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# download.py convert: folders, self-referencing and size-bomb pickles


def test_convert_a_folder(tmp_path, capsys):
    (tmp_path / "snapshots").mkdir()
    err = refused(capsys, download.main, ["convert", str(tmp_path / "snapshots"), str(tmp_path / "net.safetensors")])
    assert f"{tmp_path / 'snapshots'} is a folder (convert PICKLE): give the EDM/EDM2 network pickle file" in err
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "net.pkl").write_bytes(EDM_PKL)
    err = refused(capsys, download.main, ["convert", str(tmp_path / "net.pkl"), str(out)])
    assert f"{out} is a folder (convert PICKLE OUT.safetensors)" in err
    assert sorted(files(tmp_path)) == ["net.pkl"]


def test_convert_a_self_referencing_pickle(tmp_path, capsys):
    """A network whose child module is itself: the module walk would recurse until Python's limit."""
    net = torch.nn.ModuleDict()
    net._modules["a"] = net
    path = tmp_path / "loop.pkl"
    path.write_bytes(pickle.dumps({"ema": net}))
    before = files(tmp_path)
    err = refused(capsys, download.main, ["convert", str(path), str(tmp_path / "out.safetensors")])
    assert f"{path}: modules nested more than 64 deep" in err and "self-referencing" in err
    assert files(tmp_path) == before


@pytest.mark.parametrize("elements", [2**28, 2**40])  # 1 GiB, and far more than any memory
def test_convert_a_size_bomb(elements, tmp_path, capsys):
    """A few hundred bytes of pickle whose one tensor is a stride-0 view of a 4-byte storage: written out it would be
    `elements` floats. Refused before anything expands."""
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps({"w": torch.zeros(1).expand(elements)}))
    assert path.stat().st_size < 1000
    before = files(tmp_path)
    err = refused(capsys, download.main, ["convert", str(path), str(tmp_path / "out.safetensors")])
    assert f"{path} declares {4 * elements:,} bytes of tensors but holds only 4 bytes of storage" in err
    assert files(tmp_path) == before


# -----------------------------------------------------------------------------
# download.py NAME: --root, the recorded digest, the wrong network, a changed file, no network


@pytest.fixture
def tiny_edm(monkeypatch):
    """EDM_NAME's architecture is the tiny network of tests/fixtures/pickle_edm_tiny.pkl (as in test_download.py)."""
    tiny = replace(edm.CONFIGS[EDM_NAME], img_resolution=8, model_channels=4, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,))  # fmt: skip
    monkeypatch.setitem(edm.CONFIGS, EDM_NAME, tiny)


def test_root_that_is_a_file_or_unwritable(tmp_path, capsys):
    root = tmp_path / "root"
    root.write_text("not a folder")
    err = refused(capsys, download.main, [EDM_NAME, "--root", str(root), "--url", "http://127.0.0.1:9/x.pkl"])
    assert f"{root} is a file, not a folder (--root {root})" in err
    assert files(tmp_path) == {"root": b"not a folder"}
    if os.geteuid() == 0:  # permissions do not stop root; sysfs refuses new folders to everyone
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no sysfs to stand for an unwritable folder")
        locked = Path("/sys/kernel/nanofastgen-test")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        locked = tmp_path / "locked" / "root"
    err = refused(capsys, download.main, [EDM_NAME, "--root", str(locked), "--url", "http://127.0.0.1:9/x.pkl"])
    assert "(--root " in err and "give a folder you can write to" in err and not locked.exists()


def test_empty_recorded_digest(server, tmp_path, capsys):  # noqa: F811
    server.files["/edm.pkl"] = EDM_PKL
    recorded = tmp_path / f"{EDM_DEST}.sha256"
    recorded.parent.mkdir(parents=True)
    recorded.write_text("")
    err = refused(capsys, download.main, [EDM_NAME, "--root", str(tmp_path), "--url", server.url + "/edm.pkl"])
    assert f"the recorded digest is empty ({recorded}): delete the file" in err and "--sha256 HEX" in err
    assert files(tmp_path) == {str(EDM_DEST) + ".sha256": b""} and server.ranges == []  # nothing fetched


def test_unrelated_state_dict_under_an_edm_name(server, tmp_path, capsys, tiny_edm):  # noqa: F811
    """A pickled state dict that is not the named network: refused before its digest is recorded, and deleted."""
    body = pickle.dumps({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.ones(3)})
    server.files["/other.pkl"] = body
    err = refused(capsys, download.main, [EDM_NAME, "--root", str(tmp_path), "--url", server.url + "/other.pkl"])
    assert f"other.pkl.part is not the {EDM_NAME} network" in err and "does not match the model" in err
    assert "missing:    model." in err and "The download was deleted" in err
    assert files(tmp_path) == {}  # no output, no .sha256, no .part
    assert not (tmp_path / EDM_DEST.parent).exists()  # nor the folder the download made


def test_changed_remote_file_restarts(server, tmp_path, monkeypatch):  # noqa: F811
    """A partial download of one version of a file is not continued with bytes of another: a different size (also
    one smaller than the partial file, which the server answers with 416), or the same size with another ETag, starts
    the download over."""
    monkeypatch.setattr(download, "RETRIES", 0)
    old, new = EDM_PKL, EDM_PKL[::-1] + b"more"
    part = tmp_path / "edm.pkl.part"
    cases = {"size": (new, None), "shrunk": (old[:5000], None), "etag": (old[::-1], '"v2"')}  # shrunk: HTTP 416
    for changed, (body, etag) in cases.items():
        server.files["/edm.pkl"], server.etags["/edm.pkl"] = old, '"v1"'
        server.cut_after, server.ranges = 10_000, []
        with pytest.raises(download.DownloadError, match="partial download .* is kept"):
            download.http_download(server.url + "/edm.pkl", part)
        assert part.stat().st_size == 10_000
        server.files["/edm.pkl"], server.etags["/edm.pkl"] = body, etag or '"v1"'
        download.http_download(server.url + "/edm.pkl", part)
        assert server.ranges[1:] == ["bytes=10000-", None], changed  # asked to resume, saw the change, started over
        assert part.read_bytes() == body, changed
        download.discard_part(part)
    # Unchanged: resumed, not restarted.
    server.files["/edm.pkl"], server.cut_after, server.ranges = old, 10_000, []
    with pytest.raises(download.DownloadError):
        download.http_download(server.url + "/edm.pkl", part)
    download.http_download(server.url + "/edm.pkl", part)
    assert server.ranges == [None, "bytes=10000-"] and part.read_bytes() == old


def test_no_network(tmp_path, monkeypatch, capsys, tiny_edm):
    """Nothing listens on the port: the retries are announced once, the error says it is the network and names
    --url, claims no partial download, and leaves no folder behind."""
    monkeypatch.setattr(download, "RETRIES", 3)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0)
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/edm.pkl"
    err = refused(capsys, download.main, [EDM_NAME, "--root", str(tmp_path / "root"), "--url", url])
    assert err.count("error: ") == 1
    assert f"network failure, 127.0.0.1 refused the connection, after 4 attempts ({url})" in err
    assert "--url URL" in err and ".part" not in err
    assert not (tmp_path / "root").exists()  # the folders made for the download are gone


def test_no_network_retries_are_announced_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "RETRIES", 3)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0)
    with pytest.raises(download.DownloadError):
        download.http_download("http://127.0.0.1:9/edm.pkl", tmp_path / "edm.pkl.part")
    err = capsys.readouterr().err
    assert err.count("retrying") == 1 and "retrying up to 3 times" in err
    assert not list(tmp_path.iterdir())  # no empty .part, no record


def test_hub_offline_messages(no_hub, tmp_path, capsys):
    """download.py NAME for a Hub repo without a network: it says so (not HF_HUB_OFFLINE, which is not set), and
    for flux-dev, gated and with 19 file patterns, gives a short line with the command to rerun."""
    err = refused(capsys, download.main, ["flux-dev"])
    line = err.splitlines()[0]
    assert len(line) < 500 and "--include" not in line, line
    assert "black-forest-labs/FLUX.1-dev is not downloaded and the Hugging Face Hub could not be reached" in line
    assert "python download.py flux-dev" in line and "it is gated" in line and "HF_TOKEN" in line
    assert "HF_HUB_OFFLINE" not in line and "LOCAL_FILES_ONLY" not in line
    no_hub.setenv("LOCAL_FILES_ONLY", "true")
    err = refused(capsys, download.main, ["sd-vae-ft-mse"])
    assert "downloads are off (LOCAL_FILES_ONLY set)" in err and "without LOCAL_FILES_ONLY" in err


# -----------------------------------------------------------------------------
# The real command lines: exit code 2 and no traceback


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_command_lines_exit_2_without_traceback(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "student.safetensors", edit=spoil)
    bomb = tmp_path / "bomb.pkl"
    bomb.write_bytes(pickle.dumps({"w": torch.zeros(1).expand(2**28)}))
    before = files(tmp_path)
    for args, message in (
        (["sample.py", *sample_argv(ckpt, tmp_path / "out")], "NaN or Inf in 2 of"),
        (["download.py", "convert", str(bomb), str(tmp_path / "out.safetensors")], "refusing to expand it"),
    ):
        result = run(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr
    assert files(tmp_path) == before
