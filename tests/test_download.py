"""download.py: safe pickle conversion, resumable verified downloads, the CIFAR-10 zip, Hub errors.

The tiny EDM/EDM2 pickles in tests/fixtures come from tests/generate/make_pickle_fixtures.py (the official
code, pickled as its training loops do); the HTTP tests talk to a server started here on 127.0.0.1.
"""

import hashlib
import http.server
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

import download  # noqa: E402


def expected_state(name):
    """The fixture's state_dict, in its original order (safetensors itself does not keep order)."""
    with safe_open(FIXTURES / f"{name}_expected.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in json.loads(f.metadata()["key_order"])}


def assert_same_state(got, want):
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t), k


def assert_written(path, name):
    """A written safetensors file holds the fixture's tensors (its key order is the format's, not ours)."""
    written, want = load_file(path), expected_state(name)
    assert set(written) == set(want)
    assert_same_state({k: written[k] for k in want}, want)


# -----------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize(
    "name, prefixes",
    [("pickle_edm_tiny", {"model"}), ("pickle_edm2_tiny", {"unet", "logvar_fourier", "logvar_linear"})],
)
def test_conversion_equals_state_dict(name, prefixes, tmp_path):
    want = expected_state(name)
    assert {k.split(".")[0] for k in want} == prefixes
    assert_same_state(download.pickle_to_state_dict(FIXTURES / f"{name}.pkl"), want)

    out = tmp_path / "out.safetensors"
    download.convert_pickle(FIXTURES / f"{name}.pkl", out, source="https://example.org/x.pkl")
    assert_written(out, name)
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"source": "https://example.org/x.pkl", "format": "pt"}


def test_edm2_gains_become_shape_1():
    state = download.pickle_to_state_dict(FIXTURES / "pickle_edm2_tiny.pkl")
    gains = [k for k in state if k.endswith("_gain")]
    assert "unet.out_gain" in gains and all(state[k].shape == (1,) for k in gains)


class Payload:
    """Unpickling this calls `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker):
    touch = ["touch", str(marker)]
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": Payload(subprocess.call, touch),
        "subprocess.Popen": Payload(subprocess.Popen, touch),
        # Hidden where a network would be, next to harmless entries.
        "nested in ema": {"ema": Payload(os.system, f"touch {marker}"), "loss_fn": None},
    }


@pytest.mark.parametrize("kind", list(payloads("x")))
def test_malicious_pickle_is_refused(kind, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payloads(marker)[kind]))
    with pytest.raises(
        download.UnsafePickleError,
        match=r"refusing global '.+' in evil\.pkl; this file is not a plain EDM/EDM2 checkpoint",
    ):
        download.pickle_to_state_dict(path)
    assert not marker.exists()


def test_malicious_storage_blob_is_refused(tmp_path):
    """The inner torch.save blob that `_load_from_bytes` receives is unpickled under the same rules."""
    marker = tmp_path / "pwned"
    blob = b"".join(
        pickle.dumps(x, protocol=2) for x in (download.LEGACY_MAGIC, download.LEGACY_PROTOCOL, {"little_endian": True})
    )
    blob += pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Payload(torch.storage._load_from_bytes, blob)}))
    with pytest.raises(download.UnsafePickleError, match="refusing global"):
        download.pickle_to_state_dict(path)
    assert not marker.exists()


def run_cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, str(ROOT / "download.py"), *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_convert_cli_refuses_and_writes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}")))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("convert", str(path), str(out_dir / "net.safetensors"))
    assert result.returncode != 0
    assert "refusing global" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and list(out_dir.iterdir()) == []


# -----------------------------------------------------------------------------
# HTTP: a local server that can cut the connection, ignore Range, and records what it was asked.


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` (path -> bytes) with Range requests, and an ETag where `server.etags` gives one."""

    timeout = 10  # seconds a connection may idle; keeps a broken client from hanging the test

    def do_GET(self):
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and srv.honor_range:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if srv.etags.get(self.path):
            self.send_header("ETag", srv.etags[self.path])
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        data = body[start:]
        if srv.cut_after is not None:  # once: send part of the body, then drop the connection
            data, srv.cut_after = data[: srv.cut_after], None
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_S", 10)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.ranges, srv.cut_after, srv.honor_range, srv.etags = {}, [], None, True, {}
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


EDM_PKL = (FIXTURES / "pickle_edm_tiny.pkl").read_bytes()
EDM_NAME = "edm-cifar10-32x32-cond-vp"  # no published digest: the download's digest gets recorded
EDM_DEST = Path(download.CHECKPOINTS[EDM_NAME].dest)


@pytest.fixture(autouse=True)
def tiny_edm_release(monkeypatch):
    """Stand the tiny network of pickle_edm_tiny.pkl in for EDM_NAME's architecture: a download's keys and shapes are
    checked against its name's network."""
    from dataclasses import replace

    from models import edm

    tiny = replace(edm.CONFIGS[EDM_NAME], img_resolution=8, model_channels=4, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,))  # fmt: skip
    monkeypatch.setitem(edm.CONFIGS, EDM_NAME, tiny)


def test_download_and_convert_cli(server, tmp_path, capsys):
    server.files["/edm.pkl"] = EDM_PKL
    download.main([EDM_NAME, "--root", str(tmp_path), "--url", server.url + "/edm.pkl"])
    dest = tmp_path / EDM_DEST
    assert_written(dest, "pickle_edm_tiny")
    digest = hashlib.sha256(EDM_PKL).hexdigest()
    assert digest in capsys.readouterr().out
    assert Path(f"{dest}.sha256").read_text() == f"{digest}  edm.pkl\n"
    # No .part and no temporary files left behind.
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([dest.name, f"{dest.name}.sha256"])


def test_existing_output_is_skipped_unless_forced(server, tmp_path):
    server.files["/edm.pkl"] = EDM_PKL
    dest = tmp_path / EDM_DEST
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old")
    download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl")
    assert dest.read_bytes() == b"old" and server.ranges == []
    download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl", force=True)
    assert_written(dest, "pickle_edm_tiny")


def test_resume_after_cut_connection(server, tmp_path):
    server.files["/edm.pkl"] = EDM_PKL
    server.cut_after = 10_000
    download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl", sha256=hashlib.sha256(EDM_PKL).hexdigest())
    assert server.ranges == [None, "bytes=10000-"]
    assert_written(tmp_path / EDM_DEST, "pickle_edm_tiny")


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    server.files["/edm.pkl"] = EDM_PKL
    server.honor_range = False
    part = tmp_path / EDM_DEST.parent / "edm.pkl.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 5000)  # a stale partial file that must not end up in the result
    download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl", sha256=hashlib.sha256(EDM_PKL).hexdigest())
    assert server.ranges == ["bytes=5000-"]
    assert_written(tmp_path / EDM_DEST, "pickle_edm_tiny")


def test_complete_partial_file_is_not_downloaded_again(server, tmp_path):
    server.files["/edm.pkl"] = EDM_PKL
    part = tmp_path / EDM_DEST.parent / "edm.pkl.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(EDM_PKL)
    download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl", sha256=hashlib.sha256(EDM_PKL).hexdigest())
    assert server.ranges == [f"bytes={len(EDM_PKL)}-"]  # answered 416: nothing left to send
    assert (tmp_path / EDM_DEST).exists() and not part.exists()


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.files["/edm.pkl"] = EDM_PKL
    wrong = "0" * 64
    with pytest.raises(download.ChecksumError) as info:
        download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl", sha256=wrong)
    message = str(info.value)
    assert wrong in message and hashlib.sha256(EDM_PKL).hexdigest() in message and "--force" in message
    assert not (tmp_path / EDM_DEST.parent).exists()  # nor the folder the download made


def test_recorded_digest_checks_later_downloads(server, tmp_path):
    server.files["/edm.pkl"] = EDM_PKL
    download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl")
    server.files["/edm.pkl"] = (FIXTURES / "pickle_edm2_tiny.pkl").read_bytes()  # the "same" file, changed
    with pytest.raises(download.ChecksumError, match=hashlib.sha256(EDM_PKL).hexdigest()):
        download.fetch(EDM_NAME, tmp_path, url=server.url + "/edm.pkl", force=True)
    assert_written(tmp_path / EDM_DEST, "pickle_edm_tiny")  # the earlier output is intact


def test_http_error_is_clear(server, tmp_path):
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        download.fetch(EDM_NAME, tmp_path, url=server.url + "/missing.pkl")


def test_list_prints_every_name(capsys):
    download.main(["--list"])
    out = capsys.readouterr().out
    for name, entry in download.CHECKPOINTS.items():
        assert name in out and entry.url in out and entry.dest in out
    for name, entry in download.HUB.items():
        assert name in out and entry.repo in out


# -----------------------------------------------------------------------------
# CIFAR-10


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote its str (BINSTRING), as in the real cifar-10-python.tar.gz batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        header = (
            pickle.SHORT_BINSTRING + bytes([len(obj)])
            if len(obj) < 256
            else pickle.BINSTRING + struct.pack("<i", len(obj))
        )
        self.write(header + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def fake_cifar_tarball(path, per_batch=2):
    rng = np.random.default_rng(0)
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            batch_labels = [int(y) for y in rng.integers(0, 10, size=per_batch)]
            batch = {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": batch_labels,
                b"data": data,
                b"filenames": [b"x.png"] * per_batch,
            }
            buf = io.BytesIO()
            Py2Pickler(buf, protocol=2).dump(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += batch_labels
    return np.concatenate(images), labels


def test_cifar10_zip(server, tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    images, labels = fake_cifar_tarball(tarball)
    server.files["/cifar-10-python.tar.gz"] = tarball.read_bytes()
    root = tmp_path / "root"
    dest = download.fetch(
        "cifar10",
        root,
        url=server.url + "/cifar-10-python.tar.gz",
        sha256=hashlib.sha256(tarball.read_bytes()).hexdigest(),
    )
    assert dest == root / "cifar10" / "cifar10-32x32.zip"
    names = [f"00000/img{i:08d}.png" for i in range(10)]
    with zipfile.ZipFile(dest) as zf:
        assert sorted(zf.namelist()) == sorted(names + ["dataset.json"])
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        assert json.loads(zf.read("dataset.json")) == {"labels": [[n, y] for n, y in zip(names, labels)]}
        for n, img in zip(names, images):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(zf.read(n)))), img)
    assert list(dest.parent.iterdir()) == [dest]  # the tarball's .part is gone


def test_cifar10_batches_only_allow_numpy(tmp_path):
    marker = tmp_path / "pwned"
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        blob = pickle.dumps(Payload(os.system, f"touch {marker}"))
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(download.UnsafePickleError, match="refusing global"):
        download.cifar10_to_zip(tarball, tmp_path / "out.zip")
    assert not marker.exists() and not (tmp_path / "out.zip").exists()


# -----------------------------------------------------------------------------
# Hugging Face Hub


def test_hub_offline_missing_and_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("LOCAL_FILES_ONLY", "true")
    with pytest.raises(download.HubError) as info:
        download.hub_download("org/tiny", ["*.safetensors"])
    message = str(info.value)
    assert (
        "org/tiny" in message
        and str(tmp_path) in message
        and "hf download org/tiny --include '*.safetensors'" in message
    )

    commit = "a" * 40
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes(b"")
    assert Path(download.hub_download("org/tiny", ["*.safetensors"])) == repo / "snapshots" / commit


def test_hub_gated_repo_message(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/gated"))
        raise GatedRepoError("Access to model org/gated is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(
        download.HubError,
        match=r"org/gated is gated: accept its licence on https://huggingface.co/org/gated .*HF_TOKEN",
    ):
        download.hub_download("org/gated", ["*.json"])


# -----------------------------------------------------------------------------
# FID: the Inception weights, and reference statistics of a dataset


def inception_pth(weights_file, path):
    """A .pth as pytorch-fid publishes it: torch.save of the state dict (with the batch-norm counters)."""
    torch.save(load_file(weights_file), path)
    return path.read_bytes()


def test_inception_download_checks_the_prefix_and_converts(server, tmp_path, monkeypatch, inception_weights):
    from dataclasses import replace

    from models import inception

    body = inception_pth(inception_weights, tmp_path / "pt_inception.pth")
    digest = hashlib.sha256(body).hexdigest()
    # The real file's digest starts with 6726825d; this stand-in's with its own first 8 digits.
    monkeypatch.setitem(download.CHECKPOINTS, "inception", replace(download.CHECKPOINTS["inception"], sha256_prefix=digest[:8]))  # fmt: skip
    server.files["/pt_inception.pth"] = body
    root = tmp_path / "root"
    dest = download.fetch("inception", root, url=server.url + "/pt_inception.pth")
    assert dest == root / inception.FILE
    written, want = load_file(dest), load_file(inception_weights)
    assert set(written) == set(want) and all(torch.equal(written[k], want[k]) for k in want)
    assert Path(f"{dest}.sha256").read_text().split()[0] == digest  # the full digest, recorded for later downloads
    inception.from_pretrained(root=str(root))  # loads strictly


def test_inception_prefix_mismatch_leaves_nothing(server, tmp_path):
    server.files["/pt_inception.pth"] = b"not the weights"
    with pytest.raises(download.ChecksumError, match="expected 6726825d..."):
        download.fetch("inception", tmp_path, url=server.url + "/pt_inception.pth")
    assert not (tmp_path / "inception").exists()  # nor the folder the download made


def test_inception_conversion_runs_no_code_and_checks_keys(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": Payload(os.system, f"touch {marker}")}, evil)
    with pytest.raises(download.DownloadError, match="could not read"):
        download.convert_inception(evil, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, wrong)
    with pytest.raises(download.DownloadError, match=r"not the FID Inception network(.|\n)*missing:    Conv2d_1a_3x3"):
        download.convert_inception(wrong, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_fid_ref_of_a_folder_and_a_zip(tmp_path, inception_weights):
    from models import inception

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    images[2] = np.repeat(images[2][..., :1], 3, axis=-1)  # stored as a grey PNG below: read back as RGB
    folder, archive = tmp_path / "folder", tmp_path / "data.zip"
    (folder / "00000").mkdir(parents=True)
    (folder / "dataset.json").write_text("{}")  # not an image: ignored
    with zipfile.ZipFile(archive, "w") as zf:
        for i, img in enumerate(images):
            name = f"00000/img{i:08d}.png"
            Image.fromarray(img[..., 0] if i == 2 else img).save(folder / name)
            zf.write(folder / name, name)

    root = tmp_path / "root"
    for data in (folder, archive):
        result = run_cli("fid-ref", str(data), "--inception", str(inception_weights), "--root", str(root), "--batch", "2", "--device", "cpu")  # fmt: skip
        assert result.returncode == 0, result.stderr
    from_folder, from_zip = np.load(root / "fid-refs" / "folder.npz"), np.load(root / "fid-refs" / "data.npz")
    assert from_folder["mu"].shape == (2048,) and from_folder["sigma"].shape == (2048, 2048)
    assert from_folder["mu"].dtype == from_folder["sigma"].dtype == np.float64

    model = inception.from_pretrained(str(inception_weights))
    with torch.no_grad():
        features = model(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    mu, sigma = inception.feature_stats(features)
    for ref in (from_folder, from_zip):
        assert np.allclose(ref["mu"], mu.numpy(), rtol=1e-5, atol=1e-6)
        assert np.allclose(ref["sigma"], sigma.numpy(), rtol=1e-4, atol=1e-5 * np.abs(sigma.numpy()).max())
    assert sorted(p.name for p in (root / "fid-refs").iterdir()) == ["data.npz", "folder.npz"]  # no temporary files


def test_fid_ref_of_a_missing_dataset_names_the_download(tmp_path):
    result = run_cli("fid-ref", "cifar10", "--root", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "python download.py cifar10" in result.stderr


# -----------------------------------------------------------------------------
# DiT / SiT: released .pt state dicts, checked on arrival and kept as is


@pytest.fixture
def tiny_dit_release(monkeypatch):
    """Stand in the tiny DiT for DiT-XL-2-256x256 (same file name and place), so a download is a few kB."""
    from dataclasses import replace

    from models import dit

    name = "DiT-XL-2-256x256"
    monkeypatch.setitem(dit.CONFIGS, name, replace(dit.CONFIGS["tiny"], file=dit.CONFIGS[name].file))
    torch.manual_seed(0)
    return name, dit.DiT(dit.CONFIGS["tiny"]).state_dict()


def test_dit_download_is_checked_and_loads(server, tmp_path, tiny_dit_release):
    from models import dit

    name, state = tiny_dit_release
    buffer = io.BytesIO()
    torch.save(state, buffer)
    server.files["/DiT.pt"] = buffer.getvalue()
    root = tmp_path / "root"
    dest = download.fetch(name, root, url=server.url + "/DiT.pt")
    assert dest == root / "imagenet-256" / "DiT-XL-2-256x256.pt" and not list(dest.parent.glob("*.part"))
    assert Path(f"{dest}.sha256").read_text().split()[0] == hashlib.sha256(buffer.getvalue()).hexdigest()
    model = dit.from_pretrained(name, root=str(root))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_dit_download_refuses_code_and_wrong_keys(server, tmp_path, tiny_dit_release):
    name, state = tiny_dit_release
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"pos_embed": torch.zeros(1), "x": Payload(os.system, f"touch {marker}")}, evil)
    server.files["/evil.pt"] = evil.getvalue()
    with pytest.raises(download.UnsafePickleError, match="weights_only"):
        download.fetch(name, tmp_path, url=server.url + "/evil.pt")
    assert not marker.exists() and not (tmp_path / "imagenet-256").exists()  # refused part deleted, and its folder

    other = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k != "pos_embed"}, other)
    server.files["/other.pt"] = other.getvalue()
    with pytest.raises(download.DownloadError, match=r"is not DiT-XL-2-256x256(.|\n)*missing:    pos_embed"):
        download.fetch(name, tmp_path, url=server.url + "/other.pt")
    assert not (tmp_path / "imagenet-256" / "DiT-XL-2-256x256.pt").exists()


# -----------------------------------------------------------------------------
# Hub repos: only the files the models read


# Some of the files of the released repos (their Hub listings): weights in several formats and precisions, of which
# only the full-precision safetensors (one file or sharded) and each folder's configs may be fetched.
REPO_FILES = {
    "sd15": [
        "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "model_index.json", "safety_checker/model.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "scheduler/scheduler_config.json",
    ],
    "flux-dev": [
        "flux1-dev.safetensors", "ae.safetensors", "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors", "text_encoder_2/model.safetensors.index.json",
        "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/config.json", "tokenizer_2/spiece.model",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ],
}  # fmt: skip
WANTED = {
    "sd15": {
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
    },
    "flux-dev": set(REPO_FILES["flux-dev"]) - {"flux1-dev.safetensors", "ae.safetensors"},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REPO_FILES))
def test_hub_entries_fetch_only_what_the_models_read(name):
    from huggingface_hub.utils import filter_repo_objects

    chosen = set(filter_repo_objects(REPO_FILES[name], allow_patterns=list(download.HUB[name].patterns)))
    assert chosen == WANTED[name]


def test_hub_cli_passes_the_entry(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path))  # fmt: skip
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    download.main(["cosmos-predict2.5-2b", "--root", str(tmp_path / "ckpt")])
    repo, kw = calls[0]
    assert repo == "nvidia/Cosmos-Predict2.5-2B" and kw["local_dir"] == str(tmp_path / "ckpt" / "cosmos_predict2" / "Cosmos-Predict2.5-2B")  # fmt: skip
    download.main(["sd-vae-ft-mse"])
    assert calls[1][0] == "stabilityai/sd-vae-ft-mse" and calls[1][1]["local_dir"] is None  # the cache
    with pytest.raises(SystemExit):
        download.main(["sdxl", "--sha256", "00"])
    assert "--url, --sha256 and --force apply to direct downloads" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# video-latents: latent shards of a folder of videos, through the tiny VAEs of tests/fixtures as local folders.


def write_vae_folder(folder, fixture):
    with safe_open(str(FIXTURES / f"{fixture}.safetensors"), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(("input.", "output."))}
        config = f.metadata()["config"]
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(config)
    return str(folder)


def square_frames(height, width, reverse=False):
    """9 frames (H, W, 3) uint8 of a red square drifting over blue: a few flat colours, which a GIF keeps exactly."""
    frames = []
    for t in range(9):
        a = np.zeros((height, width, 3), np.uint8)
        a[..., 2] = 90
        a[10 + t : 30 + t, 5 + 2 * t : 25 + 2 * t] = (200, 60, 10)
        frames.append(a)
    return frames[::-1] if reverse else frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """clips/: a.gif (80 x 64, captioned), b/ (PNG frames 64 x 96, captioned), c.gif (a reversed, no caption); and the
    tiny Wan and CogVideoX VAEs as local folders."""
    root = tmp_path_factory.mktemp("videos")
    clips = root / "clips"
    (clips / "b").mkdir(parents=True)
    for name, reverse in (("a", False), ("c", True)):
        images = [Image.fromarray(f) for f in square_frames(64, 80, reverse)]
        images[0].save(clips / f"{name}.gif", save_all=True, append_images=images[1:], duration=40, loop=0)
    for t, frame in enumerate(square_frames(96, 64)):
        Image.fromarray(frame).save(clips / "b" / f"{t:03d}.png")
    (clips / "a.txt").write_text("a red square drifts\n")
    (clips / "b.txt").write_text("a red square, tall")
    return root, write_vae_folder(root / "wan_vae", "wan_vae_tiny"), write_vae_folder(root / "cog_vae", "cogvideox_vae_tiny")  # fmt: skip


def video_latents(root, vae, out, *flags):
    size = ["--frames", "9", "--height", "64", "--width", "64", "--shard_size", "2", "--device", "cpu"]
    download.main(["video-latents", str(root / "clips"), "--vae", vae, "--out", str(out), *size, *flags])


def expected_clips():
    """The three clips as the command should see them: the centre 64 x 64 of each frame, in [-1, 1]."""
    a, b = np.stack(square_frames(64, 80))[:, :, 8:72], np.stack(square_frames(96, 64))[:, 16:80]
    c = np.stack(square_frames(64, 80, reverse=True))[:, :, 8:72]
    return torch.from_numpy(np.stack([a, b, c])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def read_shard(path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("latents"), json.loads(f.metadata()["prompts"])


def train(script, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, script, "--tiny", "--method", "sft", "--max_steps", "2", "--save_every", "2", "--num_threads", "1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_video_latents_are_the_normalised_vae_means_and_train(videos, tmp_path):
    """Wan: shards of 2 clips with their captions, each clip the tiny VAE's posterior mean, normalised per channel;
    train_video.py and train_wan_causal.py train on them."""
    from models import wan_vae

    root, wan_dir, _ = videos
    out = tmp_path / "latents"
    video_latents(root, wan_dir, out, "--model", "wan")
    assert sorted(os.listdir(out)) == ["settings.json", "shard_00000.safetensors", "shard_00001.safetensors"]
    (l0, p0), (l1, p1) = read_shard(out / "shard_00000.safetensors"), read_shard(out / "shard_00001.safetensors")
    assert p0 == ["a red square drifts", "a red square, tall"] and p1 == [""]
    vae = wan_vae.from_pretrained(wan_dir)
    stats = [torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1, 1) for v in (vae.cfg.latents_mean, vae.cfg.latents_std)]  # fmt: skip
    with torch.no_grad():  # the same means here in one batch, in float32 and in float64
        mean32 = (vae.posterior(expected_clips(), chunked=False).mean - stats[0]) / stats[1]
        mean64 = (vae.double().posterior(expected_clips().double(), chunked=False).mean - stats[0]) / stats[1]
    assert l0.shape == (2, 4, 3, 8, 8)
    # The command encodes in float32, clip by clip and in chunks, so its sums run in another order than here: against
    # the float64 means, within 20x the float32 error of the one-batch float32 means (measured: theirs 2.4e-6, the
    # command's 2.9e-6; the command against the float32 means differed by 3.3e-6, a third of the former bound 1e-5).
    bound = 20 * (mean32 - mean64).abs().max()
    assert (torch.cat([l0, l1]) - mean64).abs().max() < bound
    train("train_video.py", "--model", "wan", "--data", str(out), "--eval_every", "0", "--out_dir", str(tmp_path / "video"))  # fmt: skip
    # the causal script's clip shape is set by flags (its KV cache and block mask are built for it), here the data's
    clip = ["--frames", "3", "--height", "8", "--width", "8"]
    train(
        "train_wan_causal.py", "--data", str(out), *clip, "--sample_every", "0", "--out_dir", str(tmp_path / "causal")
    )
    assert (tmp_path / "video" / "ckpt_0000002").is_dir() and (tmp_path / "causal" / "ckpt_0000002").is_dir()


def test_video_latents_resume_and_refuse_other_settings(videos, tmp_path, monkeypatch, capsys):
    """CogVideoX: the posterior mean times scaling_factor; a rerun writes only the missing shard, the same bytes; a
    rerun with other settings into the same folder is refused."""
    from models import cogvideox_vae

    root, _, cog_dir = videos
    out = tmp_path / "latents"
    video_latents(root, cog_dir, out, "--model", "cogvideox-2b")
    latents, _ = read_shard(out / "shard_00001.safetensors")
    vae = cogvideox_vae.from_pretrained(cog_dir)
    with torch.no_grad():
        assert torch.allclose(latents, vae.posterior(expected_clips()[2:]).mean * vae.cfg.scaling_factor, atol=1e-5)
    os.remove(out / "shard_00001.safetensors")
    read, opened = download.read_video, []
    monkeypatch.setattr(download, "read_video", lambda path, *a: opened.append(os.path.basename(path)) or read(path, *a))  # fmt: skip
    video_latents(root, cog_dir, out, "--model", "cogvideox-2b")
    assert opened == ["c.gif"] and torch.equal(read_shard(out / "shard_00001.safetensors")[0], latents)
    for flags, message in (
        (["--model", "cogvideox-2b", "--frames", "17"], "other settings (frames: 9 then, 17 now)"),
        (["--model", "cogvideox-5b"], "model: 'cogvideox-2b' then, 'cogvideox-5b' now"),
    ):
        with pytest.raises(SystemExit) as info:
            video_latents(root, cog_dir, out, *flags)
        assert info.value.code == 2 and message in capsys.readouterr().err


def refused(capsys, message, command, *args):
    """`command(*args)` ends with exit code 2 and an error line holding the regular expression `message`."""
    with pytest.raises(SystemExit) as info:
        command(*args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and re.search("^error: .*" + message, err, re.M), err


def test_video_latents_bad_input_is_clear(videos, tmp_path, monkeypatch, capsys):
    root, wan_dir, cog_dir = videos
    cases = [
        ("wan", wan_dir, ["--frames", "8"], r"the wan VAE encodes 1 \+ 4k frames, e.g. 5 or 9"),
        ("cogvideox-2b", cog_dir, ["--frames", "13"], r"the cogvideox-2b VAE encodes 1 \+ 8k frames, e.g. 9 or 17"),
        ("wan", wan_dir, ["--frames", "13"], r"a.gif has 9 frames; --frames 13 needs that many"),
        ("wan", wan_dir, ["--height", "72"], "multiples of 16"),
    ]
    for i, (model, vae, flags, message) in enumerate(cases):
        refused(capsys, message, video_latents, root, vae, tmp_path / str(i), "--model", model, *flags)
    assert os.listdir(tmp_path / "2") == ["settings.json"]  # the failed shard left nothing behind
    (tmp_path / "mp4" / "clips").mkdir(parents=True)
    (tmp_path / "mp4" / "clips" / "x.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "imageio", None)  # as if imageio were not installed
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    message = r"x.mp4 needs imageio \(pip install imageio imageio-ffmpeg\)"
    refused(capsys, message, video_latents, tmp_path / "mp4", wan_dir, tmp_path / "out", "--model", "wan")
    (tmp_path / "empty" / "clips").mkdir(parents=True)
    refused(capsys, "holds no videos", video_latents, tmp_path / "empty", wan_dir, tmp_path / "out2", "--model", "wan")
