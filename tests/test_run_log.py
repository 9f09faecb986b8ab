"""urepa/run_log.py: durations, the time remaining, and the log line of one interval."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from urepa.run_log import (
    StepRate,
    append_jsonl,
    format_duration,
    format_metrics,
    read_jsonl,
    time_remaining,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (125, "2m05s"), (3600, "1h00m"), (3725, "1h02m"),
     (-3, "0s"), (90 * 3600, "90h00m")],
)  # fmt: skip
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


def test_time_remaining_counts_to_the_end_and_to_the_next_checkpoint():
    # 0.5 s/step at step 1000 of 4000, checkpoints every 1500: 3000 steps and 500 steps left.
    assert time_remaining(1000, 0.5, 4000, 1500) == (
        "eta 25m00s to step 4000, 4m10s to the next checkpoint"
    )
    # On a checkpoint step the next one is a full interval away; the last one is the end.
    assert time_remaining(3000, 0.5, 4000, 1500).endswith("8m20s to the next checkpoint")
    assert time_remaining(3999, 1.0, 4000, 1500) == "eta 1s to step 4000, 1s to the next checkpoint"


def load_swings(intervals: int, steps: int = 12) -> list[float]:
    """A synthetic clock: the seconds each log interval of `steps` steps takes on a shared
    machine whose load swings every few intervals (0.5 s/step, then 3.5 s/step, then 15)."""
    per_step = [0.5, 0.5, 3.5, 0.5, 15.0, 0.5, 0.5, 3.5]
    return [steps * per_step[i % len(per_step)] for i in range(intervals)]


def test_the_time_left_is_steady_while_the_load_swings():
    """One interval's rate would put the time left anywhere in a 30× range; the rate over a
    10-minute window stays within ±25 % of the true mean, and is that mean, computed here."""
    rate, now, step, lefts, one_interval = StepRate(window=600), 0.0, 0, [], []
    rate.add(now, step)
    for seconds in load_swings(160):
        now, step = now + seconds, step + 12
        rate.add(now, step)
        lefts.append((2400 - step) * rate.sec_per_step if step < 2400 else None)
        one_interval.append(seconds / 12)
    true_mean = sum(load_swings(8)) / (8 * 12)  # one whole cycle of the swings
    settled = [left / (2400 - 12 * (i + 1)) for i, left in enumerate(lefts[20:150], 20)]
    assert max(one_interval) / min(one_interval) == 30
    assert all(0.75 * true_mean <= r <= 1.25 * true_mean for r in settled)
    # The window: the oldest point kept is the last one at least 600 s before the newest.
    (t0, s0), (t1, s1) = rate.points[0], rate.points[-1]
    assert t1 - t0 >= 600 and t1 - rate.points[1][0] < 600
    assert rate.sec_per_step == pytest.approx((t1 - t0) / (s1 - s0))


def test_the_rate_follows_a_lasting_change_within_one_window():
    rate = StepRate(window=100)
    rate.add(0.0, 0)
    for k in range(1, 11):  # 1 s/step for 100 s
        rate.add(10.0 * k, 10 * k)
    assert rate.sec_per_step == 1.0
    for k in range(1, 6):  # then 2 s/step: after 100 s, the window holds only the new rate
        rate.add(100 + 20.0 * k, 100 + 10 * k)
    assert rate.sec_per_step == 2.0
    assert rate.describe() == "at 2 s/step (mean of the last 1m40s)"


def test_a_log_line_lists_the_metrics():
    line = format_metrics(6, {"epoch": 1.5, "total": 0.51234, "skipped": 0.0, "lr": 1e-4})
    assert line == "step 6 | epoch 1.5 | total 0.5123 | skipped 0.0 | lr 0.0001"


def test_a_terminal_shows_a_progress_bar_and_a_pipe_does_not(tmp_path):
    """tqdm draws only when stderr is a terminal (here a pseudo-terminal)."""
    code = (
        "import types\nfrom urepa import trainer\n"
        "schedule = types.SimpleNamespace(max_train_steps=5)\n"
        "settings = types.SimpleNamespace(schedule=schedule)\n"
        "main = types.SimpleNamespace(is_main_process=True)\n"
        "state = types.SimpleNamespace(settings=settings, step=2, accelerator=main)\n"
        "with trainer.progress_bar(state) as bar:\n"
        "    bar.update()\n"
        "    print('disabled' if bar.disable else 'shown')\n"
    )
    piped = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert piped.stdout.strip() == "disabled", piped.stderr
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=child, timeout=120)  # fmt: skip
    os.close(child)
    drawn = b""
    while chunk := read_or_eof(main):
        drawn += chunk
    os.close(main)
    assert shown.stdout.decode().strip() == "shown"
    assert b"training" in drawn and b"3/5" in drawn


def read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # a pseudo-terminal whose other end is closed reads EIO at the end
        return b""


def test_a_row_after_one_cut_short_by_a_kill_starts_its_own_line(tmp_path):
    """metrics.jsonl and eval.jsonl: the row a kill cut stays one damaged line, the next row
    reads back whole."""
    path = str(tmp_path / "eval.jsonl")
    append_jsonl(path, {"step": 1, "fid": 9.5})
    with open(path, "a") as f:
        f.write('{"step": 2, "fi')  # killed mid-write
    append_jsonl(path, {"step": 3, "fid": 7.25})
    rows, damaged = read_jsonl(path)
    assert rows == [{"step": 1, "fid": 9.5}, {"step": 3, "fid": 7.25}] and damaged == [2]
    with open(path) as f:
        assert f.read().count("\n") == 3
