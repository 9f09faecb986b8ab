"""The FID Inception network: torch-fidelity's TF1-matched InceptionV3 plus ADM's sFID tap.

torch-fidelity's `FeatureExtractorInceptionV3` reproduces the 2015 TensorFlow graph that ADM's
evaluator runs: TF1 bilinear resize to 299 (`src = dst·in/out`, no half-pixel centres), then
(x − 128)/128, TF's pooling quirks, and the 2048-d pool features. What it lacks is added here:
ADM's sFID features (TF's `mixed_6/conv`, tapped with a forward hook), weight loading that is safe
(`weights_only=True`) and checked (SHA-256), and random weights of the same layout for tests.
"""

from __future__ import annotations

import argparse
import hashlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from evaluations.commands import Unavailable, positive_int
from evaluations.metrics import GaussianAccumulator

# The PyTorch port of the 2015 TF weights, as pytorch-fid and torch-fidelity use (95,628,359 B).
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

POOL_DIM = 2048  # pool_3: FID, precision/recall, and the input of the IS logits
NUM_CLASSES = 1008  # the 2015 graph's softmax (1000 ImageNet classes plus unused ones)
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels ...
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # ... on its 17×17 grid: 2023 numbers for sFID


def default_weights_path() -> Path:
    """Where the weights are cached: torch hub's checkpoint folder, shared with pytorch-fid."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]


def fetch_weights(path: str | Path | None = None) -> Path:
    """The weights file: `path` if given, else the cached copy, downloaded (and checked) first."""
    if path is not None:
        return _user_weights(Path(path))
    cached = default_weights_path()
    if not cached.exists():
        _download(cached)
    elif _sha256(cached) != WEIGHTS_SHA256:
        raise Unavailable(
            f"{cached} is not the Inception weights file (SHA-256 mismatch, perhaps "
            "an interrupted copy); delete it and run again"
        )
    return cached


def _user_weights(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found; download {WEIGHTS_URL}")
    if _sha256(path) != WEIGHTS_SHA256:
        warnings.warn(
            f"{path} is not the reference Inception weights file (SHA-256 differs from "
            f"{WEIGHTS_SHA256}); metrics will not be comparable with published ones",
            stacklevel=3,
        )
    return path


def _download(destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and moves it into place only once the hash matches.
        torch.hub.download_url_to_file(WEIGHTS_URL, str(destination), hash_prefix=WEIGHTS_SHA256)
    except OSError as error:  # no network: URLError and socket errors are OSErrors
        raise Unavailable(
            f"could not download the Inception weights ({error}). On a machine with internet "
            f"access download {WEIGHTS_URL} (SHA-256 {WEIGHTS_SHA256}), then either pass "
            f"--inception-weights PATH or copy the file to {destination}"
        ) from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, unpickled safely (tensors only, no code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """TEST ONLY: random weights with the keys and shapes of the real file.

    The real file is a state dict of torchvision's `Inception3` (1008 classes, no aux head), so
    that model, built on the meta device, gives the layout without allocating or initialising it.
    Convolutions get He-normal weights so activations keep their scale through the ~90 layers.
    """
    from torchvision.models import inception_v3

    with torch.device("meta"):
        layout = inception_v3(
            weights=None, aux_logits=False, num_classes=NUM_CLASSES, init_weights=False
        ).state_dict()
    generator = torch.Generator().manual_seed(seed)
    return {
        key: _random_tensor(key, value.shape, value.dtype, generator)
        for key, value in layout.items()
    }


def _random_tensor(
    key: str, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    if key.endswith((".bn.weight", ".bn.running_var")):
        return 0.5 + torch.rand(shape, generator=generator)  # positive, around 1
    if key.endswith(("bias", "running_mean")):
        return 0.1 * torch.randn(shape, generator=generator)
    fan_in = int(np.prod(shape[1:]))
    scale = (2 / fan_in) ** 0.5 if len(shape) == 4 else fan_in**-0.5  # conv (ReLU follows), fc
    return scale * torch.randn(shape, generator=generator)


def _torch_fidelity_inception(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    # torch-fidelity's constructor fetches weights itself: from its own URL without a hash check,
    # or from a path with torch.load(weights_only=False), which can run code hidden in the file.
    # Standing in for its downloader hands it the state dict loaded safely instead.
    with mock.patch.object(tfi, "load_state_dict_from_url", return_value=state_dict):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    net.load_state_dict(state_dict, strict=True)  # strict by our say-so, not the library default
    return net


class InceptionFeatures(nn.Module):
    """uint8 (N, H, W, 3) images → ADM's pool features (N, 2048) and sFID features (N, 2023)."""

    pool_dim, spatial_dim = POOL_DIM, SPATIAL_DIM

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.net = _torch_fidelity_inception(state_dict)
        self._spatial: torch.Tensor | None = None
        # TF's `mixed_6/conv` is Mixed_6d's 1×1 branch after its BN and ReLU: this module's output.
        self.net.get_submodule("Mixed_6d.branch1x1").register_forward_hook(self._keep_spatial)

    def _keep_spatial(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)

    @property
    def _fc_weight(self) -> torch.Tensor:
        """(1008, 2048) weight of the final fc layer (the IS logits' projection)."""
        return self.net.get_parameter("fc.weight")

    @property
    def device(self) -> torch.device:
        """Where the network's weights are, and so where its inputs must go."""
        return self._fc_weight.device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, H, W, 3) images → pool features (N, 2048), sFID features (N, 2023)."""
        (pool,) = self.net(images.permute(0, 3, 1, 2))  # torch-fidelity takes NCHW; (N, 2048)
        # The forward hook on Mixed_6d's 1×1 branch has just set it.
        assert self._spatial is not None, "the Mixed_6d.branch1x1 hook did not run"
        # ADM flattens TF's NHWC tensor, so the 2023 numbers run over H, then W, then C.
        spatial = self._spatial.permute(0, 2, 3, 1).flatten(1)  # (N, 17·17·7)
        self._spatial = None
        return pool, spatial

    def class_probabilities(self, pool: torch.Tensor) -> torch.Tensor:
        """(N, 1008) softmax of `pool @ fc.weightᵀ`: ADM's IS logits leave out the fc bias."""
        return torch.softmax(pool @ self._fc_weight.T, dim=1)


class TinyInceptionForTests(nn.Module):
    """TEST ONLY: InceptionFeatures' interface at toy sizes (pool 16, sFID 12, 10 classes), random
    weights; a CPU runs it in microseconds and its Fréchet distances in milliseconds, where the
    real layout takes seconds per image and per square root. Its numbers mean nothing."""

    pool_dim, spatial_dim, num_classes = 16, 12, 10

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 3, 3, stride=2, padding=1)  # 32 px -> 16 px
            self.pool_proj = nn.Linear(3 * 4 * 4, self.pool_dim)
            self.fc = nn.Linear(self.pool_dim, self.num_classes, bias=False)
            # Features that vary from image to image, and peaked class probabilities (IS > 1).
            nn.init.normal_(self.conv.weight, std=0.5)
            nn.init.normal_(self.pool_proj.weight, std=1.0)
            nn.init.normal_(self.fc.weight, std=2.0)
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 128 - 1  # (N, 3, H, W)
        x = torch.relu(self.conv(nn.functional.interpolate(x, size=(32, 32), mode="bilinear")))
        grid = nn.functional.adaptive_avg_pool2d(x, 4)  # (N, 3, 4, 4)
        spatial = grid.permute(0, 2, 3, 1).flatten(1)[:, : self.spatial_dim]  # (N, 12)
        return torch.tanh(self.pool_proj(grid.flatten(1))), spatial  # (N, 16), (N, 12)

    def class_probabilities(self, pool: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(pool), dim=1)


def build_inception(
    weights: str | Path | None = None, *, random_weights_for_tests: bool = False, seed: int = 0
) -> InceptionFeatures:
    """The reference network from `weights` (else the cache or a download), in eval mode.

    `random_weights_for_tests=True` builds it with `random_state_dict(seed)` instead, through the
    same strict loading path; its numbers mean nothing, it exists for tests only.
    """
    if random_weights_for_tests:
        if weights is not None:
            raise ValueError("give either Inception weights or random_weights_for_tests, not both")
        state_dict = random_state_dict(seed)
    else:
        state_dict = load_weights(fetch_weights(weights))
    return InceptionFeatures(state_dict).eval().requires_grad_(False)


def add_inception_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the network and where it runs, shared by both commands."""
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per Inception batch"
    )
    parser.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)"
    )
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache, "
        "downloaded on first use)",
    )
    # Test only: random Inception weights, so the pipeline runs offline. The numbers mean nothing.
    parser.add_argument("--random-weights-for-tests", action="store_true", help=argparse.SUPPRESS)


def inception_from_args(args: argparse.Namespace) -> InceptionFeatures:
    """The network chosen by `add_inception_args`' flags, on its device."""
    if args.random_weights_for_tests:
        print("WARNING: random Inception weights (test only): the results mean nothing")
    net = build_inception(
        args.inception_weights, random_weights_for_tests=args.random_weights_for_tests
    )
    return net.to(resolve_device(args.device))


def resolve_device(device: str | None) -> torch.device:
    """`device`, or CUDA when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("--device cuda asked for, but PyTorch sees no GPU; use --device cpu")
    return resolved


@contextmanager
def tf32_disabled() -> Iterator[None]:
    """Full float32 matmuls and convolutions (ADM's TensorFlow used no TF32); restored after."""
    # (owner, attribute, value inside the block)
    knobs: list[tuple[object, str, str | bool]]
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # PyTorch ≥ 2.9
        # Mixing this API with the legacy allow_tf32 flags raises, so use one or the other.
        # torch.backends.cudnn swaps itself for a CudnnModule in sys.modules at import; `conv`
        # is a class attribute there, but the annotations torch leaves on the module for type
        # checkers omit it, hence the ignore.
        knobs = [
            (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
            (torch.backends.cudnn.conv, "fp32_precision", "ieee"),  # type: ignore[attr-defined]
        ]
    else:
        knobs = [
            (torch.backends.cuda.matmul, "allow_tf32", False),
            (torch.backends.cudnn, "allow_tf32", False),
        ]
    saved = [getattr(owner, name) for owner, name, _ in knobs]
    try:
        for owner, name, value in knobs:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(knobs, saved, strict=True):
            setattr(owner, name, value)


@dataclass
class Features:
    """What the metrics need from one image set."""

    pool: np.ndarray | None  # (N, 2048) float32, when kept (IS, precision/recall)
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray  # (2023,)
    sigma_s: np.ndarray  # (2023, 2023)


@torch.inference_mode()
def extract_features(
    net: InceptionFeatures,
    batches: Iterable[np.ndarray],
    num_images: int,
    *,
    keep_pool: bool = True,
    desc: str = "images",
) -> Features:
    """Run uint8 (B, H, W, 3) batches through `net` (on its device) with a progress bar."""
    pool_stats, spatial_stats = GaussianAccumulator(), GaussianAccumulator()
    pools = []
    with tqdm(total=num_images, desc=desc, unit="img") as bar:
        for batch in batches:
            pool, spatial = net(torch.from_numpy(batch).to(net.device))
            pool_stats.update(pool)
            spatial_stats.update(spatial)
            if keep_pool:
                pools.append(pool.cpu().numpy())
            bar.update(len(batch))
    mu, sigma = pool_stats.mean_and_covariance()
    mu_s, sigma_s = spatial_stats.mean_and_covariance()
    return Features(np.concatenate(pools) if keep_pool else None, mu, sigma, mu_s, sigma_s)
