"""Stopping on a signal with several processes: they agree on the stop at the same step, and
meet in a collective only every `check_every` steps (no per-step host barrier)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from urepa.trainer import StopRequest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agree(rank: int, world: int, port: int, signalled_at: int, results) -> None:
    """Steps 1..12 with check_every 4; process 1 alone gets the signal after `signalled_at`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    collectives = 0
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        nonlocal collectives
        collectives += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        stop = StopRequest(check_every=4)
        stopped_at = None
        for step in range(1, 13):
            if rank == 1 and step == signalled_at:
                stop.requested = True  # what the signal handler sets
            if stop(step):
                stopped_at = step
                break
        results[rank] = (stopped_at, collectives)
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


def test_processes_stop_at_the_same_step_and_meet_only_every_k_steps():
    results = mp.Manager().dict()
    mp.spawn(agree, args=(2, free_port(), 5, results), nprocs=2, join=True)
    # the signal after step 5 is agreed at step 8, the next check; 2 collectives (steps 4, 8)
    assert dict(results) == {0: (8, 2), 1: (8, 2)}


def test_one_process_reads_its_flag_at_every_step():
    stop = StopRequest(check_every=4)
    assert not stop(1)
    stop.requested = True
    assert stop(2)
