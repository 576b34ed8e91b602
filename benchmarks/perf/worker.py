"""Subprocess side of benchmarks 6 and 7 (a fresh process per measurement): `scale` runs under torchrun.

    python benchmarks/perf/worker.py scale  --out F.json --threads T [setting options]
    python benchmarks/perf/worker.py memory --out F.json --impl ours|reference [setting options]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from fscs import distributed  # noqa: E402

from reference_impl import reference_train_step  # noqa: E402
from setups import Setting, fetch_batches, make_cfg, make_trainer, to_device  # noqa: E402
from timing import current_rss_mib, peak_rss_mib, set_threads  # noqa: E402

logger = logging.getLogger(__name__)


def _setting(args: argparse.Namespace) -> Setting:
    return Setting("worker", args.backbone, args.size, args.batch)


def _random_batch(setting: Setting) -> dict[str, torch.Tensor]:
    """A weak-regime batch of the right shapes (memory does not depend on pixel values)."""
    g = torch.Generator().manual_seed(0)
    s, b = setting.image_size, setting.batch
    return {"query_img": torch.randn(b, 3, s, s, generator=g),
            "support_img": torch.randn(b, setting.way, setting.shot, 3, s, s, generator=g),
            "presence": (torch.rand(b, setting.way, generator=g) > 0.5).float(),
            "classes": torch.ones(b, setting.way, dtype=torch.long)}


def cmd_scale(args: argparse.Namespace) -> dict:
    """Steady-state wall time of DDP train steps (barrier-synchronised) on this rank's own batch."""
    set_threads(args.threads)
    env = distributed.resolve_env()
    distributed.init(env)
    cfg = make_cfg(_setting(args), args.shards, precision=args.precision, device=args.device)
    trainer = make_trainer(cfg, env)
    batch = fetch_batches(cfg, 1, rank=env.rank, world_size=env.world_size)[0]
    for _ in range(args.warmup):
        trainer.train_step(batch)
    times, cpu = [], []
    for _ in range(args.steps):
        distributed.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train_step(batch)
        cpu.append(time.process_time() - start_cpu)  # this rank's compute, all-reduce included
        distributed.barrier()
        times.append(time.perf_counter() - start)
    return {"world_size": env.world_size, "threads": args.threads, "batch_per_rank": args.batch,
            "step_wall_s": times, "step_cpu_s_rank0": cpu}


def cmd_memory(args: argparse.Namespace) -> dict:
    """Peak memory of training steps at a batch size: CPU RSS (ru_maxrss), CUDA max allocated."""
    set_threads(args.threads)
    setting = _setting(args)
    device = torch.device(args.device)
    cfg = make_cfg(setting, args.shards, precision=args.precision, device=args.device)
    trainer = make_trainer(cfg)
    batch = to_device(_random_batch(setting), device)
    if args.impl == "reference":
        head = trainer.model.head
        opt = torch.optim.Adam(head.parameters(), lr=cfg.train.lr)

        def step() -> None:
            reference_train_step(trainer.model.backbone, head, opt, batch)
    else:
        def step() -> None:
            trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = current_rss_mib()
    base_peak = peak_rss_mib()
    start = time.process_time()
    for _ in range(args.steps):
        step()
    out = {"impl": args.impl, "batch": args.batch, "precision": args.precision, "rss_before_step_mib": base,
           "peak_rss_before_step_mib": base_peak, "peak_rss_mib": peak_rss_mib(),
           "step_cpu_s": (time.process_time() - start) / args.steps}
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cmd", choices=("scale", "memory"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", choices=("ours", "reference"), default="ours")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = cmd_scale(args) if args.cmd == "scale" else cmd_memory(args)
    if args.cmd != "scale" or distributed.resolve_env().rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.cmd == "scale":
        distributed.finish(0)


if __name__ == "__main__":
    main()
