"""run_log.py: durations, the time remaining, and the log line of one interval."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from run_log import format_duration, format_metrics, time_remaining

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


def test_a_log_line_lists_the_metrics():
    line = format_metrics(6, {"epoch": 1.5, "total": 0.51234, "skipped": 0.0, "lr": 1e-4})
    assert line == "step 6 | epoch 1.5 | total 0.5123 | skipped 0.0 | lr 0.0001"


def test_a_terminal_shows_a_progress_bar_and_a_pipe_does_not(tmp_path):
    """tqdm draws only when stderr is a terminal (here a pseudo-terminal)."""
    code = (
        "import types, trainer\n"
        "args = types.SimpleNamespace(max_train_steps=5)\n"
        "main = types.SimpleNamespace(is_main_process=True)\n"
        "state = types.SimpleNamespace(args=args, step=2, accelerator=main)\n"
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
