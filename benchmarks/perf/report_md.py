"""Markdown rendering of the perf results dict written by run.py (RESULTS.md)."""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.1e}"
    return str(x)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _equivalence(r: dict[str, Any]) -> list[str]:
    tol = r["tolerance"]
    out = ["## A/B equality of the optimised code (random inputs)", "",
           "Max |new - truth| / max |truth|, truth = the pre-optimisation forward "
           "(benchmarks/perf/reference_impl.py) in float64 on the same parameters: cls/seg outputs and the "
           "gradient of every parameter after a CE loss (k's bias excluded: its true gradient is 0). "
           "`old error` = the old forward's own error in that dtype. Accepted: float64 <= "
           f"{tol['float64']}; float32 <= max({tol['float32']}, 3 x old error).", ""]
    rows = []
    for h in r["heads"]:
        rows.append([h["dtype"], f"{h['channels']} ch, {h['query_grid']}x{h['query_grid']}", str(h["masked"]),
                     h["cls"], h["seg"], h["grads"], h["old_error"], "yes" if h["ok"] else "NO"])
    out += _table(["dtype", "input", "masked", "cls", "seg", "grads", "old error", "ok"], rows)
    for o in r["others"]:
        vals = ", ".join(f"{k} {_f(v)}" for k, v in o.items() if k not in ("what", "ok"))
        out.append(f"- {o['what']}: {vals} -> {'ok' if o['ok'] else 'NOT OK'}")
    return out + [""]


def _step(results: dict[str, Any]) -> list[str]:
    runs = [results[k] for k in ("step_small", "step_big") if results.get(k)]
    if not runs:
        return []
    out = ["## 1. Training step vs the frozen-backbone bound (target <= 1.2)", "",
           "Median of interleaved rounds. `step` = Trainer.train_step (forward, weak-regime pseudo-masks, "
           "loss, backward, Adam); `backbone` = the frozen backbone's forward over the same images "
           "(query + support) in the same precision; correlation = encode_episode - backbone; "
           "head+loss+opt = step - encode - distill (differences of medians: approximate).", ""]
    rows = []
    for run in runs:
        for r in run["rows"]:
            rows.append([run["setting"], r["precision"], r["step_s"], r["backbone_s"],
                         f"**{r['ratio']:.2f}**", r["correlation_s"], r["head_loss_opt_s"],
                         f"{100 * r['spread']:.0f} %", _verdict(r["ratio"] <= 1.2)])
    out += _table(["setting", "precision", "step s", "backbone s", "step/backbone", "correlation s",
                   "head+loss+opt s", "step spread", "target"], rows)
    out += ["## 2. Pseudo-mask distillation share of the step (target <= 2 %)", ""]
    rows = [[run["setting"], r["precision"], r["distill_s"], f"{100 * r['distill_share']:.2f} %",
             _verdict(r["distill_share"] <= 0.02)] for run in runs for r in run["rows"]]
    out += _table(["setting", "precision", "distill s", "share", "target"], rows)
    out += ["## Training throughput vs the authors' reference implementation, emulated (target >= 2x)", "",
            "Reference emulation (benchmarks/perf/reference_impl.py): fp32, DINO-style non-fused attention "
            "with full N x N attention matrices in every block (the last one kept for the masks), the "
            "pre-optimisation correlation and head. In 1-way 1-shot training both compute each image "
            "once.", ""]
    rows = []
    for run in runs:
        for r in run["rows"]:
            speedup = r.get("speedup_vs_reference")
            rows.append([run["setting"], r["precision"], r.get("reference_s"), r["step_s"],
                         f"**{speedup:.2f}x**" if speedup else "-", _verdict((speedup or 0) >= 2.0)])
    out += _table(["setting", "ours", "reference step s (fp32)", "our step s", "speed-up", "target"], rows)
    return out


def _eval(results: dict[str, Any]) -> list[str]:
    runs = [results[k] for k in ("eval_small", "eval_big") if results.get(k)]
    if not runs:
        return []
    out = ["## 3. Evaluation feature reuse (target: all heads <= 1.3x one head)", "",
           "Per batch of episodes: `encode_episode` once + `decode_episode` per head, vs no reuse (the "
           "reference's behaviour: query and support through the backbone again for every head, way and "
           "shot; 1-way 1-shot decodes; shot-averaged probabilities).", ""]
    rows = []
    for r in runs:
        one, allh, none = (r["medians"][k] for k in r["medians"])
        rows.append([f"{r['setting']} ({r.get('precision', 'fp32')})", ", ".join(r["heads"]), one, allh, none,
                     f"**{r['all_heads_vs_one']:.2f}**",
                     f"**{r['speedup_vs_no_reuse']:.2f}x**",
                     f"{r['images_encoded_reuse']} vs {r['images_encoded_no_reuse']}",
                     r["max_prob_diff_reuse_vs_no_reuse"], _verdict(r["all_heads_vs_one"] <= 1.3)])
    out += _table(["setting", "heads", "reuse 1 head s", "reuse all heads s", "no reuse s", "all/one",
                   "speed-up vs no reuse", "backbone images", "max prob diff", "target"], rows)
    return out


def _loader(results: dict[str, Any]) -> list[str]:
    runs = [results[k] for k in ("loader_small", "loader_big") if results.get(k)]
    if not runs:
        return []
    out = ["## 4. Data pipeline headroom (target >= 5)", "",
           "Worker rate = episodes per CPU second of the stream run in one process (read, decode, episode "
           "assembly: the work of one loader worker). The wall rate of a real 1-worker WebLoader is shown "
           "too (it shares the cores with everything else). Step rate = batch / median step time of "
           "benchmark 1 (the weak step is also used for the full stream).", ""]
    rows = [[run["setting"], r["regime"], r["cpu_samples_per_s"], r["wall_samples_per_s_1_worker"],
             r["step_precision"], r["step_samples_per_s"], f"**{r['headroom']:.1f}**",
             _verdict(r["headroom"] >= 5)] for run in runs for r in run["rows"]]
    out += _table(["setting", "stream", "worker samples/s", "1-worker wall samples/s", "step",
                   "step samples/s", "headroom", "target"], rows)
    return out


def _precision(results: dict[str, Any]) -> list[str]:
    out = ["## 5. Precision and compilation", ""]
    rows = []
    for key in ("step_small", "step_big"):
        run = results.get(key)
        if not run:
            continue
        base = next((r["step_s"] for r in run["rows"] if r["precision"] == "fp32"), None)
        for r in run["rows"]:
            variant = "bf16 (autocast)" if r["precision"] == "bf16" else r["precision"]
            rows.append([run["setting"], variant, r["step_s"], f"{base / r['step_s']:.2f}x" if base else "-"])
        for r in run.get("column_skip", {}).get("rows", []):
            variant = f"{r['precision']}, masked support columns not skipped"
            rows.append([run["setting"], variant, r["no_skip_step_s"],
                         f"{base / r['no_skip_step_s']:.2f}x" if base else "-"])
        if run.get("compile"):
            c = run["compile"]
            rel = f"{1 / c['vs_eager_fp32']:.2f}x" if c.get("vs_eager_fp32") else "-"
            rows.append([run["setting"], f"fp32 + head.compile() (first step {c['compile_s']:.0f} s)",
                         c["step_s"], rel])
    if rows:
        out += _table(["setting", "variant", "step s", "speed vs fp32"], rows)
    for key in ("step_small", "step_big"):
        skip = (results.get(key) or {}).get("column_skip")
        if skip:
            gains = ", ".join(f"{r['precision']} {r['speedup']:.2f}x" for r in skip["rows"])
            out += [f"Masked-column skipping ({results[key]['setting']}): the batch's weak pseudo-masks keep "
                    f"{100 * skip['kept_share']:.0f} % of the block-1 support columns; skipping the others "
                    f"makes the step {gains} faster (same rounds, side by side).", ""]
    chk = results.get("bf16_check")
    if chk:
        out += [f"bf16 autocast vs fp32 on the same {chk['episodes']} test episodes of fold 0; head trained "
                f"{chk['train_steps']} steps ({chk.get('train_regime', 'weak')} regime, random backbone: "
                "metrics are low). "
                f"Tolerance: {chk['tolerance_points']:.2f} points on ER, mIoU and FB-IoU. Flipped = share of "
                "pixel (p_fg > 0.5) / presence decisions that differ.", ""]
        rows = []
        for s in chk["settings"]:
            pairs = [f"{s['fp32'][m]:.2f} / {s['bf16'][m]:.2f}" for m in ("er", "miou", "fbiou")]
            rows.append([s["setting"], *pairs, f"{100 * s['pixel_decisions_flipped']:.3f} %",
                         s["mean_abs_fg_prob_diff"], f"{100 * s['presence_decisions_flipped']:.2f} %",
                         "yes" if s["within_tolerance"] else "NO"])
        out += _table(["setting", "ER fp32 / bf16", "mIoU fp32 / bf16", "FB-IoU fp32 / bf16",
                       "pixels flipped", "mean abs p_fg diff", "presence flipped", "within tolerance"], rows)
    return out if len(out) > 2 else []


def _scaling(results: dict[str, Any]) -> list[str]:
    r = results.get("scaling")
    if not r:
        return []
    out = [f"## 6. Scaling on this CPU ({r['setting']}, {r['precision']})", "",
           "Wall time per DDP step (gloo), barrier to barrier, median of the steps; OMP/torch threads set "
           "per process. Efficiency = wall speed-up / cores used: it needs idle cores, so on a shared "
           "machine read it with the load averages above. `rank-0 CPU s` = CPU time of one rank's step "
           "(all-reduce included): its growth from 1 to 2 processes is the DDP overhead, whatever the "
           "other load.", ""]
    rows = [[f"{x['processes']} x {x['threads_per_process']}", x["step_wall_s"], x.get("step_cpu_s"),
             x["samples_per_s"], f"{x['speedup']:.2f}x", f"{100 * x['efficiency']:.0f} %"] for x in r["runs"]]
    return out + _table(["processes x threads", "step wall s", "rank-0 CPU s", "samples/s", "speed-up",
                         "efficiency"], rows)


def _memory(results: dict[str, Any]) -> list[str]:
    r = results.get("memory")
    if not r:
        return []
    cpu = r["measure"] == "peak_rss_mib"
    what = "peak RSS (VmHWM) of the process" if cpu else "peak allocated CUDA memory"
    out = [f"## 7. Memory of a training step, ViT-S/8 400 px random weights ({what}, {r['precision']})", "",
           "One fresh process per batch size, one step on random images; linear fit over the measured sizes.",
           ""]
    rows = []
    for impl, data in r["impls"].items():
        for p in data["points"]:
            rows.append([impl, p["batch"], _f(p.get("peak_mib"), 0), _f(p.get("before_step_mib"), 0),
                         _f(p.get("step_cpu_s"), 1), p.get("error", "")])
    out += _table(["implementation", "batch", "peak MiB", "before step MiB", "step s", "note"], rows)
    for impl, data in r["impls"].items():
        fit = data["fit"]
        if fit:
            out.append(f"- {impl}: {fit['mib_per_episode']:.0f} MiB per episode + {fit['intercept_mib']:.0f} "
                       f"MiB; batch 12 -> {fit['predicted_peak_batch12_mib'] / 1024:.2f} GiB (fit); largest "
                       f"batch in {r['budget_gib']:.0f} GiB: **{fit['largest_batch_in_budget']}**")
    return out + [""]


def render(results: dict[str, Any]) -> str:
    out = ["# fscs perf results (issue 7)", "", f"- date: {results['date']}",
           f"- command: `{results['command']}`", f"- device: {results['device']}",
           f"- clock: {results['clock']}"]
    out += [f"- {k}: {v}" for k, v in results["machine"].items()]
    out += [f"- shards: {results['shards']}", f"- profile: {results['profile']}", ""]
    if results.get("equivalence"):
        out += _equivalence(results["equivalence"])
    for section in (_step, _eval, _loader, _precision, _scaling, _memory):
        out += section(results)
    if results["errors"]:
        out += ["## Errors", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()] + [""]
    return "\n".join(out) + "\n"
