"""``vitbn models``: the presets with their parameter counts and FLOPs per image."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the model presets with parameters and FLOPs per image")
    parser.add_argument("--depth", type=int, default=None, help="override every preset's depth")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitbn.models import count_params, create_model, forward_flops, list_models

    overrides = {} if args.depth is None else {"depth": args.depth}
    header = f"{'model':<10} {'depth':>5} {'params':>10} {'fwd MFLOP/img':>14} {'train MFLOP/img':>16}  norms"
    print(header)
    print("-" * len(header))
    for name in list_models():
        model = create_model(name, **overrides)
        c = model.config
        norms = (
            f"embed={c.embed_norm} attn={c.attn_norm} ffn={c.ffn_norm} inner={c.ffn_inner_norm} final={c.final_norm}"
        )
        fwd, train = forward_flops(model) / 1e6, forward_flops(model, train=True) / 1e6
        print(f"{name:<10} {c.depth:>5} {count_params(model):>10,} {fwd:>14.2f} {train:>16.2f}  {norms}")
    return 0
