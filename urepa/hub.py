"""Sharing through the Hugging Face Hub: checkpoints and prepared datasets, by name.

    python share.py export exps/RUN --out shared/RUN            # the checkpoint folder
    python share.py push exps/RUN --repo ORG/NAME [--step N]    # to a model repository
    python share.py push-data data/imagenet256 --repo ORG/DATA  # to a dataset repository

What `--ckpt` (generate.py, sample.py, python -m analysis) and `from_pretrained` here
accept, tried in this order (`resolve_checkpoint`):

1. a path that exists: a `.pt`, a `-ema.safetensors` export or a checkpoint folder. A local path
   always wins, so `exps/run` names the folder even if a repository `exps/run` exists;
2. a short name of a release elsewhere (`repa-sit-xl-2`, urepa/releases.py);
3. `ORG/NAME`, `ORG/NAME@REVISION` or `hf://ORG/NAME[@REVISION]` (the `hf://` form skips the
   local lookup): a Hub model repository, through `huggingface_hub.snapshot_download`, i.e. the
   Hub's cache, token (`hf auth login`, HF_TOKEN) and offline mode (HF_HUB_OFFLINE=1) as they are.

train.py's `--data-dir` takes a dataset repository the same way (`local_dataset`); its files are
checked against the manifest's sizes and SHA-256 digests before training starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from models.base import AlignedDiffusionTransformer
from urepa.checkpoints import HUB_CONFIG, HUB_WEIGHTS, checksum_path, load_model_for_sampling
from urepa.model_card import CARD, build_model_folder, exported_step
from urepa.releases import RELEASES, fetch_release
from urepa.shards import MANIFEST, SETTINGS, load_manifest
from urepa.utils import InputError, ReportedError, file_sha256, write_json

HUB_PREFIX = "hf://"
MODEL_FILES = [HUB_CONFIG, HUB_WEIGHTS, CARD]  # what a model download fetches


#################################################################################
#                      Names: a path, a release, a repository                   #
#################################################################################


def hub_name(name: str) -> tuple[str, str | None] | None:
    """(repository id, revision) if `name` reads as `[hf://]ORG/NAME[@REVISION]`, else None."""
    forced = name.startswith(HUB_PREFIX)
    repo, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    try:
        if repo.count("/") != 1:
            raise HFValidationError(f"{repo!r} is not of the form ORG/NAME")
        validate_repo_id(repo)
    except HFValidationError as err:
        if forced:
            raise InputError(f"{name!r} is not a Hub repository id ({err})") from err
        return None
    return repo, revision or None


def resolve_checkpoint(name: str, revision: str | None = None) -> str:
    """The local file or folder that `name` stands for (module docstring), downloaded first if
    it is a release or a repository not in the cache."""
    if not name.startswith(HUB_PREFIX) and os.path.exists(name):
        return name
    if name in RELEASES:
        return fetch_release(name)
    found = hub_name(name)
    if found is None:  # most likely a path with a typo
        raise FileNotFoundError(
            f"checkpoint {name!r} does not exist (nor is it a release: "
            f"{', '.join(RELEASES)}, or a Hub repository ORG/NAME)"
        )
    repo, named_revision = found
    with not_here_either(name):
        return download(repo, "model", revision or named_revision, MODEL_FILES)


@contextmanager
def not_here_either(name: str) -> Iterator[None]:
    """A name that could be a local path as well as a repository: its error says both."""
    try:
        yield
    except InputError as err:
        if name.startswith(HUB_PREFIX):
            raise
        raise InputError(f"no file or folder {name} here, and {err}") from err


def download(repo: str, repo_type: str, revision: str | None, files: list[str] | None) -> str:
    """`snapshot_download` of a repository (the Hub's cache, token and offline mode), with its
    failures said in one line."""
    kind = "dataset repository" if repo_type == "dataset" else "repository"
    where = f"{repo}@{revision}" if revision else repo
    try:
        return snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=files)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise InputError(not_found(kind, repo)) from err
    except RevisionNotFoundError as err:
        raise InputError(f"{kind} {repo} has no revision {revision!r}") from err
    except IncompleteSnapshotError as err:
        raise InputError(
            f"the cached copy of {where} is incomplete and the Hub cannot be "
            "reached: run again with network access to complete it"
        ) from err
    except LocalEntryNotFoundError as err:
        offline = " (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else ""
        raise InputError(
            f"{where} is not in the Hub cache ({hub_constants.HF_HUB_CACHE}) and the Hub cannot "
            f"be reached{offline}: download it once with network access, or pass a local path"
        ) from err
    except HfHubHTTPError as err:  # 401/403 without the Hub's error code: also private or absent
        status = getattr(err.response, "status_code", None)
        message = not_found(kind, repo) if status in (401, 403, 404) else first_line(err)
        raise InputError(message) from err


def not_found(kind: str, repo: str) -> str:
    return (
        f"{kind} {repo} was not found on the Hub: it does not exist, or it is private or gated "
        "and no token with access was given (log in with `hf auth login` or set HF_TOKEN)"
    )


def first_line(err: Exception) -> str:
    """The first line of a library's multi-line message."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), repr(err))


def load_pretrained(
    name: str, device: Any = "cpu", model_name: str | None = None, revision: str | None = None
) -> AlignedDiffusionTransformer:
    """The EMA model that `name` stands for (`resolve_checkpoint`), in eval mode on `device`,
    loaded strictly; `model_name` only for a REPA checkpoint whose variant its shapes hide."""
    return load_model_for_sampling(resolve_checkpoint(name, revision), device, model_name)


def from_pretrained(
    name: str, revision: str | None = None, device: Any = "cpu"
) -> AlignedDiffusionTransformer:
    """The EMA model of a checkpoint, ready to sample (eval mode, no gradients): a local `.pt`,
    `-ema.safetensors` export or checkpoint folder, a release's short name (`repa-sit-xl-2`), or
    a Hugging Face Hub repository `ORG/NAME[@REVISION]` (a local path wins; docs/sharing.md).
    (Here rather than in models/: loading builds models, and models/ imports nothing of ours.)"""
    return load_pretrained(name, device, revision=revision)


#################################################################################
#                                  Publishing                                   #
#################################################################################


def upload_plan(files: dict[str, str]) -> str:
    """What a push uploads: one line per file, its size and its path in the repository."""
    lines = [f"  {os.path.getsize(src) / 2**20:10.2f} MiB  {dest}" for dest, src in files.items()]
    total = sum(os.path.getsize(src) for src in files.values()) / 2**20
    return "\n".join([*lines, f"  {total:10.2f} MiB  in all ({len(files)} files)"])


def commit(
    api: HfApi, repo: str, repo_type: str, files: dict[str, str], message: str, private: bool
) -> str:
    """Create the repository if needed and upload `files` ({path in repo: local path}) in one
    commit; returns the commit's URL."""
    try:
        api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        operations = [CommitOperationAdd(dest, src) for dest, src in files.items()]
        info = api.create_commit(repo, operations, commit_message=message, repo_type=repo_type)
    except HfHubHTTPError as err:
        raise InputError(
            f"the Hub refused the upload to {repo}: {first_line(err)} (log in with a "
            "token that can write there: `hf auth login` or HF_TOKEN)"
        ) from err
    return str(getattr(info, "commit_url", info))


def publish(
    repo: str, repo_type: str, files: dict[str, str], message: str, private: bool,
    dry_run: bool, api: HfApi | None,
) -> None:  # fmt: skip
    """Print what is uploaded, then (unless `dry_run`) upload it in one commit."""
    print(f"{'would upload' if dry_run else 'uploading'} to {repo} ({repo_type}):\n"
          f"{upload_plan(files)}")  # fmt: skip
    if not dry_run:
        print(commit(api or HfApi(), repo, repo_type, files, message, private))


def push_model(
    run_dir: str, repo: str, step: int | None = None, private: bool = False,
    training_state: bool = False, dry_run: bool = False, api: HfApi | None = None,
) -> dict[str, str]:  # fmt: skip
    """Publish the run's export of `step` (None: the latest) as a checkpoint folder; the training
    checkpoint (optimiser state included) only with `training_state`. Returns the files
    ({path in repo: local path}), uploaded unless `dry_run`."""
    validate_hub_repo(repo)
    with tempfile.TemporaryDirectory(prefix="u-repa-push-") as staging:
        folder = os.path.join(staging, "model")
        built = build_model_folder(run_dir, folder, step, repo_id=repo)
        files = {os.path.basename(path): path for path in built}
        step, checkpoint = exported_step(run_dir, step)
        if training_state:
            name = os.path.basename(checkpoint)
            files[f"training_state/{name}"] = checkpoint
            if os.path.exists(checksum_path(checkpoint)):
                files[f"training_state/{name}.sha256"] = checksum_path(checkpoint)
        message = f"{os.path.basename(os.path.abspath(run_dir))}: step {step}"
        publish(repo, "model", files, message, private, dry_run, api)
        return files


def dataset_files(data_dir: str) -> dict[str, str]:
    """{path in repo: local path} of a prepared dataset: its manifest, settings, every file the
    manifest lists and each shard's sidecar (no temporary files)."""
    manifest = load_manifest(data_dir)
    names = [MANIFEST, SETTINGS]
    for index, shard in enumerate(manifest["shards"]):
        names += [*shard["files"], f"shards/shard-{index:05d}.json"]
    return {name: os.path.join(data_dir, name) for name in names}


def push_dataset(
    data_dir: str, repo: str, private: bool = False, dry_run: bool = False,
    api: HfApi | None = None,
) -> dict[str, str]:  # fmt: skip
    """Publish a dataset of preprocessing/prepare.py as a dataset repository, after checking
    every file against the manifest (so that a damaged copy is never shared)."""
    validate_hub_repo(repo)
    files = dataset_files(data_dir)
    missing = [name for name, path in files.items() if not os.path.isfile(path)]
    if missing:
        raise InputError(f"{data_dir} lacks {', '.join(missing[:3])}: finish or rebuild it with "
                         "preprocessing/prepare.py before sharing it")  # fmt: skip
    dataset_problems(data_dir, load_manifest(data_dir), hash_files=True, raise_as=InputError)
    message = f"prepared dataset ({len(files)} files)"
    publish(repo, "dataset", files, message, private, dry_run, api)
    return files


def validate_hub_repo(repo: str) -> None:
    if hub_name(repo) is None or "@" in repo:
        raise InputError(f"--repo {repo!r} is not a Hub repository id ORG/NAME")


#################################################################################
#                        Training from a dataset repository                     #
#################################################################################

VERIFIED_DIR = "u-repa-verified"  # in the repository's cache folder, beside snapshots/


def local_dataset(data_dir: str) -> str:
    """`data_dir` if it exists here; a dataset repository `[hf://]ORG/NAME[@REVISION]`
    downloaded (or found in the cache) and checked against its manifest otherwise."""
    if not data_dir.startswith(HUB_PREFIX) and os.path.exists(data_dir):
        return data_dir
    found = hub_name(data_dir)
    if found is None:
        return data_dir  # a missing folder: the dataset's own error says what to run
    with not_here_either(data_dir):
        folder = download(found[0], "dataset", found[1], None)
    try:
        manifest = load_manifest(folder)
    except ReportedError as err:
        raise InputError(f"{data_dir} holds no complete dataset ({err})") from err
    stamp = verification_stamp(folder)
    if not stamp_matches(stamp, folder, manifest):
        dataset_problems(folder, manifest, hash_files=True, raise_as=InputError, name=data_dir)
        write_json(stamp, file_stats(folder, manifest))
    return folder


def manifest_entries(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every data file the manifest lists."""
    return {rel: entry for shard in manifest["shards"] for rel, entry in shard["files"].items()}


def dataset_problems(
    folder: str, manifest: dict[str, Any], hash_files: bool, raise_as: type[Exception],
    name: str | None = None,
) -> None:  # fmt: skip
    """Refuse a dataset whose files are missing, of another size or (`hash_files`) of another
    SHA-256 than its manifest says: a partial download, or files of two revisions."""
    problems = []
    for rel, entry in manifest_entries(manifest).items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, not {entry['bytes']}")
        elif hash_files and file_sha256(path) != entry["sha256"]:
            problems.append(f"{rel} differs from its SHA-256 in the manifest")
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise raise_as(
            f"{name or folder} does not match its {MANIFEST} ({'; '.join(problems[:3])}{more}): "
            "a partial or mixed download, not trained on; run again with network access to "
            f"complete it, or delete {folder} and download it anew"
        )


def verification_stamp(folder: str) -> str:
    """Where the record of a snapshot's full check is kept: the repository's cache folder
    (`.../datasets--ORG--NAME/u-repa-verified/COMMIT.json`)."""
    snapshots, commit_hash = os.path.split(os.path.normpath(folder))
    return os.path.join(os.path.dirname(snapshots), VERIFIED_DIR, f"{commit_hash}.json")


def file_stats(folder: str, manifest: dict[str, Any]) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns, inode]} of the files the links of a snapshot point to."""
    stats = {}
    for rel in [MANIFEST, *manifest_entries(manifest)]:
        st = os.stat(os.path.join(folder, rel))
        stats[rel] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return stats


def stamp_matches(stamp: str, folder: str, manifest: dict[str, Any]) -> bool:
    """Whether the snapshot's files are those a full check passed (one stat per file): a
    dataset is hashed once after its download, not at every start."""
    if not os.path.exists(stamp):
        return False
    try:
        with open(stamp) as f:
            return json.load(f) == file_stats(folder, manifest)
    except (OSError, ValueError):
        return False
