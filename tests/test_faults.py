"""Faults, on a CPU: `kill -9` of train.py, preprocessing/prepare.py and generate.py at moments
drawn from fixed seeds (inside a save too: the test polls for the save's temporary file and kills
when it appears), a full disk, and corrupt inputs.

After a kill or a full disk, the same command is run again, and its result must be an
uninterrupted run's: training bit for bit (weights, EMA, optimiser, exports, one metrics row per
step), a dataset file for file, a sample `.npz` byte for byte. A corrupt input must give one line
and exit code 1.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch
from conftest import prepare_flags
from test_train import (
    argv,
    assert_same_export,
    assert_states_equal,
    fresh_accelerate_state,  # noqa: F401 (an autouse fixture: in-process runs here too)
    metrics,
    optimizer_tensors,
    run,
)

import generate
from preprocessing.prepare import main as prepare_main
from preprocessing.prepare import parse_args as prepare_args
from urepa import shards, utils
from urepa.checkpoints import TrainingError, load_checkpoint
from urepa.utils import ReportedError, is_temporary

TIMINGS = {"images_per_sec": 0, "sec_per_step": 0}  # wall-clock figures differ by run
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = "u-repa faults"  # the moments of the kills


def moment(scenario: str, choices: list[int]) -> int:
    """The moment of a kill, drawn from the fixed seed and the scenario's name."""
    return random.Random(f"{SEED}/{scenario}").choice(choices)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """`kill -9` the process (and its group) as soon as `ready()` holds, polling without pause:
    a save of the tiny models takes milliseconds."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"the process ended (code {process.returncode}) unkilled"
        assert time.time() < deadline, "the moment of the kill never came"
        time.sleep(0.0005)  # saves last 5-50 ms here: they are seen, and the process runs
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def names(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def temporaries(folder, of: str = "") -> list[str]:
    return [name for name in names(folder) if is_temporary(name, of)]


def one_line_error(cmd: list[str]) -> str:
    """Run a command that must fail with one line on stderr and exit code 1; returns the line."""
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------
# train.py
# --------------------------------------------------------------------------------------------

# Checkpoints at steps 2, 4 (a milestone, exported) and 6 (the final step, exported); the same
# command starts the run and continues it.
TRAIN = ["--max-train-steps", "6", "--checkpointing-steps", "2", "--milestone-every", "4",
         "--keep-last", "1", "--log-every", "1", "--resume", "auto"]  # fmt: skip


def train_command(data_dir: str, out, exp: str) -> list[str]:
    return [sys.executable, "train.py", *argv(data_dir, out, exp, *TRAIN)]


@pytest.fixture(scope="module")
def train_reference(data_dir, tmp_path_factory):
    """An uninterrupted run: (output dir, run dir)."""
    out = tmp_path_factory.mktemp("faults-train")
    run(*argv(data_dir, out, "reference", *TRAIN))
    return out, out / "reference"


def assert_same_run(run_dir, reference) -> None:
    """Bit for bit the reference run: weights, EMA, optimiser, exports, metrics, no leftovers."""
    assert names(run_dir / "checkpoints") == names(reference / "checkpoints")  # no .tmp
    assert not temporaries(run_dir)
    a = load_checkpoint(str(reference / "checkpoints" / "0000006.pt"))
    b = load_checkpoint(str(run_dir / "checkpoints" / "0000006.pt"))
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    for x, y in zip(optimizer_tensors(a), optimizer_tensors(b), strict=True):
        assert torch.equal(x, y)
    for name in ("0000004-ema.safetensors", "0000006-ema.safetensors"):  # flags differ by name
        assert_same_export(run_dir / "checkpoints" / name, reference / "checkpoints" / name,
                           but=("args",))  # fmt: skip
    straight = metrics(reference.parent, reference.name)
    resumed = metrics(run_dir.parent, run_dir.name)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(straight, resumed, strict=True):
        assert x | TIMINGS == y | TIMINGS


def train_kill_moment(scenario: str, run_dir) -> Callable[[], bool]:
    """When to kill: during a step (after the k-th metrics row), inside the save of checkpoint
    k (its temporary file exists; should a busy machine hide that from the poll, just after), or
    after checkpoint k, before its EMA export is written."""
    folder = run_dir / "checkpoints"
    if scenario == "a step":
        rows = moment(scenario, [1, 2, 3, 4, 5])
        jsonl = run_dir / "metrics.jsonl"
        return lambda: jsonl.exists() and jsonl.read_text().count("\n") >= rows
    if scenario == "a checkpoint save":
        name = f"{moment(scenario, [2, 4, 6]):07d}.pt"
        return lambda: bool(temporaries(folder, name)) or os.path.exists(folder / name)
    name = f"{moment(scenario, [4, 6]):07d}.pt"  # a milestone or the final step: exported
    return lambda: os.path.exists(folder / name)


@pytest.mark.parametrize("scenario", ["a step", "a checkpoint save", "an EMA export"])
def test_train_killed_during_then_rerun_equals_an_uninterrupted_run(
    data_dir, train_reference, scenario
):
    out, reference = train_reference
    exp = scenario.replace(" ", "-")
    kill_when(start(train_command(data_dir, out, exp)), train_kill_moment(scenario, out / exp))
    run(*argv(data_dir, out, exp, *TRAIN))  # the same command, in this process
    assert_same_run(out / exp, reference)


def test_train_after_a_full_disk_then_room_equals_an_uninterrupted_run(
    data_dir, train_reference, monkeypatch
):
    out, reference = train_reference
    original = torch.save

    def save(obj, f, *args, **kwargs):  # the disk is full at the checkpoint of step 4
        if ".0000004.pt." in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TrainingError, match="0000002.pt\\) is intact"):
        run(*argv(data_dir, out, "full-disk", *TRAIN))
    monkeypatch.undo()  # room is made
    run(*argv(data_dir, out, "full-disk", *TRAIN))
    assert_same_run(out / "full-disk", reference)


def test_one_writer_per_run_directory(data_dir, train_reference, tmp_path, monkeypatch):
    """A run directory in use is refused in one line naming the holder's PID, before anything
    in it is touched; the lock dies with its holder, so after a `kill -9` the run resumes."""
    out, reference = train_reference
    monkeypatch.setattr(utils, "LOCK_WAIT_SECONDS", 0.5)  # the holder is alive: no need to wait
    shutil.copytree(reference, tmp_path / "locked")
    (tmp_path / "locked" / "checkpoints" / ".0000006.pt.abcd.tmp").write_bytes(b"in progress")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from train import exclusive_lock, run_lock_path;"
         f"lock = exclusive_lock(run_lock_path({str(tmp_path / 'locked')!r}), 'x', 'y');"
         "lock.__enter__(); print('held', flush=True); time.sleep(300)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in ([], ["--resume", "auto"]):
            with pytest.raises(
                TrainingError, match=f"in use by another process \\(PID {holder.pid},"
            ):
                run(*argv(data_dir, tmp_path, "locked", *TRAIN[:-2], *resume))
        # the holder's save in progress is left alone
        assert temporaries(tmp_path / "locked" / "checkpoints")
    finally:
        holder.kill()
    # at once: the lock is waited for while its killed holder exits
    run(*argv(data_dir, tmp_path, "locked", *TRAIN))
    holder.wait()
    assert not temporaries(tmp_path / "locked" / "checkpoints")


def flip_bytes(path, count: int = 64) -> None:
    """Damage a file in place: `count` bytes in its middle inverted (a tensor's in a checkpoint)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_checkpoints_and_exports_carry_a_sha256_in_sha256sums_format(train_reference):
    folder = train_reference[1] / "checkpoints"
    files = [name for name in names(folder) if not name.endswith(".sha256")]
    assert files == ["0000004-ema.safetensors", "0000004.pt", "0000006-ema.safetensors",
                     "0000006.pt"]  # fmt: skip
    for name in files:
        recorded = (folder / f"{name}.sha256").read_text()
        assert recorded == f"{shards.file_sha256(str(folder / name))}  {name}\n"


def test_a_damaged_latest_checkpoint_is_passed_over_for_the_one_before(
    data_dir, train_reference, tmp_path, caplog
):
    """64 bytes flipped inside checkpoint 6: --resume auto warns and resumes from checkpoint 4,
    and the run ends as an uninterrupted one; naming the damaged file is one line."""
    out, reference = train_reference
    shutil.copytree(reference, out / "damaged")
    flip_bytes(out / "damaged" / "checkpoints" / "0000006.pt")
    named = [sys.executable, "train.py",
             *argv(data_dir, out, "damaged", *TRAIN[:-1], str(out / "damaged" / "checkpoints" /
                                                           "0000006.pt"))]  # fmt: skip
    assert "0000006.pt is damaged: its SHA-256 is" in one_line_error(named)
    run(*argv(data_dir, out, "damaged", *TRAIN))
    assert "0000006.pt is damaged" in caplog.text and "the checkpoint before it" in caplog.text
    assert_same_run(out / "damaged", reference)


def test_a_damaged_export_is_refused_by_generate(train_reference, tmp_path, caplog):
    export = train_reference[1] / "checkpoints" / "0000006-ema.safetensors"
    damaged = tmp_path / "0000006-ema.safetensors"
    shutil.copy(export, damaged)
    shutil.copy(f"{export}.sha256", f"{damaged}.sha256")
    flip_bytes(damaged)
    with pytest.raises(ReportedError, match="0000006-ema.safetensors is damaged"):
        generate.main(generate.parse_args(generate_flags(str(damaged), tmp_path / "samples")))
    assert not (tmp_path / "samples").exists()
    alone = tmp_path / "alone" / "0000006-ema.safetensors"  # copied without its checksum
    alone.parent.mkdir()
    shutil.copy(export, alone)
    generate.main(generate.parse_args(generate_flags(str(alone), tmp_path / "samples")))
    assert "read without being verified" in caplog.text


# --------------------------------------------------------------------------------------------
# preprocessing/prepare.py
# --------------------------------------------------------------------------------------------

PREPARE_EXTRA = ("--shard-size", "8")  # 4 shards


@pytest.fixture(scope="module")
def prepare_reference(toy_images, tmp_path_factory):
    """An uninterrupted preparation, moved aside: (its folder, where the runs under test write).
    The runs write to the reference's first place, so that the commands are the same."""
    root = tmp_path_factory.mktemp("faults-prepare")
    prepare_main(prepare_args(prepare_flags(toy_images, str(root / "data"), *PREPARE_EXTRA)))
    os.rename(root / "data", root / "reference")
    return root / "reference", root / "data"


def assert_same_dataset(dest, reference) -> None:
    """Every file of the reference, byte for byte, and nothing else (no temporary file)."""
    for folder in ("", "shards"):
        files = names(reference / folder)
        assert names(dest / folder) == files
        regular = [name for name in files if os.path.isfile(reference / folder / name)]
        _, mismatch, errors = filecmp.cmpfiles(dest / folder, reference / folder, regular,
                                               shallow=False)  # fmt: skip
        assert not mismatch and not errors, (folder, mismatch, errors)


def prepare_kill_moment(scenario: str, dest) -> Callable[[], bool]:
    """When to kill: inside the write of shard k (its temporary files exist), or inside the
    write of the manifest (its temporary file exists; or it is there, while the process ends)."""
    if scenario == "a shard":
        shard = f"-{moment(scenario, [0, 1, 2, 3]):05d}."
        return lambda: any(shard in n and n.endswith(".tmp") for n in names(dest / "shards"))
    return lambda: bool(temporaries(dest, shards.MANIFEST)) or (dest / shards.MANIFEST).exists()


@pytest.mark.parametrize("scenario", ["a shard", "the manifest"])
def test_prepare_killed_during_then_rerun_equals_an_uninterrupted_run(
    toy_images, prepare_reference, scenario
):
    reference, dest = prepare_reference
    flags = prepare_flags(toy_images, str(dest), *PREPARE_EXTRA)
    try:
        process = start([sys.executable, "preprocessing/prepare.py", *flags])
        kill_when(process, prepare_kill_moment(scenario, dest))
        prepare_main(prepare_args(flags))  # the same command, in this process
        assert_same_dataset(dest, reference)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_prepare_after_a_full_disk_then_room_equals_an_uninterrupted_run(
    toy_images, prepare_reference, monkeypatch
):
    reference, dest = prepare_reference
    flags = prepare_flags(toy_images, str(dest), *PREPARE_EXTRA)
    original = shards.write_json

    def write_json(path, obj, *args):  # the disk is full when shard 2 is published
        if path.endswith("shard-00002.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, obj, *args)

    monkeypatch.setattr(shards, "write_json", write_json)
    try:
        with pytest.raises(ReportedError, match="not enough disk space"):
            prepare_main(prepare_args(flags))
        monkeypatch.undo()  # room is made
        prepare_main(prepare_args(flags))
        assert_same_dataset(dest, reference)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@pytest.fixture(scope="module")
def other_images(toy_images, tmp_path_factory):
    """Another source with the toy set's file names (and sizes): each image mirrored."""
    from PIL import Image

    root = tmp_path_factory.mktemp("other-images") / "images"
    shutil.copytree(toy_images, root)
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as image:
            mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mirrored.save(path)
    return str(root)


def test_a_destination_refuses_to_continue_or_finish_from_another_source(
    toy_images, other_images, prepare_reference, tmp_path
):
    """A finished dataset, and one killed after its first shard, re-run with another --source
    holding the same file names: refused in one line; --force builds it anew from the new one.
    A re-run with nothing to do leaves the manifest as it was."""
    reference, _ = prepare_reference
    finished, partial = tmp_path / "finished", tmp_path / "partial"
    for dest in (finished, partial):
        shutil.copytree(reference, dest)
    manifest = finished / shards.MANIFEST
    written = manifest.stat().st_mtime_ns
    prepare_main(prepare_args(prepare_flags(toy_images, str(finished), *PREPARE_EXTRA)))
    assert manifest.stat().st_mtime_ns == written  # nothing to do: not rewritten
    os.remove(partial / shards.MANIFEST)  # killed after its first shard
    for shard in (1, 2, 3):
        os.remove(shards.sidecar_path(str(partial), shard))
    for dest in (finished, partial):
        flags = prepare_flags(other_images, str(dest), *PREPARE_EXTRA)
        with pytest.raises(ReportedError, match="made from another --source.*--force"):
            prepare_main(prepare_args(flags))
        assert manifest.stat().st_mtime_ns == written
    prepare_main(prepare_args(prepare_flags(other_images, str(partial), *PREPARE_EXTRA, "--force")))
    fresh = tmp_path / "fresh"
    prepare_main(prepare_args(prepare_flags(other_images, str(fresh), *PREPARE_EXTRA)))
    assert names(partial / "shards") == names(fresh / "shards")
    _, mismatch, errors = filecmp.cmpfiles(partial / "shards", fresh / "shards",
                                           names(fresh / "shards"), shallow=False)  # fmt: skip
    assert not mismatch and not errors


# --------------------------------------------------------------------------------------------
# generate.py
# --------------------------------------------------------------------------------------------

SAMPLES = ["--vae", "tiny-random", "--num-fid-samples", "8", "--per-proc-batch-size", "2",
           "--mode", "sde", "--num-steps", "4", "--precision", "fp32",
           "--global-seed", "3"]  # fmt: skip


def generate_flags(ckpt: str, sample_dir) -> list[str]:
    return ["--ckpt", ckpt, "--sample-dir", str(sample_dir), *SAMPLES]


@pytest.fixture(scope="module")
def samples_reference(train_reference, tmp_path_factory):
    """An uninterrupted sampling of the reference run's EMA: (checkpoint, its .npz bytes)."""
    ckpt = str(train_reference[1] / "checkpoints" / "0000006.pt")
    sample_dir = tmp_path_factory.mktemp("faults-generate") / "samples"
    generate.main(generate.parse_args(generate_flags(ckpt, sample_dir)))
    return ckpt, (sample_dir.parent / "samples.npz").read_bytes()


def generate_kill_moment(scenario: str, sample_dir) -> Callable[[], bool]:
    """When to kill: once the k-th image is written, or inside the write of the .npz (its
    temporary file exists; or it is there, while the process ends)."""
    if scenario == "an image":
        count = moment(scenario, [1, 2, 3, 4, 5, 6, 7])
        return lambda: sum(n.endswith(".png") for n in names(sample_dir)) >= count
    npz = f"{sample_dir.name}.npz"
    return lambda: bool(temporaries(sample_dir.parent, npz)) or (sample_dir.parent / npz).exists()


@pytest.mark.parametrize("scenario", ["an image", "the npz"])
def test_generate_killed_during_then_rerun_equals_an_uninterrupted_run(
    samples_reference, tmp_path, scenario
):
    ckpt, npz = samples_reference
    flags = generate_flags(ckpt, tmp_path / "samples")
    kill_when(start([sys.executable, "generate.py", *flags]),
              generate_kill_moment(scenario, tmp_path / "samples"))  # fmt: skip
    generate.main(generate.parse_args(flags))  # the same command, in this process
    assert (tmp_path / "samples.npz").read_bytes() == npz
    assert not temporaries(tmp_path / "samples")
    assert not temporaries(tmp_path, of="samples.npz.")  # a killed .npz write is cleared too


def test_generate_after_a_full_disk_then_room_equals_an_uninterrupted_run(
    samples_reference, tmp_path, monkeypatch
):
    ckpt, npz = samples_reference
    flags = generate_flags(ckpt, tmp_path / "samples")
    original = generate.save_png

    def save_png(image, sample_dir, index):  # the disk is full at image 5
        if index == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(image, sample_dir, index)

    monkeypatch.setattr(generate, "save_png", save_png)
    with pytest.raises(OSError, match="No space left"):
        generate.main(generate.parse_args(flags))
    monkeypatch.undo()  # room is made
    generate.main(generate.parse_args(flags))
    assert (tmp_path / "samples.npz").read_bytes() == npz


# --------------------------------------------------------------------------------------------
# Corrupt inputs: one line, exit code 1
# --------------------------------------------------------------------------------------------


def truncated_copy(path, dest) -> str:
    with open(path, "rb") as f:
        data = f.read()
    with open(dest, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(dest)


def test_a_truncated_checkpoint_is_one_line_and_exit_code_1(data_dir, train_reference, tmp_path):
    out, reference = train_reference
    truncated = truncated_copy(reference / "checkpoints" / "0000006.pt", tmp_path / "0000006.pt")
    expected = f"could not read {truncated!r}: the file is truncated, corrupt or not a PyTorch"
    resume = [sys.executable, "train.py", *argv(data_dir, tmp_path, "t", "--resume", truncated)]
    assert expected in one_line_error(resume)
    sample = [sys.executable, "generate.py", *generate_flags(truncated, tmp_path / "samples")]
    assert expected in one_line_error(sample)


def test_a_garbage_shard_file_is_one_line_and_exit_code_1(data_dir, tmp_path):
    garbage = shutil.copytree(data_dir, tmp_path / "data")
    shard = garbage / "shards" / "moments-00000.npy"
    shard.write_bytes(random.Random(SEED).randbytes(shard.stat().st_size))
    cmd = [sys.executable, "train.py", *argv(str(garbage), tmp_path, "g")]
    assert "moments-00000.npy is not a valid .npy file" in one_line_error(cmd)


def test_a_truncated_npz_is_one_line_and_exit_code_1(samples_reference, tmp_path):
    good = tmp_path / "samples.npz"
    good.write_bytes(samples_reference[1])
    truncated = truncated_copy(good, tmp_path / "truncated.npz")
    cmd = [sys.executable, "evaluations/evaluator.py", truncated, str(good), "--device", "cpu",
           "--random-weights-for-tests"]  # fmt: skip
    assert "truncated.npz" in one_line_error(cmd)


# --------------------------------------------------------------------------------------------
# Interrupts
# --------------------------------------------------------------------------------------------


def test_a_ctrl_c_while_exiting_is_one_line_and_exit_code_130(tmp_path):
    """A second Ctrl-C that lands after the run has saved and returned, in the libraries'
    atexit callbacks, exits at once with 130 and one line (no "Exception ignored" traceback)."""
    script = tmp_path / "slow_exit.py"
    script.write_text(
        "import atexit, sys, time\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from urepa.cli import run_main\n"
        "def teardown():\n"
        "    print('tearing down', flush=True)\n"
        "    time.sleep(60)\n"
        "def main():\n"
        "    atexit.register(teardown)  # a library's slow teardown\n"
        "    return 75\n"
        "run_main(main)\n"
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline() == "tearing down\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == "slow_exit.py: interrupted\n", err


# --------------------------------------------------------------------------------------------
# Bad inputs that raised tracebacks: one line, exit code 1
# --------------------------------------------------------------------------------------------


def test_garbage_encoder_weights_are_one_line_and_exit_code_1(toy_images, data_dir, tmp_path):
    garbage = tmp_path / "encoder.pt"
    garbage.write_bytes(random.Random(SEED).randbytes(4096))
    expected = f"could not read --enc-weights {garbage}: truncated, corrupt or not a weight file"
    flags = prepare_flags(toy_images, str(tmp_path / "data"), "--enc-weights", str(garbage))
    assert expected in one_line_error([sys.executable, "preprocessing/prepare.py", *flags])
    online = ["--encoder-mode", "online", "--enc-weights", str(garbage)]
    train = [sys.executable, "train.py", *argv(data_dir, tmp_path, "online", *online)]
    assert expected in one_line_error(train)


# --------------------------------------------------------------------------------------------
# Impossible sizes: refused before anything is allocated, saying what was asked and what is there
# --------------------------------------------------------------------------------------------


def test_more_samples_than_the_disk_holds_are_refused_before_sampling(
    samples_reference, tmp_path, monkeypatch
):
    ckpt, _ = samples_reference
    free = 1000  # bytes: less than 8 images of 64×64×3
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=free))
    with pytest.raises(ReportedError, match="--num-fid-samples 8 needs at least 96.0 KiB of disk"):
        generate.main(generate.parse_args(generate_flags(ckpt, tmp_path / "samples")))
    monkeypatch.undo()
    huge = [*generate_flags(ckpt, tmp_path / "samples"), "--num-fid-samples", "100000000000"]
    with pytest.raises(ReportedError, match=r"needs at least 1\.\d PiB of disk .* is available"):
        generate.main(generate.parse_args(huge))
    assert not (tmp_path / "samples").exists()


def test_a_model_larger_than_memory_is_refused_before_it_is_built(data_dir, tmp_path):
    huge = json.dumps({"hidden_size": 100_000_000, "depths": [1, 2, 1], "num_heads": 2})
    flags = argv(data_dir, tmp_path, "huge", "--model-config", huge)
    with pytest.raises(ReportedError, match=r"SiTDown with .* M parameters needs at least .* of "
                                            r"host memory .* is available"):  # fmt: skip
        run(*flags)
    assert not (tmp_path / "huge").exists()
