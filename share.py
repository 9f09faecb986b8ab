"""Share checkpoints and prepared datasets through the Hugging Face Hub (docs/sharing.md).

    python share.py export exps/RUN --out shared/RUN            # a run's export as a Hub folder
    python share.py push exps/RUN --repo ORG/NAME [--step N]    # to a model repository
    python share.py push-data data/imagenet256 --repo ORG/DATA  # to a dataset repository
    python share.py download repa-sit-xl-2                      # a checkpoint into the cache

Loading goes the other way through `--ckpt` (generate.py, sample.py, python -m analysis),
`urepa.hub.from_pretrained` and train.py's `--data-dir`.
"""

from __future__ import annotations

import argparse

from urepa.cli import DefaultsHelpFormatter, add_debug_arg, nonnegative_int, run_main
from urepa.hub import push_dataset, push_model, resolve_checkpoint
from urepa.model_card import build_model_folder


# fmt: off
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        description="Share checkpoints and prepared datasets through the Hugging Face Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a run's export as a checkpoint folder")
    push = commands.add_parser("push", help="publish a run's export to a model repository")
    for sub in (export, push):
        sub.add_argument("run_dir", help="the run directory (exps/NAME)")
        sub.add_argument("--step", type=nonnegative_int, default=None,
                         help="the exported step to share (default: the latest)")
        add_debug_arg(sub)
    export.add_argument("--out", required=True, help="a new folder for the checkpoint folder")
    push.add_argument("--training-state", action="store_true",
                      help="also upload the step's training checkpoint (optimiser state "
                           "included), under training_state/")
    data = commands.add_parser("push-data", help="publish a prepared dataset")
    data.add_argument("data_dir", help="a dataset written by preprocessing/prepare.py")
    add_debug_arg(data)
    fetch = commands.add_parser("download", help="fetch a checkpoint by name into the cache")
    fetch.add_argument("name", help="a release short name or ORG/NAME[@REVISION]")
    add_debug_arg(fetch)
    for sub in (push, data):
        sub.add_argument("--repo", required=True, help="the repository, ORG/NAME")
        sub.add_argument("--private", action="store_true", help="create it private")
        sub.add_argument("--dry-run", action="store_true",
                         help="list what would be uploaded, upload nothing")
    return parser.parse_args(argv)
# fmt: on


def main(args: argparse.Namespace) -> None:
    if args.command == "export":
        for path in build_model_folder(args.run_dir, args.out, args.step):
            print(path)
    elif args.command == "push":
        push_model(args.run_dir, args.repo, args.step, args.private, args.training_state,
                   args.dry_run)  # fmt: skip
    elif args.command == "push-data":
        push_dataset(args.data_dir, args.repo, args.private, args.dry_run)
    else:
        print(resolve_checkpoint(args.name))


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
