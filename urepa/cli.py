"""Command-line pieces shared by the entry points (train.py, generate.py, preprocessing/prepare.py,
bench/): typed flag validators, and the flags that several scripts take (--vae, --enc-type and
--enc-weights, --compile and --sdpa-backend), each defined once so that its default, its parsing
and its help text are the same everywhere.

A validator is an argparse `type`: a bad value stops the parser with the flag's name and the
reason. Checks between flags stay in each script's own `validate_args`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

from models import TEXT_TO_IMAGE_MODELS, canonical_name
from models.layers import SDPA_BACKENDS
from urepa.encoders import ENCODER_STANDIN, check_resolution, parse_encoder_list
from urepa.speed import resolve_compile
from urepa.utils import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_STOPPED, ReportedError
from urepa.vae import VAE_IDS, VAE_PIXELS, VAE_PIXELS_2X, VAE_STANDIN

FlagGroup = argparse._ActionsContainer  # a parser, or one of its argument groups

#################################################################################
#                               Typed validators                                #
#################################################################################


def _checked(kind: type, valid: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse `type`: parse `kind`, then require `valid(value)` ("must be {what}").

    A float must also be finite: `float()` reads "nan" and "inf", which would pass some range
    checks (inf > 0) and slip past every one as NaN, only to poison the run much later."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
nonnegative_float = _checked(float, lambda v: v >= 0, ">= 0")
unit_interval = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
unit_closed = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def any_model_name(text: str) -> str:
    """A registry name (SiTDown-XL/2, alias SiT↓-XL/2; MMDiT-d24/2 for text-to-image) in its
    canonical spelling, or a bare class name (SiT, SiTDown, MMDiT) that --model-config sizes."""
    try:
        return canonical_name(text)
    except KeyError as err:
        raise argparse.ArgumentTypeError(err.args[0]) from None


def model_name(text: str) -> str:
    """`any_model_name` of a class-conditional model: the commands that take only those
    refuse a text-to-image name here, before any work."""
    name = any_model_name(text)
    if name in TEXT_TO_IMAGE_MODELS:
        raise argparse.ArgumentTypeError(
            f"{name} is a text-to-image model (conditioned on caption features); this command "
            "takes the class-conditional SiT and SiT↓ models"
        )
    return name


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def parse_checked(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    check: Callable[[argparse.Namespace], None],
) -> argparse.Namespace:
    """Parse `argv`, then run the checks between flags, `check(args)`: a ValueError it raises
    stops the parser like a bad flag does (usage, the message, exit code 2)."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except ValueError as err:
        parser.error(str(err))
    return args


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless there is nothing to say: no default
    (None, a required flag, a switch that is off) or a help text that names its default. A
    default of 0 is shown: it equals False, so the test is by identity."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        absent = action.default is None or action.default is False
        if absent or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


class RawDescriptionDefaultsHelpFormatter(
    argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter
):
    """DefaultsHelpFormatter that prints the description as written (a module docstring)."""


#################################################################################
#                            Running an entry point                             #
#################################################################################


def add_debug_arg(group: FlagGroup) -> None:
    group.add_argument("--debug", action="store_true",
                       help="show the traceback of an expected failure too")  # fmt: skip


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run an entry point's `main` and exit: with the code it returns if that is an int, else 0.

    An expected failure (`ReportedError`, or an OSError such as a missing file or a full disk)
    prints `PROGRAM: error: MESSAGE` and exits with its code (EXIT_ERROR; a run stopped by a
    signal prints `PROGRAM: stopped: MESSAGE` and exits EXIT_STOPPED); with --debug its
    traceback comes first. A Ctrl-C that the program does not handle exits EXIT_INTERRUPTED.
    Anything else is a bug and shows its traceback.
    """
    program = os.path.basename(sys.argv[0]) or "u-repa"
    if program == "__main__.py":  # python -m PACKAGE: name the package
        program = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0])))
    try:
        code = main()
    except (ReportedError, OSError) as err:
        if "--debug" in sys.argv[1:]:
            traceback.print_exc()
        exit_code: int = getattr(err, "exit_code", EXIT_ERROR)
        kind = "stopped" if exit_code == EXIT_STOPPED else "error"
        print(f"{program}: {kind}: {err}", file=sys.stderr)
        exit_now_on_ctrl_c(program)
        sys.exit(exit_code)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        exit_now_on_ctrl_c(program)
        sys.exit(EXIT_INTERRUPTED)
    exit_now_on_ctrl_c(program)
    sys.exit(code if isinstance(code, int) else 0)


def exit_now_on_ctrl_c(program: str) -> None:
    """From here on, a Ctrl-C ends the process at once with EXIT_INTERRUPTED and one line.

    The exit runs the libraries' atexit callbacks (process groups, trackers, loggers): Python's
    default handler would raise KeyboardInterrupt inside one of them and print its traceback
    ("Exception ignored in atexit callback"). Everything worth keeping is saved by then."""

    def exit_interrupted(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(Exception):  # what was printed still reaches a pipe
            sys.stdout.flush()
        sys.stderr.write(f"{program}: interrupted\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, exit_interrupted)


#################################################################################
#                         Flags that several scripts take                       #
#################################################################################

# What --vae accepts, as `vae.load_vae` reads it.
VAE_CHOICES = (
    ", ".join(f"{name} ({repo})" for name, repo in VAE_IDS.items())
    + f", a local diffusers folder, {VAE_PIXELS} (identity: pixel space), {VAE_PIXELS_2X} "
    f"(pixel space at half the resolution: the quickstart's stand-in) or {VAE_STANDIN} (test "
    "stand-in)"
)


def vae_help(purpose: str) -> str:
    """--vae's help text; `purpose` says what the script uses the VAE for."""
    return f"SD-VAE that {purpose}: {VAE_CHOICES}"


DEFAULT_ENCODER = "dinov2-vit-b"  # REPA's and U-REPA's


# The flag tables below are formatted by hand, one flag per line or two, as in REPA.
# fmt: off
def add_vae_args(group: FlagGroup, purpose: str, recorded_in: str | None = None) -> None:
    """--vae; `recorded_in` names what records the VAE to use when it is not given (the
    dataset, the checkpoint), else the default is ema."""
    if recorded_in is None:
        group.add_argument("--vae", default="ema", help=vae_help(purpose))
        return
    group.add_argument("--vae", default=None,
                       help=f"{vae_help(purpose)}; default: the one {recorded_in} records")


def add_encoder_args(group: FlagGroup, none_means: str, default_note: str | None = None) -> None:
    """--enc-type and --enc-weights; `none_means` says what --enc-type none does here;
    `default_note`, where --enc-type defaults to what the data holds, says what (else the
    default is dinov2-vit-b)."""
    group.add_argument("--enc-type", default=None if default_note else DEFAULT_ENCODER,
                       help="representation encoder(s), comma-separated, REPA's names: "
                            "dinov2-vit-{s,b,l,g}[_reg], dinov1-vit-b, mocov3-vit-{s,b,l}, "
                            "mae-vit-l, jepa-vit-h, clip-vit-L, siglip-vit-L; also siglip2-vit-L, "
                            "dinov3-vit-{s,b,l}, or <family>-vit-tiny-random (test stand-ins, e.g. "
                            f"{ENCODER_STANDIN}); 'none' (any case) {none_means}" +
                            (f"; default: {default_note}" if default_note else ""))
    group.add_argument("--enc-weights", default=None,
                       help="weights of each encoder, comma-separated, one per --enc-type entry "
                            "(an empty entry: the default): a local file (the authors' release "
                            "checkpoint or a timm state dict) or a timm pretrained name; read "
                            "where the encoders run (prepare.py, train.py --encoder-mode online); "
                            "without it timm downloads them (MoCo v3 needs a file)")


def add_speed_args(group: FlagGroup, sampling: bool = False) -> None:
    """--compile and --sdpa-backend: how fast the model runs, not what it computes; `sampling`
    adds generate.py's --cuda-graphs and --bf16-weights."""
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (default: on where CUDA is available, off "
                            "on CPUs); the first steps or batches pay for the compilation, whose "
                            "time is printed")
    group.add_argument("--sdpa-backend", choices=SDPA_BACKENDS, default="auto",
                       help="attention kernel of scaled_dot_product_attention: PyTorch's choice, "
                            "or only flash, efficient (memory-efficient), cudnn or math")
    if not sampling:
        return
    group.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                       help="with --compile on a GPU: compile the whole model and replay it "
                            "from CUDA graphs, one per batch shape (torch.compile's "
                            "reduce-overhead); off: each block compiled, no CUDA graphs")
    group.add_argument("--bf16-weights", action=argparse.BooleanOptionalAction, default=True,
                       help="with --precision bf16: cast the matmul and convolution weights to "
                            "bf16 once instead of autocast casting them at every step (the same "
                            "numbers)")


def resolve_speed_args(args: argparse.Namespace, training: bool = False) -> None:
    """--compile without --compile or --no-compile: on where CUDA is available (for training,
    not on a torch whose compiled gradients are known to be wrong, where --compile is refused)."""
    args.compile = resolve_compile(args.compile, training)
# fmt: on


#################################################################################
#                             Parsing the encoder list                          #
#################################################################################


def encoder_list(enc_type: str) -> list[str]:
    """--enc-type -> encoder names, each known and none twice; 'none' (any case) -> []."""
    if enc_type.lower() == "none":
        return []
    names = parse_encoder_list(enc_type)  # ValueError on an unknown name
    if len(set(names)) != len(names):
        raise ValueError("--enc-type lists an encoder twice")
    return names


def encoder_weights(enc_weights: str | None, encoders: list[str]) -> list[str | None]:
    """--enc-weights -> the local weight file of each encoder (None: the pretrained download)."""
    if not enc_weights:
        return [None] * len(encoders)
    paths: list[str | None] = list(enc_weights.split(","))
    if len(paths) != len(encoders):
        raise ValueError("--enc-weights needs one path per encoder of --enc-type")
    return paths


def parse_encoder_args(args: argparse.Namespace) -> None:
    """Set `args.encoders` from --enc-type and check --enc-weights and --resolution against it
    (ValueError)."""
    args.encoders = encoder_list(args.enc_type)
    encoder_weights(args.enc_weights, args.encoders)
    for name in args.encoders:
        check_resolution(name, args.resolution)
