"""A grid PNG of classes or prompts, a row each, from a checkpoint with a sampler preset."""

import argparse
import os

import torch
from torchvision.utils import save_image

from samplers import VelocityOnly, euler_maruyama_sampler, euler_sampler
from urepa.checkpoints import trained_vae
from urepa.cli import DefaultsHelpFormatter, positive_int, run_main
from urepa.hub import load_pretrained
from urepa.prompts import grid_rows
from urepa.settings import PRESETS
from urepa.vae import load_vae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint or a name (docs/sharing.md)")
    p.add_argument("--classes", type=int, nargs="+", default=[0], help="labels: a row each")
    p.add_argument("--prompts", metavar="FILE", help="text-to-image: a prompt per line, a row each")
    p.add_argument("--per-class", type=positive_int, default=4, help="images per class")
    p.add_argument("--preset", choices=sorted(PRESETS), default="ablation", help="the sampler")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise")
    p.add_argument("--out", default="samples/grid.png", help="the grid PNG to write")
    return p.parse_args(argv)


@torch.no_grad()
def main(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(args.ckpt, device)  # rebuilt from the checkpoint alone
    net, rows, what = grid_rows(model, args.classes, args.prompts, device)  # rows: labels (R,)
    torch.manual_seed(args.seed)
    y = rows.repeat_interleave(args.per_class)  # (N,)
    z = torch.randn(len(y), *model.latent_shape, device=device)  # (N, C, h, w) at t = 1
    preset = dict(PRESETS[args.preset])
    sampler = euler_sampler if preset.pop("mode") == "ode" else euler_maruyama_sampler
    path = model.checkpoint_args.get("path_type", "linear")
    latents = sampler(VelocityOnly(net), z, y, **preset, path_type=path)
    images = load_vae(trained_vae(model) or "ema", device).decode(latents.float())  # in [-1, 1]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image((images + 1) / 2, args.out, nrow=args.per_class)
    print(f"wrote {args.out}: {what}, {args.per_class} each, preset {args.preset}")


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
