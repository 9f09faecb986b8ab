"""Sharing (urepa/hub.py, urepa/model_card.py, urepa/releases.py), offline: a tiny run's export as
a checkpoint folder, loaded through huggingface_hub's own local-folder and cache paths
(HF_HUB_OFFLINE with a cache laid out as the library lays it out), the model card as the Hub
parses it, publishing up to the upload call, a dataset repository checked before training, and a
release downloaded from a server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import RES
from huggingface_hub import HfApi, ModelCard, metadata_load
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file

import generate
import share
import train
from dataset import LatentDataset
from samplers import VelocityOnly, euler_sampler
from urepa import hub, releases
from urepa.checkpoints import DamagedCheckpoint, load_model_for_sampling
from urepa.encoders import ENCODER_STANDIN
from urepa.hub import from_pretrained
from urepa.model_card import build_model_folder
from urepa.settings import EVAL_FILE
from urepa.utils import InputError, ReportedError, file_sha256

TINY = json.dumps({"hidden_size": 32, "depths": [1, 1, 1], "num_heads": 2, "projector_dim": 16})
COMMIT = "a" * 40
# Two evaluations of the exported step (one at 10K samples, one at 50K) and one of another step.
EVAL_ROWS = [
    {"step": 2, "images_seen": 16, "gpu_hours": 0.001, "fid": 91.25, "sfid": 40.5,
     "inception_score": 3.125, "precision": 0.25, "recall": 0.5, "preset": "ablation",
     "sampler_steps": 50, "num_samples": 10000, "eval_ref": "/data/ref.npz", "eval_seconds": 9.0,
     "processes": 1},
    {"step": 2, "images_seen": 16, "gpu_hours": 0.001, "fid": 88.5, "sfid": 39.0,
     "inception_score": 3.5, "precision": 0.3, "recall": 0.45, "preset": "paper-main",
     "sampler_steps": 250, "num_samples": 50000, "eval_ref": "/data/ref.npz",
     "eval_seconds": 40.0, "processes": 1},
    {"step": 1, "images_seen": 8, "gpu_hours": 0.0005, "fid": 120.0, "sfid": 50.0,
     "inception_score": 2.0, "precision": 0.1, "recall": 0.2, "preset": "ablation",
     "sampler_steps": 50, "num_samples": 10000, "eval_ref": "/data/ref.npz", "eval_seconds": 9.0,
     "processes": 1},
]  # fmt: skip


def train_argv(data_dir: str, out: str, exp: str, steps: int = 2) -> list[str]:
    return [
        "--data-dir", data_dir, "--resolution", str(RES), "--output-dir", out, "--exp-name", exp,
        "--model", "SiTDown", "--model-config", TINY, "--enc-type", ENCODER_STANDIN,
        "--vae", "tiny-random", "--batch-size", "8", "--max-train-steps", str(steps),
        "--log-every", "1", "--checkpointing-steps", "1", "--sampling-steps", "0",
        "--num-workers", "0", "--mixed-precision", "no",
    ]  # fmt: skip


def run_training(argv: list[str]) -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train.main(train.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> str:
    """A tiny run of 2 steps (its final step exported), with eval.jsonl rows written by hand."""
    out = str(tmp_path_factory.mktemp("hub-run"))
    run_training(train_argv(data_dir, out, "tiny"))
    run = os.path.join(out, "tiny")
    with open(os.path.join(run, EVAL_FILE), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in EVAL_ROWS)
    return run


@pytest.fixture(scope="module")
def folder(run_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hub-folder") / "tiny-folder")
    build_model_folder(run_dir, out)
    return out


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def checkpoint(run_dir: str, step: int = 2) -> str:
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def sample(model, seed: int = 0) -> torch.Tensor:
    """A few Euler ODE steps with guidance from fixed noise."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, *model.latent_shape, generator=gen)
    y = torch.arange(4) % model.num_classes
    return euler_sampler(VelocityOnly(model), z, y, num_steps=3, cfg_scale=1.5)


#################################################################################
#                        The folder, from_pretrained, generate.py               #
#################################################################################


def test_the_folder_samples_what_its_checkpoint_samples(run_dir, folder):
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    original = load_model_for_sampling(checkpoint(run_dir))
    shared = from_pretrained(folder)
    assert not shared.training and not any(p.requires_grad for p in shared.parameters())
    ours, theirs = original.state_dict(), shared.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(sample(original), sample(shared))
    config = read_json(os.path.join(folder, "config.json"))
    ckpt = torch.load(checkpoint(run_dir), weights_only=True)
    assert (config["model_name"], config["model_kwargs"]) == (
        ckpt["model_name"],
        ckpt["model_kwargs"],
    )
    assert config["step"] == 2 and config["images_seen"] == 16
    assert config["dataset"] == {k: ckpt["data"][k] for k in ("dataset_id", "dataset_size")}
    assert config["training_args"]["batch_size"] == 8
    assert config["weights_sha256"] == file_sha256(os.path.join(folder, "model.safetensors"))
    assert config["sampler_presets"]["ablation"]["mode"] == "ode"
    assert config["sampler_presets"]["paper-main"]["cfg_scale"] == 1.65


def test_generate_takes_the_folder_and_gives_the_checkpoints_images(run_dir, folder, tmp_path):
    flags = ["--vae", "tiny-random", "--num-fid-samples", "4", "--num-steps", "2",
             "--mode", "ode", "--cfg-scale", "1.5", "--precision", "fp32"]  # fmt: skip
    for name, ckpt in (("pt", checkpoint(run_dir)), ("folder", folder)):
        generate.main(generate.parse_args(["--ckpt", ckpt, "--sample-dir",
                                           str(tmp_path / name), *flags]))  # fmt: skip
    pt, shared = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("pt", "folder"))
    assert pt.shape == (4, RES, RES, 3) and np.array_equal(pt, shared)


#################################################################################
#                 The Hub's cache, offline: a repository by its id              #
#################################################################################


def fill_cache(cache, repo: str, source: str, repo_type: str = "model") -> str:
    """Lay out `source`'s files as huggingface_hub's cache holds a download of `repo`: blobs
    named by their digest, a snapshot of relative links, refs/main. Returns the snapshot."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    storage = os.path.join(str(cache), f"{kind}--{repo.replace('/', '--')}")
    snapshot = os.path.join(storage, "snapshots", COMMIT)
    for root, _, names in os.walk(source):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), source)
            blob = os.path.join(storage, "blobs", file_sha256(os.path.join(root, name)))
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            shutil.copyfile(os.path.join(root, name), blob)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HOME", str(tmp_path / "hf-home"))
    return cache


def test_a_repository_loads_from_the_hub_cache_offline(folder, offline_cache, tmp_path,
                                                         monkeypatch):  # fmt: skip
    snapshot = fill_cache(offline_cache, "org/tiny", folder)
    expected = sample(from_pretrained(folder))
    for name, revision in (("org/tiny", None), ("org/tiny@main", None), ("org/tiny", COMMIT),
                           (f"hf://org/tiny@{COMMIT}", None)):  # fmt: skip
        assert hub.resolve_checkpoint(name, revision) == snapshot
        assert torch.equal(sample(from_pretrained(name, revision=revision)), expected)
    # A local folder of the same name wins; hf:// reaches past it to the repository.
    other = tmp_path / "work"
    shutil.copytree(folder, other / "org" / "tiny")
    monkeypatch.chdir(other)
    assert hub.resolve_checkpoint("org/tiny") == "org/tiny"
    assert hub.resolve_checkpoint("hf://org/tiny") == snapshot
    with pytest.raises(InputError, match=r"no file or folder org/absent here, and org/absent "
                       r"is not in the Hub cache .*HF_HUB_OFFLINE"):  # fmt: skip
        from_pretrained("org/absent")


def test_a_mixed_download_is_refused(folder, offline_cache, tmp_path):
    """config.json of one export, model.safetensors of other weights: the digest tells."""
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    other = {k: v + 1 for k, v in load_file(mixed / "model.safetensors").items()}
    save_file(other, mixed / "model.safetensors")
    fill_cache(offline_cache, "org/mixed", str(mixed))
    with pytest.raises(DamagedCheckpoint, match="a partial or mixed download"):
        from_pretrained("org/mixed")


def test_bad_folders_and_names_are_one_line_errors(folder, tmp_path, offline_cache):
    with pytest.raises(InputError, match="is not a checkpoint folder: it needs config.json"):
        from_pretrained(str(tmp_path))
    unknown = tmp_path / "unknown"
    shutil.copytree(folder, unknown)
    config = read_json(unknown / "config.json")
    (unknown / "config.json").write_text(json.dumps({**config, "model_name": "DiT-XL/2"}))
    with pytest.raises(InputError, match="a model this code does not know: unknown model 'DiT"):
        from_pretrained(str(unknown))
    with pytest.raises(FileNotFoundError, match="'no-such-thing' does not exist .*a release"):
        from_pretrained("no-such-thing")


class Responder(http.server.BaseHTTPRequestHandler):
    """A Hub that answers every API request as it answers a private repository without a token."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    def log_message(self, *args):
        pass


def serve(handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_private_or_missing_repository_says_to_log_in(tmp_path, monkeypatch):
    server, url = serve(Responder)
    monkeypatch.setattr(hub_constants, "ENDPOINT", url)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    try:
        with pytest.raises(InputError) as err:
            from_pretrained("org/private")
    finally:
        server.shutdown()
    message = str(err.value)
    assert "\n" not in message and "repository org/private was not found" in message
    assert "hf auth login" in message


#################################################################################
#                                  The model card                               #
#################################################################################


def test_the_card_parses_as_the_hub_parses_it_with_eval_jsonls_metrics(folder):
    path = os.path.join(folder, "README.md")
    metadata = metadata_load(path)
    assert metadata["license"] == "mit" and metadata["library_name"] == "u-repa"
    assert "u-repa" in metadata["tags"] and "datasets" not in metadata  # 4 classes: not ImageNet
    card = ModelCard.load(path)
    found = {(r.metric_type, r.metric_args["preset"]): r for r in card.data.eval_results}
    expected = {}
    for row in EVAL_ROWS[:2]:  # the exported step's rows only
        suffix = {10000: "10k", 50000: "50k"}[row["num_samples"]]
        for key, name in (("fid", "fid"), ("sfid", "sfid"), ("inception_score", "inception-score"),
                          ("precision", "precision"), ("recall", "recall")):  # fmt: skip
            expected[(f"{name}-{suffix}", row["preset"])] = row[key]
    assert {k: r.metric_value for k, r in found.items()} == expected
    for result in card.data.eval_results:
        assert result.metric_args["num_samples"] == int(result.metric_type[-3:-1]) * 1000
        assert result.metric_args["step"] == 2
    assert not any(r.metric_type == "fid" for r in card.data.eval_results)  # always -10k/-50k
    assert "FID-10K | 91.25 | 10000 | ablation" in card.text
    assert "never with the papers' FID-50K" in card.text
    assert "@article{tian2025urepa," in card.text and "@inproceedings{yu2025repa," in card.text
    assert "python generate.py --ckpt" in card.text


def test_an_existing_folder_or_a_missing_step_is_refused(run_dir, folder, tmp_path):
    with pytest.raises(InputError, match="already exists and is not an empty folder"):
        build_model_folder(run_dir, folder)
    with pytest.raises(InputError, match="no EMA export of step 1; exported steps: 2"):
        build_model_folder(run_dir, str(tmp_path / "new"), step=1)


#################################################################################
#                                  Publishing                                   #
#################################################################################


@pytest.fixture
def recorded_api(monkeypatch):
    """HfApi's repository and commit calls, recorded instead of sent."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", repo_id, {
            "files": {op.path_in_repo: file_sha256(op.path_or_fileobj) for op in operations},
            **kwargs}))  # fmt: skip
        return type("Info", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_uploads_the_folder_and_no_optimiser_state(run_dir, folder, recorded_api, capsys):
    share.main(share.parse_args(["push", run_dir, "--repo", "org/tiny", "--dry-run"]))
    listing = capsys.readouterr().out
    assert "would upload to org/tiny" in listing and "model.safetensors" in listing
    assert ".pt" not in listing and recorded_api == []
    share.main(share.parse_args(["push", run_dir, "--repo", "org/tiny", "--private"]))
    (_, repo, created), (_, _, committed) = recorded_api
    assert repo == "org/tiny" and created["private"] and created["exist_ok"]
    weights = file_sha256(os.path.join(folder, "model.safetensors"))
    assert sorted(committed["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert committed["files"]["model.safetensors"] == weights
    recorded_api.clear()
    hub.push_model(run_dir, "org/tiny", training_state=True)
    files = recorded_api[1][2]["files"]
    assert files["training_state/0000002.pt"] == file_sha256(checkpoint(run_dir))


def test_push_data_lists_the_dataset_and_uploads_it(data_dir, recorded_api, capsys):
    share.main(share.parse_args(["push-data", data_dir, "--repo", "org/toy-data", "--dry-run"]))
    listing = capsys.readouterr().out
    assert "manifest.json" in listing and "shards/moments-00000.npy" in listing
    assert recorded_api == []
    files = hub.push_dataset(data_dir, "org/toy-data")
    assert recorded_api[0][2]["repo_type"] == "dataset"
    assert set(recorded_api[1][2]["files"]) == set(files)
    manifest = read_json(os.path.join(data_dir, "manifest.json"))
    listed = {rel for shard in manifest["shards"] for rel in shard["files"]}
    assert listed < set(files) and not any(".tmp" in name for name in files)


#################################################################################
#                        Training from a dataset repository                     #
#################################################################################


def test_a_dataset_repository_is_checked_then_trained_on(data_dir, offline_cache, tmp_path):
    snapshot = fill_cache(offline_cache, "org/toy-data", data_dir, "dataset")
    assert hub.local_dataset("org/toy-data") == snapshot
    assert len(LatentDataset(snapshot, encoders=[ENCODER_STANDIN])) == 32
    run_training(train_argv("org/toy-data", str(tmp_path / "exps"), "from-hub", steps=1))
    args = read_json(tmp_path / "exps" / "from-hub" / "args.json")
    assert args["data_dir"] == snapshot


def test_a_partial_or_mixed_dataset_download_is_refused(data_dir, offline_cache):
    snapshot = fill_cache(offline_cache, "org/toy-data", data_dir, "dataset")
    assert hub.local_dataset("org/toy-data") == snapshot  # checked in full, then stamped
    moments = os.path.join(snapshot, "shards", "moments-00000.npy")
    data = bytearray(Path(moments).read_bytes())
    data[-1] ^= 0xFF  # a file of another revision: the same size, other bytes
    os.remove(moments)
    Path(moments).write_bytes(bytes(data))
    with pytest.raises(InputError, match="moments-00000.npy differs from its SHA-256"):
        hub.local_dataset("org/toy-data")
    os.remove(moments)
    with pytest.raises(InputError, match="moments-00000.npy is missing.*partial or mixed"):
        hub.local_dataset("org/toy-data")


#################################################################################
#                      A release: resumable download, checksum                  #
#################################################################################


class FileServer:
    """Serves one file on 127.0.0.1 with HTTP Range; `cut_after` bytes of the next response
    are sent before the connection drops."""

    def __init__(self, data: bytes):
        self.data, self.cut_after, self.ranges = data, None, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                if "Range" in self.headers:
                    owner.ranges.append(self.headers["Range"])
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                body = owner.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(owner.data) - 1}/"
                                                      f"{len(owner.data)}")  # fmt: skip
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.cut_after is not None:
                    body, owner.cut_after = body[: owner.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server, self.url = serve(Handler)


@pytest.fixture
def release(run_dir, tmp_path, monkeypatch):
    """The tiny run's checkpoint, published as a release at a local URL."""
    data = Path(checkpoint(run_dir)).read_bytes()
    server = FileServer(data)
    entry = releases.Release(url=f"{server.url}/last.pt?dl=0", filename="tiny.pt",
                             sha256=hashlib.sha256(data).hexdigest(), model="SiTDown",
                             about="test")  # fmt: skip
    monkeypatch.setitem(releases.RELEASES, "tiny-release", entry)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(tmp_path / "hf-home"))
    yield server, entry
    server.server.shutdown()


def test_an_interrupted_download_resumes_and_is_verified(release, run_dir):
    server, entry = release
    server.cut_after = len(server.data) // 3
    with pytest.raises(ReportedError, match="interrupted after .* run the same command again"):
        from_pretrained("tiny-release")
    part = os.path.join(releases.releases_dir(), "tiny.pt.part")
    assert os.path.getsize(part) == len(server.data) // 3
    model = from_pretrained("tiny-release")
    assert server.ranges == [f"bytes={len(server.data) // 3}-"]
    path = os.path.join(releases.releases_dir(), "tiny.pt")
    assert file_sha256(path) == entry.sha256 and not os.path.exists(part)
    assert Path(path + ".sha256").read_text().split()[0] == entry.sha256
    assert torch.equal(sample(model), sample(load_model_for_sampling(checkpoint(run_dir))))


def test_a_wrong_checksum_is_refused(release, monkeypatch):
    server, entry = release
    wrong = releases.Release(**{**entry.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(releases.RELEASES, "tiny-release", wrong)
    with pytest.raises(InputError, match="has SHA-256 .* the release's is 0000"):
        from_pretrained("tiny-release")
    assert os.listdir(releases.releases_dir()) == []  # nothing kept, nothing trusted


def test_without_a_published_digest_the_first_download_is_kept_and_checked(release, monkeypatch):
    server, entry = release
    monkeypatch.setitem(releases.RELEASES, "tiny-release",
                        releases.Release(**{**entry.__dict__, "sha256": None}))  # fmt: skip
    path = releases.fetch_release("tiny-release")
    assert Path(path + ".sha256").read_text().split()[0] == entry.sha256
    with open(path, "r+b") as f:  # damaged in the cache afterwards
        f.seek(100)
        f.write(b"\0" * 8)
    with pytest.raises(DamagedCheckpoint, match="is damaged"):
        from_pretrained("tiny-release")


def test_offline_or_unreachable_is_one_line_saying_what_to_do(release, monkeypatch):
    server, entry = release
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="not downloaded yet .* HF_HUB_OFFLINE is set: run once"):
        from_pretrained("tiny-release")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = releases.Release(**{**entry.__dict__, "url": f"http://127.0.0.1:{port}/last.pt"})
    monkeypatch.setitem(releases.RELEASES, "tiny-release", closed)
    with pytest.raises(InputError) as err:
        from_pretrained("tiny-release")
    assert "\n" not in str(err.value) and "cannot reach 127.0.0.1" in str(err.value)
    assert "a partial download resumes" in str(err.value)


def test_repas_release_is_recorded_with_its_url_and_no_invented_digest():
    entry = releases.RELEASES["repa-sit-xl-2"]
    assert entry.url.startswith(
        "https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
    )
    assert entry.sha256 is None and entry.model == "SiT-XL/2"
