"""urepa/utils.py: atomic writes leave the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from urepa.utils import atomic_write, write_json


@pytest.fixture
def restore_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
    "umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)], ids=["022", "027", "002"]
)
def test_atomic_write_gives_the_mode_of_open(tmp_path, restore_umask, umask, expected):
    os.umask(umask)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"data")

    atomic_write(str(tmp_path / "a.bin"), write)
    with open(tmp_path / "plain.bin", "wb") as f:  # what the same process gets without atomic_write
        f.write(b"data")
    assert mode(tmp_path / "a.bin") == mode(tmp_path / "plain.bin") == expected
    write_json(str(tmp_path / "b.json"), {"x": 1})
    assert mode(tmp_path / "b.json") == expected
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.json", "plain.bin"]  # no temporaries left
