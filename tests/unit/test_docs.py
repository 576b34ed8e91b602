"""The README and docs/ as a contract: every config key they name exists, and every `fscs ...` command they
show parses with the CLI and its `key=value` overrides load (a renamed key or flag fails here, not for a user)."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from fscs.bench.suite import load_suite
from fscs.cli import _parser
from fscs.config import RunConfig, dataclass_keys, load_config
from fscs.pretrain_config import PretrainConfig, load_pretrain_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_KEYS = {"model.head", "model.forward_episode", "model.predict", "model.load_reference_checkpoint",
            "model.attach_enhancer", "labels.csv"}
"""Dotted names in the docs that are Python attributes of an FSCSModel or file names, not config keys."""
COMMAND = re.compile(r"(?:^|[\s/])(?:\.venv/bin/)?(?:fscs|-m fscs|launchers/torchrun\.sh \S+|slurm\.py .*? --)\s+"
                     r"(shards|train|bench|report|predict|pretrain|demo)\b(.*)")


def _code(text: str) -> list[str]:
    """Fenced blocks, 4-space indented lines and inline `code` spans, continuation lines joined."""
    text = text.replace("\\\n", " ")
    parts = re.findall(r"```.*?\n(.*?)```", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    parts += [line for line in text.splitlines() if line.startswith("    ")]
    parts += re.findall(r"`([^`\n]+)`", text)
    return [line for part in parts for line in part.splitlines()]


def _commands() -> list[tuple[str, str, list[str]]]:
    """(doc name, subcommand, arguments) of every fscs command line shown in the docs."""
    found = []
    for doc in DOCS:
        for line in _code(doc.read_text()):
            m = COMMAND.search(line.split(" # ")[0])
            if m is None:
                continue
            rest = re.sub(r"\$\{?[fF]\}?", "1", m.group(2))  # for-loop folds: a valid number
            for name, value in re.findall(r"--sweep\s+([A-Za-z_]\w*)=([^\s,]+)", line):  # slurm.py arrays
                rest = rest.replace("{" + name + "}", value)  # each task's command: the first value's
            args = shlex.split(rest)
            found.append((doc.name, m.group(1), [a for a in args if a not in ("...", "|", "&&", ";", "done")]))
    return found


def _sub(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def test_every_config_key_named_in_the_docs_exists():
    run, pre = set(dataclass_keys(RunConfig)), set(dataclass_keys(PretrainConfig))
    missing = []
    for doc in DOCS:
        # a key ending a sentence is checked too; `a.b.c` (a longer dotted name) is not a config key
        pattern = (r"(?<![\w/.-])((?:data|model|train|bench|labels|dino|optim|augment)\.[a-z_0-9]+)\b"
                   r"(?!\.[a-z_0-9])")
        for key in sorted(set(re.findall(pattern, doc.read_text()))):
            if key not in run and key not in pre and key not in NOT_KEYS:
                missing.append(f"{doc.name}: {key}")
    assert not missing, f"config keys named in the docs but not in fscs/config.py or pretrain_config.py: {missing}"


def test_the_docs_show_fscs_commands():
    shown = {sub for _, sub, _ in _commands()}
    assert {"train", "bench", "report", "predict", "pretrain", "shards"} <= shown  # the extraction works


@pytest.mark.parametrize("doc,sub,args", _commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_fscs_command_in_the_docs_parses_and_its_overrides_load(doc, sub, args):
    parser = _sub(_parser())[sub]
    if _sub(parser) and args:  # `fscs shards` alone names the group; `pascal|coco` lists alternatives
        assert set(args[0].split("|")) <= set(_sub(parser)), f"{doc}: fscs {sub} {args[0]}: unknown subcommand"
        parser = _sub(parser)[args[0].split("|")[0]]
    options = {s for a in parser._actions for s in a.option_strings}
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    assert set(flags) <= options, f"{doc}: fscs {sub}: {sorted(set(flags) - options)} not in the CLI"
    if sub not in ("train", "pretrain", "bench"):
        return
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    config = args[args.index("--config") + 1] if "--config" in args else None
    config = ROOT / config if config else None
    if sub == "pretrain":
        load_pretrain_config(config, overrides)
    elif sub == "bench" and "--suite" in args:
        suite = ROOT / args[args.index("--suite") + 1]  # a placeholder (S.yaml, FILE): a shipped suite
        load_suite(suite if suite.is_file() else ROOT / "benchmarks/suites/synthetic5i.yaml", overrides)
    else:  # train, or bench's data.* / bench.* overrides of a run's config
        load_config(config, overrides)


def test_every_slurm_launcher_option_in_the_docs_exists(slurm_launcher):
    options = {s for a in slurm_launcher._parser()._actions for s in a.option_strings}
    shown = [(doc.name, line.split("slurm.py", 1)[1].split(" -- ")[0])
             for doc in DOCS for line in _code(doc.read_text()) if "slurm.py --" in line]
    assert len(shown) >= 4
    for doc, args in shown:
        flags = set(re.findall(r"(?<!\S)--[a-z][a-z-]*", args))
        assert flags <= options, f"{doc}: launchers/slurm.py {sorted(flags - options)} not in its parser"


def test_every_repository_path_named_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        for span in re.findall(r"`((?:fscs|shards|benchmarks|launchers|tests|configs|docs)/[^`\s]*)`", doc.read_text()):
            if "NAME" in span or "<" in span:  # placeholders (launchers/presets/NAME.yaml)
                continue
            if not any(ROOT.glob(span)):  # globs (configs/*.yaml) need one match
                missing.append(f"{doc.name}: {span}")
    assert not missing, f"paths named in the docs that the repository lacks: {missing}"
