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
    "bench": "fscs bench --run-dir runs/weak 'bench.settings=[1w1s,2w1s]' bench.episodes=1000",
    "report": "fscs report runs/bench/synthetic5i --out runs/report",
    "demo": "fscs demo --out runs/demo",
    "pretrain": "torchrun --nproc_per_node=2 -m fscs pretrain --config configs/pretrain.yaml name=pretrain",
    "predict": "fscs predict --run runs/pilot --support support/ --query 'new/*.jpg' --out predictions/",
}


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0 (seeds, counts); anything else is a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; pass 0 or more")
    return value


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (process counts); anything else is a one-line usage error."""
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: pass 1 or more")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fscs", description="Weakly-supervised few-shot classification & segmentation (CST) harness.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {v}" for v in EXAMPLES.values()),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="{shards,train,bench,report,predict,pretrain,demo}")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    sh = add("shards", "Write WebDataset shards (+ index.json) from a dataset.")
    shsub = sh.add_subparsers(dest="source", required=True)
    syn = shsub.add_parser("synth", help="the offline synthetic-5i dataset (20 classes, 4 folds)",
                           epilog="example:\n  fscs shards synth --out data/synthetic-5i",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    syn.add_argument("--out", required=True, type=Path, help="output shard directory")
    syn.add_argument("--seed", type=_non_negative, default=0)
    syn.add_argument("--num-images", type=int, default=6000)
    syn.add_argument("--size", type=int, default=128, help="image side in pixels")
    syn.add_argument("--workers", type=_non_negative, default=2)
    for name, root_help, example in (
            ("pascal", "VOCdevkit/VOC2012 (JPEGImages/, SBD's SegmentationClassAug/)",
             "fscs shards pascal --root VOCdevkit/VOC2012 --out data/pascal5i --workers 8"),
            ("coco", "COCO 2014 root (train2014/, val2014/, annotations/)",
             "fscs shards coco --root COCO2014 --out data/coco20i --workers 8")):
        real = shsub.add_parser(name, help=f"{name.upper()} standard layout + the shipped FS-CS split lists",
                                epilog=f"example:\n  {example}\n(see docs/real-data.md)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        real.add_argument("--root", required=True, type=Path, help=root_help)
        real.add_argument("--out", required=True, type=Path, help="output shard directory")
        real.add_argument("--splits", type=Path, default=None,
                          help=f"split-list directory (default: the shipped shards/splits/{name})")
        real.add_argument("--workers", type=_non_negative, default=2, help="decoding processes")
        real.add_argument("--select-fraction", type=float, default=0.1,
                          help="share of training images held out for model selection (split val)")
        real.add_argument("--seed", type=_non_negative, default=0, help="seed of the model-selection hold-out")
        if name == "coco":
            real.add_argument("--mask-source", choices=["auto", "png", "json"], default="auto",
                              help="semantic PNGs under annotations/<subset>/ or the instances JSON "
                                   "(auto: PNGs when that folder exists)")
    fo = shsub.add_parser(
        "folder", help="your own images: labels CSV (multi-label) or one folder per class, optional masks",
        epilog="example:\n  fscs shards folder --images photos/ --labels labels.csv --masks masks/ "
               "--novel dent,scratch --out data/my-shards\n(see docs/your-own-data.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    fo.set_defaults(handler=_cmd_shards_folder)
    fo.add_argument("--images", required=True, type=Path, help="image directory (ImageFolder if no --labels)")
    fo.add_argument("--labels", type=Path, default=None,
                    help="CSV with header image,labels; several labels separated by ';' or '|'")
    fo.add_argument("--masks", type=Path, default=None,
                    help="masks: <rel path stem>.png (index PNG) or <rel path stem>/<class>.png (binary)")
    fo.add_argument("--mask-format", choices=["index", "binary"], default="index",
                    help="how <stem>.png masks are read: class-id values, or nonzero = the image's one label")
    fo.add_argument("--out", required=True, type=Path, help="output shard directory")
    fo.add_argument("--classes", default=None,
                    help="comma-separated class order = ids 1..C (default sorted; \\, = a comma in a name)")
    fo_novel = fo.add_mutually_exclusive_group()
    fo_novel.add_argument("--novel", default=None,
                          help="comma-separated held-out classes (fold 0; \\, = a comma in a name)")
    fo_novel.add_argument("--novel-count", type=int, default=None,
                          help="hold out this many classes chosen with --seed (default about C/4; 0 = none)")
    fo.add_argument("--seed", type=_non_negative, default=0,
                    help="seed of the novel-class choice and the val split")
    fo.add_argument("--select-fraction", type=float, default=0.15,
                    help="share of base-class images held out for model selection")
    fo.add_argument("--max-side", type=int, default=1024, help="downscale larger images (0 = keep size)")
    fo.add_argument("--shots", default="1,5", help="shots you plan to use (warns about too-small classes)")
    fo.add_argument("--name", default=None, help="dataset name in index.json (default folder-<dir name>)")

    ve = shsub.add_parser(
        "verify", help="check a shard directory against its index.json (sizes, sha256, tar contents)",
        epilog="example:\n  fscs shards verify data/pascal5i --decode",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ve.set_defaults(handler=_cmd_shards_verify)
    ve.add_argument("dir", type=Path, help="shard directory (holds index.json)")
    ve.add_argument("--decode", action="store_true", help="also decode every image and mask (slower)")

    tr = add("train", "Train the CST head (run under torchrun for several processes).")
    tr.add_argument("--config", type=Path, default=None, help="YAML config (see configs/)")
    tr.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=5e-4")

    pt = add("pretrain", "Self-supervised (DINO) pretraining of a backbone on image shards; exports safetensors.")
    pt.set_defaults(handler=_cmd_pretrain)
    pt.add_argument("--config", type=Path, default=None, help="YAML config (see configs/pretrain.yaml)")
    pt.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.steps=500")

    be = add("bench", "Evaluate a trained run on index-seeded FS-CS episodes.")
    be.add_argument("--run-dir", "--run", dest="run", default=None, type=Path,
                    help="run directory holding checkpoint.pt (under torchrun write --run-dir: torchrun "
                         "mistakes a bare --run for its own --run-path); or use --suite with --runs")
    be.add_argument("--out", type=Path, default=None,
                    help="results directory (default RUN/results; with --reference-checkpoint CKPT: "
                         "<CKPT without its suffix>_results beside it; with --suite: runs/bench/<suite name>)")
    be.add_argument("--reference-checkpoint", type=Path, default=None, metavar="CKPT",
                    help="evaluate the authors' released CST checkpoint (Lightning .ckpt) instead of a run; "
                         "loaded without unpickling code")
    be.add_argument("--backbone-weights", type=Path, default=None, metavar="PTH",
                    help="with --reference-checkpoint: the DINO weights file (dino_deitsmall8_300ep_pretrain.pth)")
    be.add_argument("--save-predictions", type=Path, default=None, metavar="DIR",
                    help="write every episode's manifest entry, presence per way and predicted mask (index PNG "
                         "at the original query size) under DIR/<setting>/")
    be.add_argument("--regime", choices=["weak", "mixed", "full"], default=None,
                    help="supervision at test time (default: the run's training regime)")
    be.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (bench.*, data.*), "
                    "or with --suite of the suite's keys (episodes=200)")
    be.add_argument("--suite", type=Path, default=None,
                    help="suite YAML (benchmarks/suites/*.yaml): evaluate every run of --runs on its frozen "
                         "manifests, sharing backbone passes and caching results in --out")
    be.add_argument("--runs", nargs="+", type=Path, default=None, help="run directories (with --suite)")

    rp = add("report", "Leaderboard of results: LEADERBOARD.md and a self-contained index.html.")
    rp.set_defaults(handler=_cmd_report)
    rp.add_argument("results", nargs="+", type=Path,
                    help="result JSON files, suite indexes (OUT/suite-*.json) or bench output directories; runs "
                         "NAME_f<fold> are one model over folds, NAME_s<k> (k = its train.seed) one model over "
                         "training seeds (mean ± sd)")
    rp.add_argument("--out", required=True, type=Path, help="report directory")
    rp.add_argument("--title", default="fscs leaderboard")
    rp.add_argument("--bootstrap", type=int, default=1000, help="resamples of the fold-mean CI (0 = none)")

    pr = add("predict", "Which support classes are in new images, and where (JSON, masks, overlays, HTML).")
    pr.add_argument("--run-dir", "--run", dest="run", required=True, type=Path, help="trained run directory")
    pr.add_argument("--support", required=True, type=Path,
                    help="folder with one sub-folder of a few images per class (+ optional <name>.mask.png)")
    pr.add_argument("--query", required=True, nargs="+", help="query images, folders or quoted globs")
    pr.add_argument("--out", required=True, type=Path, help="output directory (index.html, per-image files)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--threshold", type=float, default=0.5, help="presence probability threshold")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pr.add_argument("--regime", choices=["auto", "weak", "full", "mixed"], default="auto",
                    help="support masks: auto = the run's regime (weak: pseudo-masks; full/mixed: the given)")
    pr.add_argument("--cache", type=Path, default=None, help="cache support features on disk here")
    pr.add_argument("--max-side", type=int, default=1024,
                    help="longest side of overlays / mask computation (0 = original size)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")

    de = add("demo", "End to end on the offline default: shards, weak+full training, evaluation, table.")
    de.add_argument("--out", type=Path, default=Path("runs/demo"))
    de.add_argument("--shards", type=Path, default=Path("data/synthetic-5i"))
    de.add_argument("--nproc", type=_positive, default=2, help="training processes (torchrun)")
    de.add_argument("--quick", action="store_true", help="tiny budget (for tests)")
    return p


def log_rank() -> int:
    """This process's rank for log lines: torchrun's RANK or an srun task's SLURM_PROCID (0 elsewhere)."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return 0  # not in a job: no torch import just for logging
    from fscs.distributed import resolve_env

    try:
        return resolve_env().rank
    except (ValueError, AttributeError):  # malformed variables: the job's set-up reports them properly
        return 0


def _setup_logging(verbose: bool) -> None:
    """INFO on rank 0, WARNING elsewhere; each line names its rank."""
    rank = log_rank()
    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING),
        format=f"%(asctime)s [r{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    # torch's own loggers: torch sets them to WARNING once its import completes; a Ctrl-C during that import
    # left them at the root's INFO, and torch's exit hooks then logged cache statistics under our message
    for noisy in ("DeepSpeed", "torch", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_shards(args: argparse.Namespace) -> int:
    if args.source in ("pascal", "coco"):
        from fscs.data.sources import convert_coco, convert_pascal

        common = {"splits": args.splits, "workers": args.workers, "select_fraction": args.select_fraction,
                  "seed": args.seed}
        report = (convert_pascal(args.root, args.out, **common) if args.source == "pascal" else
                  convert_coco(args.root, args.out, mask_source=args.mask_source, **common))
        print("\n".join(report.lines()))
        return 0
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
    summary = Trainer(cfg, env).fit()
    code = int(summary["exit_code"])  # 128 + signal number when a signal stopped it (after a checkpoint)
    distributed.finish(code)
    return code


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.suite is not None or args.runs:
        return _cmd_bench_suite(args)
    if args.run is None and args.reference_checkpoint is None:
        raise FSCSError("bench needs --run-dir RUN (one run), --reference-checkpoint CKPT (the authors' head) "
                        "or --suite FILE --runs RUN... (a suite)")
    from fscs import distributed
    from fscs.bench.runner import bench_run
    from fscs.bench.runs import load_reference_run, load_run
    from fscs.config import load_config

    env = distributed.resolve_env()
    distributed.init(env)
    if args.reference_checkpoint is not None:
        loaded = load_reference_run(args.reference_checkpoint, args.backbone_weights, args.overrides)
        cfg, out = loaded.cfg, args.out or Path(args.reference_checkpoint).with_suffix("").with_name(
            Path(args.reference_checkpoint).stem + "_results")
    else:
        ignored = [o for o in args.overrides if not o.startswith(("data.", "bench."))]
        if ignored:
            raise FSCSError(f"bench --run-dir: override '{ignored[0]}' would be ignored (the model and its training "
                            "config come from the run's checkpoint); only data.* and bench.* keys apply, and "
                            "--regime sets how the head decodes")
        loaded = load_run(args.run)
        cfg, out = load_config(None, args.overrides, base_cfg=loaded.cfg), args.out or Path(args.run) / "results"
    results = bench_run(loaded, cfg, env, out, regime=args.regime, save_predictions=args.save_predictions)
    if env.is_main:
        print(f"bench: {len(results)} result(s) in {out}")
    distributed.finish(0)
    return 0


def _cmd_shards_verify(args: argparse.Namespace) -> int:
    from fscs.data.shard_check import verify_shards
    from fscs.data.shards import read_index, rebuild_hint

    index = read_index(args.dir)
    problems, checked = verify_shards(index, decode=args.decode)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        raise FSCSError(f"{args.dir}: {len(problems)} problem(s) above; delete the directory and rebuild it "
                        f"({rebuild_hint(index.dataset, args.dir)})")
    hashed = sum("sha256" in s for s in index.shards)
    decoded = ", every image decoded" if args.decode else ""
    print(f"{args.dir}: {len(index.shards)} shards, {checked} samples as index.json lists them "
          f"(sha256 checked for {hashed} of {len(index.shards)} shards{decoded})")
    return 0


def _cmd_shards_folder(args: argparse.Namespace) -> int:
    from fscs.data.sources.folder import build_folder_shards
    from fscs.data.sources.folder_plan import split_names as names

    try:
        shots = [int(s) for s in args.shots.split(",") if s.strip()]
    except ValueError:
        raise FSCSError(f"--shots {args.shots!r}: write comma-separated integers, e.g. 1,5") from None
    out = build_folder_shards(
        args.images, args.out, labels=args.labels, masks=args.masks, mask_format=args.mask_format,
        classes=names(args.classes), novel=names(args.novel), novel_count=args.novel_count, seed=args.seed,
        select_fraction=args.select_fraction, max_side=args.max_side, shots=shots, name=args.name)
    print(f"shards ready: {out} (train with data.shards={out} data.fold=0)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fscs.predict import run_predict

    summary = run_predict(args.run, args.support, args.query, args.out, batch_size=args.batch_size,
                          threshold=args.threshold, device=args.device, regime=args.regime,
                          cache_dir=args.cache, max_side=args.max_side, progress=not args.no_progress)
    print(f"predicted {summary['predicted']} of {summary['queries']} images: {Path(args.out) / 'index.html'}")
    return 0


def _cmd_bench_suite(args: argparse.Namespace) -> int:
    from fscs import distributed
    from fscs.bench.suite import bench_suite, load_suite

    if args.suite is None or not args.runs or args.run is not None:
        raise FSCSError("bench --suite FILE --runs RUN... (no --run-dir); e.g. fscs bench --suite "
                        "benchmarks/suites/synthetic5i.yaml --runs runs/weak runs/full")
    # `--runs a b episodes=50` puts the override among the runs: take key=value items that are no directory
    overrides = list(args.overrides) + [str(r) for r in args.runs if "=" in str(r) and not r.exists()]
    runs = [r for r in args.runs if str(r) not in overrides]
    suite = load_suite(args.suite, overrides)
    env = distributed.resolve_env()
    distributed.init(env)
    summary = bench_suite(suite, runs, args.out or Path("runs/bench") / suite.name, env)
    if env.is_main:
        print(f"suite {suite.name}: {len(summary.results)} results ({summary.computed} computed, "
              f"{summary.cached} cached, {len(summary.skipped)} runs skipped): {summary.index_file}")
    if env.distributed:
        distributed.finish(0)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fscs.bench.report import write_report

    page = write_report(args.results, args.out, title=args.title, bootstrap=args.bootstrap)
    print(f"report: {page} and {page.parent / 'LEADERBOARD.md'}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from fscs import distributed
    from fscs.pretrain import run_pretrain
    from fscs.pretrain_config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    env = distributed.resolve_env()
    distributed.init(env)
    summary = run_pretrain(cfg, env)
    if env.is_main and "export" in summary:
        print(f"backbone exported: {summary['export']}")
    code = int(summary["exit_code"])  # 128 + signal number when a signal stopped it (after a checkpoint)
    distributed.finish(code)
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from fscs.demo import run_demo

    run_demo(args.out, args.shards, nproc=args.nproc, quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` overrides after an option (`train a=1 --config c.yaml b=2`) land here
        if not isinstance(getattr(args, "overrides", None), list) or any(
                "=" not in t or t.startswith("-") for t in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    _setup_logging(args.verbose)
    handlers = {"shards": _cmd_shards, "train": _cmd_train, "bench": _cmd_bench, "demo": _cmd_demo,
                "predict": _cmd_predict}
    try:
        return (getattr(args, "handler", None) or handlers[args.command])(args)
    except FSCSError as exc:
        print(f"fscs {args.command}: error: {exc}", file=sys.stderr)
        if os.environ.get("WORLD_SIZE", "1") != "1" and os.environ.get("FSCS_IN_PROCESS") != "1":
            sys.stderr.flush()  # other ranks may wait in a collective: leave now (a submitit task returns instead)
            os._exit(2)
        return 2
    except KeyboardInterrupt:  # what every stage writes is atomic: finished files stay, no partial one is left
        print(f"fscs {args.command}: interrupted (Ctrl-C); nothing half-written was kept, rerun the same "
              "command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
