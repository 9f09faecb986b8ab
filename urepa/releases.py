"""Checkpoints that other codebases released at a URL, by a short name (`generate.py --ckpt
repa-sit-xl-2`): downloaded once into the cache, resumably (HTTP Range), and checked by SHA-256.

A release's digest is recorded in `RELEASES` where one is published. Where none is (REPA's
SiT-XL/2: its README and code publish the URL only), the first download is trusted: its SHA-256
is printed and written beside the file (`FILE.sha256`, as for our checkpoints), and every later
load is checked against it (docs/sharing.md). A digest that does not match is refused.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from huggingface_hub import constants as hub_constants
from tqdm import tqdm

from urepa.checkpoints import write_checksum
from urepa.utils import InputError, ReportedError, file_sha256

logger = logging.getLogger("u-repa.releases")


@dataclass(frozen=True)
class Release:
    url: str
    filename: str  # its name in the cache
    sha256: str | None  # None: no digest is published; the first download's is kept (above)
    model: str  # the registry name it loads into
    about: str


RELEASES: dict[str, Release] = {
    # REPA's generate.py (utils.download_model) fetches this file when --ckpt is not given; its
    # README: "the SiT-XL/2 checkpoint (trained for 4M iterations) used in the final
    # evaluation", i.e. FID 1.42 (REPA Table 10: SDE 250 steps, cfg 1.8 on [0, 0.7]). A bare
    # EMA state dict. Neither its SHA-256 nor its size is published.
    "repa-sit-xl-2": Release(
        url="https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
        "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0",
        filename="repa-sit-xl-2-256-4m.pt",
        sha256=None,
        model="SiT-XL/2",
        about="REPA's SiT-XL/2 + REPA, ImageNet 256x256, 4M iterations (REPA's FID 1.42)",
    ),
}
BLOCK = 1 << 20


def releases_dir() -> str:
    """Where releases are kept: beside the Hugging Face cache ($HF_HOME/u-repa/releases)."""
    return os.path.join(hub_constants.HF_HOME, "u-repa", "releases")


def fetch_release(name: str, cache_dir: str | None = None) -> str:
    """The local path of release `name`, downloaded first if it is not in the cache."""
    release = RELEASES[name]
    path = os.path.join(cache_dir or releases_dir(), release.filename)
    if os.path.exists(path):
        return path  # checked against PATH.sha256 when it is loaded
    if hub_constants.HF_HUB_OFFLINE:
        raise InputError(
            f"{name} is not downloaded yet ({path}) and HF_HUB_OFFLINE is set: run once with "
            f"network access, or download {release.url} elsewhere and pass the file to --ckpt"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    download_resumable(release.url, part, name)
    digest = file_sha256(part)
    if release.sha256 is not None and digest != release.sha256:
        os.remove(part)
        raise InputError(
            f"the download of {name} has SHA-256 {digest[:16]}..., the release's is "
            f"{release.sha256[:16]}...: it was deleted; run again to download it anew (if this "
            f"repeats, the file at {urllib.parse.urlsplit(release.url).netloc} has changed)"
        )
    write_checksum(path, digest)  # before the rename: the file never exists without it
    os.replace(part, path)
    if release.sha256 is None:
        logger.warning(
            f"{name}: no published SHA-256 to check the download against; its "
            f"SHA-256 {digest} is kept in {path}.sha256, checked at every load"
        )
    return path


def download_resumable(url: str, part: str, name: str) -> None:
    """Download `url` into `part`, continuing a partial `part` with an HTTP Range request (a
    server that ignores it sends the whole file, which then replaces the partial one)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts at the end: nothing is missing
            return
        raise InputError(f"could not download {name}: {url} answered HTTP {err.code} "
                         f"({err.reason}); the release may have moved") from err  # fmt: skip
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise InputError(
            f"cannot reach {urllib.parse.urlsplit(url).netloc} to download {name} ({reason}): "
            "run again with network access (a partial download resumes), or download the file "
            "elsewhere and pass its path to --ckpt"
        ) from err
    with response:
        start = resumed_from(response, have)
        total = content_total(response, start)
        copy_body(response, part, start, total, name)


def resumed_from(response: http.client.HTTPResponse, have: int) -> int:
    """The byte the response's body starts at: `have` for a 206 that continues the partial
    file, 0 when the server sent the whole file."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return have if match and int(match[1]) == have else 0


def content_total(response: http.client.HTTPResponse, start: int) -> int | None:
    length = response.headers.get("Content-Length")
    return start + int(length) if length is not None else None


def copy_body(
    response: http.client.HTTPResponse, part: str, start: int, total: int | None, name: str
) -> None:
    """Append the response's body to `part` from byte `start`; a connection that ends before
    `total` bytes leaves `part` to be resumed."""
    with open(part, "r+b" if start else "wb") as f:
        f.seek(start)
        f.truncate()
        progress = tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=name,
                        disable=None)  # fmt: skip
        try:
            while block := response.read(BLOCK):
                f.write(block)
                progress.update(len(block))
        except (OSError, http.client.HTTPException) as err:
            got = f.tell()
            raise ReportedError(
                f"the download of {name} was interrupted after {got} of {total or '?'} bytes "
                f"({err}): run the same command again to resume it"
            ) from err
        finally:
            progress.close()
        got = f.tell()
    if total is not None and got != total:
        raise ReportedError(f"the download of {name} was interrupted after {got} of {total} "
                            "bytes (the connection closed): run the same command again to resume "
                            "it")  # fmt: skip
