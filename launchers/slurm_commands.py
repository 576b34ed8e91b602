"""The fscs command lines of a submission: --sweep into array tasks, their configs and result files."""
from __future__ import annotations

import itertools
import re
from typing import Any, Sequence

from slurm_settings import _fail


def run_config(argv: Sequence[str]) -> Any:
    """The validated config of a `train` or `pretrain` command line (what the job will load), else None."""
    if not argv or argv[0] not in ("train", "pretrain"):
        return None
    rest, config = list(argv[1:]), None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 == len(rest):
            _fail(f"fscs {argv[0]}: --config needs a YAML file after it")
        config, rest = rest[i + 1], rest[:i] + rest[i + 2:]
    elif any(a.startswith("--config=") for a in rest):  # argparse's other spelling, which fscs accepts too
        i = next(i for i, a in enumerate(rest) if a.startswith("--config="))
        config, rest = rest[i].partition("=")[2], rest[:i] + rest[i + 1:]
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    if argv[0] == "train":
        from fscs.config import load_config

        return load_config(config, overrides)
    from fscs.pretrain_config import load_pretrain_config

    return load_pretrain_config(config, overrides)


def default_result_file(argv: Sequence[str]) -> str | None:
    """For `train`: the run's train_summary.json (absolute), so the job's result carries the summary."""
    if not argv or argv[0] != "train":
        return None
    return str((run_config(argv).run_dir / "train_summary.json").resolve())


SWEEP = re.compile(r"^([A-Za-z_]\w*)=(.*)$")


def expand_sweeps(command: Sequence[str], specs: Sequence[str]) -> list[tuple[dict[str, str], list[str]]]:
    """One command per combination of the --sweep values: [(values, argv)], in the order of the product
    (the first --sweep varies slowest). Every `{NAME}` in the command becomes the task's value of NAME.

    `--sweep fold=0,1,2,3 -- train name=weak_f{fold} data.fold={fold}` -> 4 commands. A NAME the command
    never mentions, an empty or repeated value, or a NAME given twice is a one-line error.
    """
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        match = SWEEP.match(spec)
        if not match:
            _fail(f"--sweep {spec!r}: expected NAME=V1,V2,... with NAME a plain word, e.g. "
                  "--sweep fold=0,1,2,3 and {fold} in the command")
        name, values = match[1], [v.strip() for v in match[2].split(",")]
        if not all(values):
            _fail(f"--sweep {spec}: an empty value; list the values separated by commas, e.g. {name}=0,1,2,3")
        if len(set(values)) < len(values):
            _fail(f"--sweep {spec}: a value is listed twice (two tasks would run the same command)")
        if name in dict(axes):
            _fail(f"--sweep {name} is given twice; list all its values in one --sweep {name}=...")
        if not any("{" + name + "}" in arg for arg in command):
            _fail(f"--sweep {name}: the command has no {{{name}}}, so every task would run the same command; "
                  f"use it where the value goes, e.g. name=weak_f{{{name}}} data.fold={{{name}}}")
        axes.append((name, values))
    tasks = []
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = dict(zip((name for name, _ in axes), combo))
        argv = list(command)
        for name, value in chosen.items():
            argv = [arg.replace("{" + name + "}", value) for arg in argv]
        tasks.append((chosen, argv))
    return tasks


def _label(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def check_distinct_outputs(tasks: Sequence[tuple[dict[str, str], list[str]]]) -> None:
    """Two array tasks of one run directory would overwrite each other's checkpoints: a one-line error
    naming both (train/pretrain: the resolved run directory; other commands: the whole command line)."""
    seen: dict[str, dict[str, str]] = {}
    for values, argv in tasks:
        cfg = run_config(argv)
        key = str(cfg.run_dir.resolve()) if cfg is not None else " ".join(argv)
        if key in seen:
            what = f"the run directory {key}" if cfg is not None else f"the command `{key}`"
            _fail(f"--sweep: tasks {_label(seen[key])} and {_label(values)} share {what}; put the sweep's "
                  "{NAME} in name= (train/pretrain) or in --run-dir/--out (bench), e.g. name=weak_f{fold}")
        seen[key] = values
