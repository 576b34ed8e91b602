"""launchers/slurm.py's cluster settings: presets, defaults <- preset <- command line, checks, submitit args."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_KEYS = {"partition", "account", "qos", "constraint", "nodes", "gpus_per_node", "tasks_per_node",
               "cpus_per_task", "mem_gb", "time_min", "max_requeues", "signal_delay_s", "setup", "additional",
               "srun_args"}
DEFAULTS: dict[str, Any] = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": None, "cpus_per_task": 4,
                            "time_min": 60, "max_requeues": 3, "signal_delay_s": 120}


def _fail(message: str) -> None:
    from fscs.errors import FSCSError

    raise FSCSError(message)


def load_preset(name: str | os.PathLike) -> dict[str, Any]:
    """A cluster preset: launchers/presets/<name>.yaml or a YAML path; unknown keys are errors."""
    import yaml

    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        _fail(f"cluster preset '{name}' not found; use one of: {known}, or a YAML file path")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        _fail(f"preset '{path}' has unknown key(s) {', '.join(unknown)}; "
              f"valid: {', '.join(sorted(PRESET_KEYS))}")
    return data


def merge_settings(preset: dict[str, Any] | None, cli: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- preset <- command line (None on the command line = not given)."""
    settings = {**DEFAULTS, **(preset or {})}
    settings.update({k: v for k, v in cli.items() if v is not None})
    if cli.get("gpus_per_node") is not None and cli.get("tasks_per_node") is None:
        settings["tasks_per_node"] = None  # a preset's tasks_per_node went with the preset's GPU count
    if settings.get("tasks_per_node") is None:  # one process per GPU, or one CPU process
        settings["tasks_per_node"] = max(1, int(settings.get("gpus_per_node") or 0))
    check_settings(settings)
    return settings


MINIMUM = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 0,
           "time_min": 1, "max_requeues": 0, "signal_delay_s": 0}


def check_settings(settings: dict[str, Any]) -> None:
    """One-line errors for values sbatch would refuse, misread (--nodes=-1 submits a job submitit then cannot
    follow) or turn into a job that is signalled as soon as it starts."""
    for key, low in MINIMUM.items():
        value = settings.get(key)
        if value is None and key in ("mem_gb", "gpus_per_node"):  # null in a preset: not passed
            continue
        flag = "--" + ("time" if key == "time_min" else key.replace("_", "-"))
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(f"{flag} (preset key {key}) must be an integer >= {low}, got {value!r}")
    gpus, tasks = settings.get("gpus_per_node") or 0, settings["tasks_per_node"]
    if gpus and tasks > gpus:
        _fail(f"--tasks-per-node {tasks} is more than --gpus-per-node {gpus}: each task uses the GPU of its "
              "local rank (cuda:LOCAL_RANK); give at most one task per GPU")
    if settings["signal_delay_s"] >= 60 * settings["time_min"]:
        _fail(f"--signal-delay-s {settings['signal_delay_s']} is not shorter than --time "
              f"{settings['time_min']} min: SLURM would send the checkpoint signal as soon as the job "
              "starts; raise --time or lower --signal-delay-s (one step plus a save)")


def executor_parameters(settings: dict[str, Any], name: str = "fscs") -> dict[str, Any]:
    """submitit AutoExecutor.update_parameters(...) keyword arguments of merged settings."""
    params: dict[str, Any] = {"name": name, "nodes": int(settings["nodes"]),
                              "tasks_per_node": int(settings["tasks_per_node"]),
                              "cpus_per_task": int(settings["cpus_per_task"]),
                              "timeout_min": int(settings["time_min"]),
                              "slurm_signal_delay_s": int(settings["signal_delay_s"])}
    if settings.get("gpus_per_node"):
        params["gpus_per_node"] = int(settings["gpus_per_node"])
    if settings.get("mem_gb"):
        params["mem_gb"] = int(settings["mem_gb"])
    for key in ("partition", "account", "qos", "constraint", "setup"):
        if settings.get(key):
            params[f"slurm_{key}"] = settings[key]
    # a task that fails (e.g. rank 0 cannot open the rendezvous port) ends the step: without this srun waits
    # for the other ranks, which wait for rank 0 until torch's 30-minute timeout or the job's time limit
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1", *(settings.get("srun_args") or [])]
    if settings.get("additional"):
        params["slurm_additional_parameters"] = dict(settings["additional"])
    return params
