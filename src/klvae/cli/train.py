"""``klvae train CONFIG``: train or fine-tune an AutoencoderKL from a TOML config (resumes when checkpoints exist).

Data parallel: ``torchrun --nproc_per_node N -m klvae.cli train CONFIG`` (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune an AutoencoderKL from a TOML config", description=__doc__)
    p.add_argument("config", help="training config (TOML); see configs/ and docs/training.md")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch", help="which trainer runs the config")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: optim.max_steps)")
    p.add_argument("--output-dir", default=None, help="override train.output_dir")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if checkpoints exist")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="after training, write the final (EMA) weights to DIR with save_pretrained")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from klvae.train.config import load_train_config

    overrides = {"train": {"output_dir": args.output_dir}} if args.output_dir else None
    config = load_train_config(args.config, overrides)
    if args.backend == "jax":
        from klvae.flax.train.trainer import Trainer as JaxTrainer

        trainer = JaxTrainer(config, resume=not args.no_resume)
        trainer.fit(args.max_steps)
        if args.export:
            trainer.export(args.export)
        return 0
    from klvae.torch.train.trainer import Trainer

    with Trainer(config, resume=not args.no_resume) as trainer:
        trainer.fit(args.max_steps)
        if args.export and trainer.is_main:
            trainer.eval_model().save_pretrained(args.export)
            print(f"exported the model to {args.export}")
    return 0
