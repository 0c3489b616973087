"""The demo model at one learning rate and one seed: what `ckptd sweep` runs in
README's "Is it better, or is it the seed?".

    python examples/lr_seeds.py --lr 3e-3 --seed 0 [--steps 60]
"""

from __future__ import annotations

import argparse

import ckptd_client as ckptd

from ckptd.demo import train

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--seed", type=int, required=True)
parser.add_argument("--steps", type=int, default=60)
args = parser.parse_args()

with ckptd.init(project="demo", config={"lr": args.lr, "seed": args.seed},
                seed=args.seed) as run:
    train(run, args.steps, seed=args.seed, ckpt_every=args.steps, lr=args.lr)
