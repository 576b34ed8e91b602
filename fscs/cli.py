"""`fscs` command line: parse arguments and dispatch to one stage; no work is done here."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fscs.errors import FSCSError

logger = logging.getLogger("fscs")

EXAMPLES = {
    "shards": "fscs shards synth --out data/synthetic-5i",
    "train": "torchrun --nproc_per_node=2 -m fscs train --config configs/default.yaml name=weak train.regime=weak",
    "bench": "fscs bench --run-dir runs/weak bench.settings=[1w1s,2w1s] bench.episodes=1000",
    "demo": "fscs demo --out runs/demo",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fscs", description="Weakly-supervised few-shot classification & segmentation (CST) harness.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {v}" for v in EXAMPLES.values()),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="{shards,train,bench,demo}")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    sh = add("shards", "Write WebDataset shards (+ index.json) from a dataset.")
    shsub = sh.add_subparsers(dest="source", required=True)
    syn = shsub.add_parser("synth", help="the offline synthetic-5i dataset (20 classes, 4 folds)",
                           epilog="example:\n  fscs shards synth --out data/synthetic-5i",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    syn.add_argument("--out", required=True, type=Path, help="output shard directory")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--num-images", type=int, default=6000)
    syn.add_argument("--size", type=int, default=128, help="image side in pixels")
    syn.add_argument("--workers", type=int, default=2)

    tr = add("train", "Train the CST head (run under torchrun for several processes).")
    tr.add_argument("--config", type=Path, default=None, help="YAML config (see configs/)")
    tr.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=5e-4")

    be = add("bench", "Evaluate a trained run on index-seeded FS-CS episodes.")
    be.add_argument("--run-dir", "--run", dest="run", required=True, type=Path,
                    help="run directory holding checkpoint.pt (under torchrun write --run-dir: torchrun "
                         "mistakes a bare --run for its own --run-path)")
    be.add_argument("--out", type=Path, default=None, help="results directory (default RUN/results)")
    be.add_argument("--regime", choices=["weak", "full"], default=None,
                    help="supervision at test time (default: the run's training regime)")
    be.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (bench.*, data.*)")

    de = add("demo", "End to end on the offline default: shards, weak+full training, evaluation, table.")
    de.add_argument("--out", type=Path, default=Path("runs/demo"))
    de.add_argument("--shards", type=Path, default=Path("data/synthetic-5i"))
    de.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    de.add_argument("--quick", action="store_true", help="tiny budget (for tests)")
    return p


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.INFO if rank == "0" else logging.WARNING),
        format=f"%(asctime)s [r{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("DeepSpeed", "torch.distributed", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_shards(args: argparse.Namespace) -> int:
    from fscs.data.synthetic import build_synthetic_shards

    out = build_synthetic_shards(args.out, seed=args.seed, num_images=args.num_images, size=args.size,
                                 workers=args.workers)
    print(f"shards ready: {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fscs import distributed
    from fscs.config import load_config
    from fscs.train import Trainer

    cfg = load_config(args.config, args.overrides)
    env = distributed.resolve_env()
    distributed.init(env)
    Trainer(cfg, env).fit()
    distributed.finish(0)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fscs import distributed
    from fscs.bench.runner import bench_run, load_run
    from fscs.config import load_config

    env = distributed.resolve_env()
    distributed.init(env)
    loaded = load_run(args.run)
    cfg = load_config(None, args.overrides, base_cfg=loaded.cfg)
    bench_run(loaded, cfg, env, args.out or Path(args.run) / "results", regime=args.regime)
    distributed.finish(0)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fscs.demo import run_demo

    run_demo(args.out, args.shards, nproc=args.nproc, quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    handlers = {"shards": _cmd_shards, "train": _cmd_train, "bench": _cmd_bench, "demo": _cmd_demo}
    try:
        return handlers[args.command](args)
    except FSCSError as exc:
        print(f"fscs {args.command}: error: {exc}", file=sys.stderr)
        if os.environ.get("WORLD_SIZE", "1") != "1":
            sys.stderr.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
