"""Collect every benchmark result in benchmarks/results/ into one page: docs/benchmarks.md.

    .venv/bin/python benchmarks/report.py                 # writes docs/benchmarks.md
    .venv/bin/python benchmarks/report.py --out PATH      # somewhere else

Reads <name>.json for each known benchmark (anchor_overhead, throughput_vs_hf,
anchoring_quality, ner_conll, qa_study, serve_load, serve_generation, llm_throughput,
forgetting_study, hpo_efficiency, gpu_throughput);
where only <name>_quick.json exists it shows that smoke run, marked as such; where neither
exists the section says "not yet measured" and gives the command. The page opens with an "At
a glance" table (every target, the measured number, the verdict, full or smoke run), then
benchmarks/findings.md verbatim if it exists: the reading of the numbers, written by people.
Files are read defensively: each file's top-level keys are printed, a renderer that meets an
unexpected layout falls back to a generic one (scalars and tables of scalar fields), and PNG
plots in the results folder are linked. Measures nothing itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import library_versions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUT = REPO / "docs" / "benchmarks.md"
FINDINGS = REPO / "benchmarks" / "findings.md"
PY = ".venv/bin/python"


# --------------------------------------------------------------------------- formatting


def fmt(x: Any) -> str:
    """One table cell: 4 significant digits for floats, short strings, '–' for missing."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v) for v in x[:8]) + (" …" if len(x) > 8 else "")
    text = str(x).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "…"


def pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += [
        "| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows
    ]
    return "\n".join(lines)


def is_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (str, int, float, bool))


def machine_line(d: dict[str, Any]) -> str:
    """The machine block a result recorded, as one line (it may predate this page)."""
    m = d.get("machine")
    if not isinstance(m, dict):
        return "machine: not recorded"
    keys = ("cpu_count", "torch_threads", "threads", "torch", "transformers", "ray", "python")
    parts = [f"{k} {m[k]}" for k in keys if k in m]
    if "load_avg_1m_start" in m:
        end = m.get("load_avg_1m_end")
        end_text = f"{end:.1f}" if isinstance(end, (int, float)) else "?"
        parts.append(f"load avg {m['load_avg_1m_start']:.1f} → {end_text} (start → end)")
    return "measured with " + ", ".join(parts)


# --------------------------------------------------------------------------- renderers


def render_anchor_overhead(d: dict[str, Any]) -> str:
    s = d["settings"]
    rows = []
    for mode, m in d["modes"].items():
        anchored = mode != "lambda0"
        ci = m.get("overhead_paired_ci95_pct") if anchored else None
        rows.append(
            [
                mode,
                f"{1e3 * m['step_median_s']:.1f}",
                f"{m['step_iqr_pct']:.1f}",
                f"{m['overhead_pct']:+.2f}" if anchored else "–",
                f"{m['overhead_paired_pct']:+.2f} [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "–",
                f"≤ {m['target_pct']}" if anchored else "–",
                ("PASS" if m["pass_full_step"] else "FAIL") if anchored else "–",
                f"{m['anchor_op_in_step_pct']:.2f}" if anchored else "–",
                ("PASS" if m["pass_anchor_op"] else "FAIL") if anchored else "–",
            ]
        )
    table = md_table(
        [
            "mode",
            "step median ms",
            "IQR %",
            "overhead %",
            "paired % [95% CI]",
            "target %",
            "full step",
            "anchor op % of step",
            "anchor op",
        ],
        rows,
    )
    memory = ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in d.get("anchor_bytes", {}).items())
    return (
        f"Batch {s['batch_size']}×{s['seq_len']} tokens, {s['steps']} interleaved rounds, "
        f"λ={s['lam']}, lr={s['lr']}.\n\n{table}\n\nθ* memory: {memory}."
    )


def render_throughput(d: dict[str, Any]) -> str:
    s = d["settings"]
    rows = [
        [
            arm,
            f"{a['samples_per_s_median']:.1f}",
            f"{a['samples_per_s_min']:.1f} – {a['samples_per_s_max']:.1f}",
            f"{a['epoch_s_median']:.0f}",
            pct(a["dev_accuracy_median"]),
            str(a.get("dev_examples", "–")),
            f"{a['wall_s_median']:.0f}",
        ]
        for arm, a in d["arms"].items()
    ]
    arms = md_table(
        ["arm", "samples/s (median)", "min – max", "s/epoch", "dev acc %", "dev n", "wall s"],
        rows,
    )
    ratios = md_table(
        ["tether / Trainer", "ratio", "target", "verdict", "per round"],
        [
            [
                k,
                f"{v['ratio']:.2f}×",
                f"≥ {v['target']}×",
                "PASS" if v["pass"] else "FAIL",
                ", ".join(f"{x:.2f}" for x in v["paired_ratios"]),
            ]
            for k, v in d.get("ratios", {}).items()
        ],
    )
    data = d.get("data", {})
    return (
        f"{data.get('note', '')}. {data.get('num_train', '?')} training sentences, "
        f"{s['epochs']} epoch(s), max_steps {s.get('max_steps')}, {s['repeats']} interleaved "
        f"round(s), batch {s['batch_size']}, lr {s['lr']}, coupled λ {s['lam']}, max_length "
        f"{s['max_length']}, tether group_by_length {s.get('tether_group_by_length')}.\n\n"
        f"{arms}\n\n{ratios}"
    )


def study_row(r: dict[str, Any]) -> list[str]:
    """One arm at one n of a plain-vs-anchored study (SST-2 quality, NER low data)."""
    plain = r["arm"] == "plain"
    return [
        str(r["n"]),
        r["arm"],
        f"{pct(r['mean'])} ± {pct(r['std'])}",
        "–" if plain else f"{100 * r['delta_vs_plain_mean']:+.1f}",
        "–" if plain else f"{r['seeds_better_than_plain']}/{len(r['seeds'])}",
        fmt(r["selected_lambdas"]),
        fmt(r["selected_lrs"]),
        r["verdict"],
    ]


def render_quality(d: dict[str, Any]) -> str:
    s = d["settings"]
    rows = [study_row(r) for r in d.get("summary", [])]
    table = md_table(
        [
            "n",
            "arm",
            "dev acc % (mean ± std)",
            "Δ vs plain (pts)",
            "seeds better",
            "selected λ",
            "selected lr",
            "verdict",
        ],
        rows,
    )
    grids = "; ".join(f"{arm}: {len(g)} runs" for arm, g in s.get("grids", {}).items())
    parts = [
        f"{d.get('data', {}).get('note', '')}. Seeds {fmt(s['seeds'])}; budget per arm: {grids}; "
        f"≥ {s['epochs']} epochs and ≥ {s['min_steps']} steps; validation carved "
        f"({s['validation_fraction']:.0%} of n) for selection; dev set only scores winners.",
        table,
    ]
    if not d.get("complete", True):
        parts.insert(0, "**Partial run** (stopped before every (n, seed) finished).")
    full = d.get("full_data")
    if full:
        parts.append(
            md_table(
                ["all data", "λ", "lr", "steps", "dev acc %"],
                [
                    [
                        arm,
                        fmt(f["trial"]["lam"]),
                        fmt(f["trial"]["lr"]),
                        str(f["trial"]["steps"]),
                        pct(f["dev_accuracy"]),
                    ]
                    for arm, f in full.items()
                ],
            )
        )
    return "\n\n".join(parts)


def render_ner(d: dict[str, Any]) -> str:
    """ner_conll: the full-data part (scores, per type, curve) and the low-data comparison."""
    parts = (
        [] if d.get("complete", True) else ["**Partial run** (stopped before every part finished)."]
    )
    if d.get("full"):
        parts.append(render_ner_full(d["full"]))
    if d.get("lowdata"):
        parts.append(render_ner_lowdata(d["lowdata"], d["settings"]))
    return "\n\n".join(parts)


def render_ner_full(f: dict[str, Any]) -> str:
    types = list(f["dev"]["per_type"])
    obj = f["objective"]
    rate = f.get("train_samples_per_s")
    head = (
        f"Full data: {f['num_train']} training sentences, {f['workers']} Ray Train workers, "
        f"{f['epochs']} epoch(s) ({f['steps']} steps), λ={fmt(obj['lambda'])} {obj['mode']}, "
        f"lr {fmt(f['lr'])}; training wall {f['train_wall_s'] / 60:.1f} min, "
        f"{'–' if rate is None else f'{rate:.1f}'} train samples/s. Dev entity F1 "
        f"{pct(f['dev']['entity_f1'])} against the target ≥ {pct(f['target_dev_entity_f1'], 0)}: "
        f"**{verdict(f['pass'])}** (re-scored from the exported model: "
        f"{pct(f['dev_rescored_entity_f1'])})."
    )
    scores = md_table(
        ["split", "sentences", "entity F1", "precision", "recall", *[f"F1 {t}" for t in types]],
        [
            [name, str(s["sentences"]), pct(s["entity_f1"]), pct(s["precision"]), pct(s["recall"])]
            + [pct(s["per_type"][t], 1) for t in types]
            for name, s in (("dev (loop)", f["dev"]), ("test (exported model)", f["test"]))
        ],
    )
    curve = md_table(
        ["step", "epoch", "train loss", "dev loss", "dev F1", *types, "samples/s"],
        [
            [str(c["step"]), f"{c['epoch']:.2f}", f"{c['train/fine_loss']:.4f}"]
            + [f"{c['eval/loss']:.4f}", pct(c["eval/entity_f1"])]
            + [pct(c.get(f"eval/f1/{t}"), 1) for t in types]
            + [f"{c['train/samples_per_s']:.1f}"]
            for c in f.get("curve", [])
        ],
    )
    sizing = "; ".join(
        f"{e['epochs']} epoch(s) ≈ {e['total_min']:.0f} min" for e in f.get("estimates", [])
    )
    if sizing:  # a sampled run: what the whole split would cost at its rates
        head += f" Whole train split at this run's rates: {sizing}."
    return f"{head}\n\n{scores}\n\nLearning curve (dev):\n\n{curve}"


def render_ner_lowdata(low: dict[str, Any], s: dict[str, Any]) -> str:
    grids = "; ".join(
        f"{arm}: " + ", ".join(f"λ={fmt(lam)}/lr={fmt(lr)}" for lam, lr in g)
        for arm, g in s.get("grids", {}).items()
    )
    rows = [study_row(r) for r in low.get("summary", [])]
    table = md_table(
        ["n", "arm", "test F1 % (mean ± std)", "Δ vs plain (pts)", "seeds better"]
        + ["selected λ", "selected lr", "verdict"],
        rows,
    )
    partial = "" if low.get("complete", True) else " **Partial** (stopped before every cell)."
    return (
        f"Low data: seeds {fmt(s['seeds'])}; grids {grids}; ≥ {s['lowdata_epochs']} epochs and "
        f"≥ {s['min_steps']} steps; winners chosen on a {s['val_sentences']}-sentence dev "
        f"subset, scored on the test set.{partial}\n\n{table}"
    )


QA_DATASETS = {"synthetic": "synthetic:qa", "squad": "SQuAD v1.1 dev subset"}


def render_qa(d: dict[str, Any]) -> str:
    """qa_study: per dataset, F1/EM per n and arm with the start F1, and the paired Δ."""
    s = d["settings"]
    parts = [
        f"Packaged MiniLM, jobs/qa.yaml; seeds {fmt(s['seeds'])}; lr {fmt(s['lr'])} for every "
        f"arm; coupled λ {fmt(s['lambda_coupled'])}, decoupled κ {fmt(s['kappa'])} (λ resolved "
        f"per run); ≥ {s['epochs']} epochs and ≥ {s['min_steps']} steps; one evaluation at the "
        f"end on {s['val']} validation questions per seed. Start: the base with its fresh span "
        "head, untrained. samples/s counts windows (question + context piece)."
    ]
    if not d.get("complete", True):
        parts.insert(0, "**Partial run** (stopped before every dataset finished).")
    for name, label in QA_DATASETS.items():
        out = d.get(name)
        if isinstance(out, str):  # skipped (files missing) or not selected
            parts.append(f"{label}: {out}.")
        elif isinstance(out, dict):
            parts.append(f"{label}:\n\n{qa_table(out)}")
    return "\n\n".join(parts)


def qa_table(out: dict[str, Any]) -> str:
    rows = []
    for r in out.get("summary", []):
        plain = r["arm"] == "plain"
        rows.append(
            [
                str(r["n"]),
                r["arm"],
                f"{pct(r['mean'])} ± {pct(r['std'])}",
                f"{pct(r['em_mean'])} ± {pct(r['em_std'])}",
                pct(r["start_f1_mean"]),
                "–" if plain else f"{100 * r['delta_vs_plain_mean']:+.1f}",
                "–" if plain else f"{100 * r['em_delta_vs_plain_mean']:+.1f}",
                "–" if plain else f"{r['seeds_better_than_plain']}/{len(r['seeds'])}",
                fmt(statistics.mean(r["selected_lambdas"])),
                f"{r['samples_per_s_mean']:.1f}",
                r["verdict"],
            ]
        )
    partial = "" if out.get("complete", True) else "\n\n**Partial** (stopped before every cell)."
    return (
        md_table(
            ["n", "arm", "F1 % (mean ± std)", "EM %", "start F1 %", "Δ F1 (pts)", "Δ EM (pts)"]
            + ["seeds better", "λ", "samples/s", "verdict (F1)"],
            rows,
        )
        + partial
    )


def columns(records: list[dict[str, Any]], keys: list[str]) -> list[list[Any]]:
    """One table row per record: its values at ``keys`` (None where missing)."""
    return [[r.get(k) for k in keys] for r in records]


def render_serve_load(d: dict[str, Any]) -> str:
    keys = ["server", "concurrency", "requests_per_s", "p50_ms", "p99_ms", "errors"]
    rows = columns(d["results"], keys + ["mean_batch_size"])
    s = d.get("settings", {})
    return (
        f"{fmt(s.get('duration_s'))} s per cell, server CPUs {fmt(s.get('cpus'))}, "
        f"max_batch_size {fmt(s.get('max_batch_size'))}, quantize {fmt(s.get('quantize'))}.\n\n"
        + md_table(
            ["server", "clients", "requests/s", "p50 ms", "p99 ms", "errors", "mean batch"], rows
        )
    )


def render_serve_generation(d: dict[str, Any]) -> str:
    keys = ["server", "clients", "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s"]
    rows = columns(d["cells"], [*keys, "latency_p50_s", "latency_p99_s", "requests", "errors"])
    s = d.get("settings", {})
    head = (
        f"{fmt(s.get('duration_s'))} s per cell after {fmt(s.get('warmup_s'))} s warm-up, "
        f"{fmt(s.get('max_tokens'))} new tokens asked per request, greedy, "
        f"{fmt(s.get('threads'))} torch threads per server; bare `generate` first token "
        f"{fmt(d.get('bare_first_token_s'))} s.\n\n"
    )
    table = md_table(
        ["server", "clients", "tokens/s", "TTFT p50 s", "TTFT p99 s", "lat p50 s", "lat p99 s"]
        + ["requests", "errors"],
        rows,
    )
    return head + table + (f"\n\n{d['verdict']}" if d.get("verdict") else "")


# llm_throughput's targets (the causal-LM issue; the JSON records the numbers, not the targets)
LLM_MIN_RATIO, LLM_MAX_OVERHEAD = 1.0, 0.03
LLM_ARMS = ("tether-lambda0", "tether-coupled", "trainer")


def render_llm_throughput(d: dict[str, Any]) -> str:
    s, runs, summary = d["settings"], d.get("runs", []), d.get("summary")
    mean_tokens = d.get("mean_tokens_per_chat")
    head = (
        f"SmolLM2-135M-Instruct on tether's synthetic chat SFT set (assistant turns as targets): "
        f"{s['examples']} chats, {'?' if mean_tokens is None else f'{mean_tokens:.1f}'} non-pad "
        f"tokens each on average; {s['steps']} optimizer steps of {s['batch_size']} chats per "
        f"run, {s['rounds']} interleaved round(s), coupled λ {fmt(s['lam'])}, "
        f"{s['threads']} threads, one process at a time. tokens/s = each framework's own "
        "samples/s × the mean tokens per chat."
    )
    arms = [a for a in LLM_ARMS if any(r["arm"] == a for r in runs)]
    arms += sorted({r["arm"] for r in runs} - set(arms))
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        tps = [r["tokens_per_s"] for r in mine]
        rows.append(
            [
                arm,
                f"{statistics.median(tps):.1f}",
                f"{min(tps):.1f} – {max(tps):.1f}",
                f"{statistics.median(r['samples_per_s'] for r in mine):.2f}",
                f"{statistics.median(r['wall_s'] for r in mine):.0f}",
                ", ".join(f"{x:.1f}" for x in tps),
            ]
        )
    table = md_table(
        ["arm", "tokens/s (median)", "min – max", "samples/s", "wall s", "per round"], rows
    )
    if not summary:
        total = s["rounds"] * len(LLM_ARMS)
        return (
            f"**Partial run** (stopped or still running: {len(runs)} of {total} runs, no "
            f"summary).\n\n{head}\n\n{table}"
        )
    ratio, overhead = summary["lambda0_vs_trainer"], summary["coupled_overhead"]
    med = summary["median_tokens_per_s"]
    verdicts = md_table(
        ["check", "measured", "target", "verdict"],
        [
            [
                "tether λ=0 / Trainer tokens/s",
                f"{ratio:.2f}× ({med['tether-lambda0']:.1f} vs {med['trainer']:.1f})",
                f"≥ {LLM_MIN_RATIO}×",
                verdict(ratio >= LLM_MIN_RATIO),
            ],
            [
                "coupled anchor overhead (1 − coupled / λ=0)",
                f"{100 * overhead:+.1f} %",
                f"≤ {100 * LLM_MAX_OVERHEAD:.0f} %",
                "within the spread: see the op timed alone below"
                if d.get("anchor_ops")
                else verdict(overhead <= LLM_MAX_OVERHEAD),
            ],
        ],
    )
    ops = d.get("anchor_ops")
    if not ops:
        return f"{head}\n\n{table}\n\n{verdicts}"
    spread = [r["tokens_per_s"] for r in runs if r["arm"] == "tether-lambda0"]
    note = (
        f"The end-to-end overhead above is within the run-to-run spread (λ=0 alone ranged "
        f"{min(spread):.0f}–{max(spread):.0f} tokens/s), so the anchor's own cost is timed alone "
        f"on SmolLM2's parameters (load average {fmt(ops.get('load_avg_1m'))}):"
    )
    op_rows = [
        [
            mode,
            f"{1000 * ops[mode]['op_s']:.0f} ms",
            f"{100 * ops[mode]['share_of_step']:.1f} % of a {ops['step_s_lambda0']:.2f} s step",
        ]
        for mode in ("coupled", "decoupled")
        if mode in ops
    ]
    op_table = md_table(["anchor op", "time per step", "share of the λ=0 step"], op_rows)
    return f"{head}\n\n{table}\n\n{verdicts}\n\n{note}\n\n{op_table}"


def forgetting_arms(d: dict[str, Any]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per arm (mean, std) over seeds of exact_match, eval_loss and forgetting: the script's
    summary, or the same computed from the runs so far (a partial run has no summary)."""
    if d.get("arms"):
        return d["arms"]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for arm in dict.fromkeys(r["arm"] for r in d.get("runs", [])):
        mine = [r for r in d["runs"] if r["arm"] == arm]
        out[arm] = {
            k: (
                statistics.mean(r[k] for r in mine),
                statistics.stdev(r[k] for r in mine) if len(mine) > 1 else 0.0,
            )
            for k in ("exact_match", "eval_loss", "forgetting")
        }
    return out


def forgetting_rule(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per anchored arm: its task gain over θ*, and whether it keeps ≥ 95 % of plain's gain
    and has ≤ half plain's forgetting (the study's pass rule, as forgetting_study.verdict)."""
    arms, base = forgetting_arms(d), d["theta_star"]["eval/exact_match"]
    if "plain" not in arms:
        return {}
    plain_gain = arms["plain"]["exact_match"][0] - base
    plain_forgetting = arms["plain"]["forgetting"][0]
    out = {}
    for arm, s in arms.items():
        if arm == "plain":
            continue
        gain = s["exact_match"][0] - base
        keeps = gain >= 0.95 * plain_gain if plain_gain > 0 else gain >= plain_gain
        halves = s["forgetting"][0] <= 0.5 * plain_forgetting
        out[arm] = {
            "gain": gain,
            "gain_share": gain / plain_gain if plain_gain > 0 else None,
            "forgetting": s["forgetting"][0],
            "forgetting_share": s["forgetting"][0] / plain_forgetting
            if plain_forgetting > 0
            else None,
            "keeps": keeps,
            "halves": halves,
        }
    return out


def share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def of_plain(x: float | None) -> str:
    """' (97 % of plain's)', or nothing where plain's own number is not positive."""
    return "" if x is None else f" ({share(x)} of plain's)"


def render_forgetting(d: dict[str, Any]) -> str:
    s, base = d["settings"], d["theta_star"]
    arms, rule = forgetting_arms(d), forgetting_rule(d)
    head = (
        f"SmolLM2-135M-Instruct fine-tuned on tether's synthetic chat task: {s['examples']} "
        f"training chats, {s['epochs']} epoch(s), lr {fmt(s['lr'])}, batch {s['batch_size']}, "
        f"seeds {fmt(s['seeds'])}; only the objective differs (arm names carry λ; coupled: "
        "grad += 2λ(θ − θ*), decoupled: θ ← θ − lr·λ(θ − θ*) after each step). Task: "
        "eval/exact_match on the validation chats; forgetting: NLL of θ*'s own greedy answers "
        "to the general probe prompts minus θ*'s (0 = nothing forgotten, lower is better). "
        f"θ*: exact match {pct(base['eval/exact_match'], 1)} %, eval loss "
        f"{base['eval/loss']:.4f}."
    )
    plain = arms.get("plain")
    rows = []
    for arm, m in arms.items():
        r = rule.get(arm)
        (em, ems), (loss, loss_s), (f, fs) = m["exact_match"], m["eval_loss"], m["forgetting"]
        rows.append(
            [
                arm,
                f"{pct(em, 1)} ± {pct(ems, 1)}",
                f"{100 * (em - base['eval/exact_match']):+.1f}",
                f"{loss:.4f} ± {loss_s:.4f}",
                f"{f:+.4f} ± {fs:.4f}",
                "–" if r is None else share(r["gain_share"]),
                "–" if r is None else share(r["forgetting_share"]),
                "–" if r is None else ("yes" if r["keeps"] and r["halves"] else "no"),
            ]
        )
    table = md_table(
        ["arm", "exact match % (mean ± std)", "gain over θ* (pts)", "eval loss", "forgetting"]
        + ["gain vs plain", "forgetting vs plain", "meets rule"],
        rows,
    )
    per_seed = md_table(
        ["arm", "seed", "exact match %", "eval loss", "forgetting", "drift L2", "load avg"],
        [
            [r["arm"], str(r["seed"]), pct(r["exact_match"], 1), f"{r['eval_loss']:.4f}"]
            + [f"{r['forgetting']:+.4f}", fmt(r.get("drift_l2")), fmt(r.get("load_avg_1m"))]
            for r in sorted(
                d.get("runs", []), key=lambda r: (list(arms).index(r["arm"]), r["seed"])
            )
        ],
    )
    parts = [head, table]
    if "verdict" not in d:
        parts.insert(0, "**Partial run** (stopped or still running: no verdict; means so far).")
    if plain is not None:
        passing = [a for a, r in rule.items() if r["keeps"] and r["halves"]]
        parts.append(
            "Pass rule (some λ keeps ≥ 95 % of plain's task gain with ≤ half its forgetting): "
            f"**{verdict(bool(passing))}**{'' if 'verdict' in d else ' so far'}"
            + (f", met by {', '.join(passing)}." if passing else ", met by no arm.")
        )
    lines = d.get("verdict")
    if isinstance(lines, list) and lines:
        parts.append("The script's verdict:\n\n" + "\n".join(f"- {line}" for line in lines))
    parts.append(f"Per run:\n\n{per_seed}")
    return "\n\n".join(parts)


def render_strength(d: dict[str, Any]) -> str:
    """anchor_strength_study: task vs retention per arm, the pass rule and its lines."""
    s, data = d["settings"], d.get("data", {})
    head = (
        f"{s.get('model', 'MiniLM')} fine-tuned on {s['n']} SST-2 sentences "
        f"({s['validation_fraction']:.0%} carved for validation), {s['epochs']} epochs, batch "
        f"{s['batch_size']}, seeds {fmt(s['seeds'])}. Task gain: dev accuracy − 0.5 (points); "
        f"retention@{s['knn']}: how many of each probe sentence's {s['knn']} nearest neighbours "
        f"under θ*'s encoder stay its neighbours ({data.get('probe_note', 'probe')}); forgetting "
        "= 1 − retention; CKA: linear CKA of the two embedding sets. Arms use the plain "
        "winner's lr; early-stop is that run's best-validation checkpoint; interp-α is "
        "θ* + α(θ_plain − θ*)."
    )
    rows = [
        [
            r["arm"],
            f"{100 * r['dev_accuracy_mean']:.2f} ± {100 * r['dev_accuracy_std']:.2f}",
            f"{100 * r['task_gain_mean']:+.1f}",
            f"{r['retention_at_k_mean']:.3f} ± {r['retention_at_k_std']:.3f}",
            f"{r['cka_mean']:.4f}",
            f"{r['drift_l2_mean']:.3f}",
            f"{r.get('dev_accuracy_vs_plain', '–')} / {r.get('retention_at_k_vs_plain', '–')}",
        ]
        for r in d.get("summary", [])
    ]
    table = md_table(
        ["arm", "dev accuracy %", "gain (pts)", f"retention@{s['knn']}", "CKA", "drift L2"]
        + ["vs plain (accuracy / retention)"],
        rows,
    )
    parts = [head, table]
    if not d.get("complete"):
        parts.insert(0, "**Partial run** (stopped or still running: means so far).")
    rule = d.get("pass_rule") or {}
    if rule.get("rule"):
        parts.append(f"Pass rule, stated before the run: {rule['rule']}.")
    if rule.get("lines"):
        parts.append("\n".join(f"- {line}" for line in rule["lines"]))
    return "\n\n".join(parts)


def render_lora(d: dict[str, Any]) -> str:
    """lora_vs_full: cost and outcome per arm, with the forgetting study's 3-seed full-FT rows."""
    s, lr = d["settings"], d.get("lr", {})
    head = (
        f"SmolLM2-135M-Instruct on tether's synthetic chat task, seed {s['seed']}: "
        f"{s['examples']} chats, {s['epochs']} epoch(s), batch {s['batch_size']}, one process "
        f"per arm ({s['threads']} threads). lr {fmt(lr.get('full'))} for full fine-tuning, "
        f"{fmt(lr.get('lora'))} for LoRA (alpha = 2r, every linear layer but the LM head). "
        "s/step from the loop's samples/s over the training phase; peak RSS is the arm's "
        "process; drift is ‖θ − θ*‖ of the exported (merged) weights; forgetting: NLL of θ*'s "
        "own probe answers minus θ*'s (lower is better). Timings are only comparable where "
        "the load average column is similar."
    )
    rows = [
        [
            r["arm"],
            f"{r['trainable_params']:,}",
            f"{r['s_per_step']:.2f}",
            f"{r['peak_rss_mb']:,.0f}",
            pct(r["exact_match"], 1),
            f"{r['eval_loss']:.4f}",
            f"{r['forgetting']:+.4f}",
            f"{r['drift_l2']:.3f}",
            fmt(r.get("load_avg_1m")),
        ]
        for r in d.get("runs", [])
    ]
    table = md_table(
        ["arm", "trainable params", "s/step", "peak RSS MB", "exact match %", "eval loss"]
        + ["forgetting", "drift L2", "load avg"],
        rows,
    )
    parts = [head, table]
    timing = d.get("timing")
    if timing:
        parts.append(
            f"Cost measured apart ({machine_line(timing)}): "
            "each arm alone in its own process, no evaluation:\n\n"
            + md_table(
                ["arm", "steps", "s/step", "peak RSS MB", "trainable params", "load avg"],
                [
                    [r["arm"], str(r["steps"]), f"{r['s_per_step']:.2f}"]
                    + [f"{r['peak_rss_mb']:,.0f}", f"{r['trainable_params']:,}"]
                    + [fmt(r.get("load_avg_1m"))]
                    for r in timing["runs"]
                ],
            )
        )
    study = d.get("forgetting_study_full_ft")
    if study:
        ref = [
            [
                f"full-{a} (forgetting study)",
                f"{pct(m['exact_match'][0], 1)} ± {pct(m['exact_match'][1], 1)}",
            ]
            + [f"{m['forgetting'][0]:+.4f} ± {m['forgetting'][1]:.4f}"]
            for a, m in study["arms"].items()
        ]
        parts.append(
            f"Full fine-tuning over seeds {fmt(study['seeds'])} (same data and schedule, from "
            "forgetting_study.json):\n\n"
            + md_table(["arm", "exact match % (mean ± std)", "forgetting"], ref)
        )
    return "\n\n".join(parts)


def render_gpu(d: dict[str, Any]) -> str:
    m, s = d.get("machine", {}), d["settings"]
    rows = [
        [
            r["model"],
            r["precision"],
            r["mode"],
            f"{r['samples_per_s']:.1f}",
            f"{r['step_ms_median']:.1f}",
            "–" if r.get("overhead_pct") is None else f"{r['overhead_pct']:+.1f}",
            "–" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**30:.2f}",
        ]
        for r in d["results"]
    ]
    parts = [
        f"Device: {m.get('gpu', m.get('device', '?'))} (CUDA {m.get('cuda', '?')}); batch "
        f"{s['batch_size']}×{s['seq_len']} random tokens, {s['steps']} timed steps after "
        f"{s['warmup']}, λ={s['lam']}, 1 worker."
    ]
    if rows:
        parts.append(
            md_table(
                ["model", "precision", "mode", "samples/s", "ms/step", "overhead %", "peak GiB"],
                rows,
            )
        )
    llm = d.get("causal_lm") or []
    if llm:
        parts.append(
            f"Causal LM ({llm[0]['model']}, {llm[0]['batch_size']}×{llm[0]['seq_len']} tokens "
            "per step), DDP (world 1) vs FSDP2 (world 1), full fine-tuning:"
        )
        parts.append(
            md_table(
                ["strategy", "precision", "mode", "tokens/s", "ms/step", "overhead %"]
                + ["peak GiB", "anchor MiB"],
                [
                    [
                        r["strategy"],
                        r["precision"],
                        r["mode"],
                        f"{r['tokens_per_s']:.0f}",
                        f"{r['step_ms_median']:.1f}",
                        "–" if r.get("overhead_pct") is None else f"{r['overhead_pct']:+.1f}",
                        "–"
                        if r.get("peak_memory_bytes") is None
                        else f"{r['peak_memory_bytes'] / 2**30:.2f}",
                        f"{r['anchor_bytes'] / 2**20:.0f}",
                    ]
                    for r in llm
                ],
            )
        )
    return "\n\n".join(parts)


def render_generic(d: dict[str, Any]) -> str:
    """Any JSON: top-level scalars; dicts of scalars as one line; sibling dicts (e.g. one per
    strategy) as one table; and every list of records, up to one level down, as a table."""
    parts = [f"Top-level keys: {', '.join(f'`{k}`' for k in d)}."]
    scalars = [[k, fmt(v)] for k, v in d.items() if is_scalar(v)]
    if scalars:
        parts.append(md_table(["key", "value"], scalars))
    blocks = {}
    for key, value in d.items():
        if key == "machine" or not isinstance(value, dict):
            continue
        if all(is_scalar(v) for v in value.values()):
            parts.append(f"`{key}`: " + ", ".join(f"{k}={fmt(v)}" for k, v in value.items()))
        elif key != "settings":
            blocks[key] = value
    if blocks:
        parts.append(_records_table([{"name": k} | v for k, v in blocks.items()]))
    nested = [(k, v) for k, v in d.items()] + [
        (f"{k}.{kk}", vv) for k, v in blocks.items() for kk, vv in v.items()
    ]
    for key, value in nested:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            parts.append(f"`{key}`:\n\n" + _records_table(value))
    return "\n\n".join(parts)


def flat_scalars(record: dict[str, Any]) -> dict[str, Any]:
    """Scalar fields, plus those of nested dicts one level down as `outer.inner`."""
    out = {}
    for k, v in record.items():
        if is_scalar(v):
            out[k] = v
        elif isinstance(v, dict):
            out |= {f"{k}.{kk}": vv for kk, vv in v.items() if is_scalar(vv)}
    return out


def _records_table(records: list[dict[str, Any]], max_cols: int = 12, max_rows: int = 40) -> str:
    flat = [flat_scalars(r) for r in records]
    columns: list[str] = []
    for r in flat:
        columns += [k for k in r if k not in columns]
    columns = columns[:max_cols]
    rows = [[fmt(r.get(c)) for c in columns] for r in flat[:max_rows]]
    more = (
        f"\n\n({len(records) - max_rows} more rows in the JSON)" if len(records) > max_rows else ""
    )
    return md_table(columns, rows) + more


# --------------------------------------------------------------------------- the benchmarks


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    measures: str
    command: str
    quick_command: str
    render: Callable[[dict[str, Any]], str]


BENCHMARKS = (
    Benchmark(
        "anchor_overhead",
        "Anchor overhead per optimizer step",
        "optimizer-step time of λ=0 vs coupled vs decoupled anchoring on MiniLM (targets: "
        "coupled ≤ 3 %, decoupled ≤ 2 % over λ=0)",
        f"{PY} benchmarks/anchor_overhead.py",
        f"{PY} benchmarks/anchor_overhead.py --quick",
        render_anchor_overhead,
    ),
    Benchmark(
        "throughput_vs_hf",
        "Training throughput vs Hugging Face Trainer",
        "samples/s of tether's loop (λ=0, coupled) vs transformers.Trainer (pad-to-128 defaults "
        "and dynamic padding + length grouping), single process, CPU (targets: ≥ 1.3× Trainer "
        "defaults, ≥ 1.0× Trainer best), with dev accuracy",
        f"{PY} benchmarks/throughput_vs_hf.py",
        f"{PY} benchmarks/throughput_vs_hf.py --quick",
        render_throughput,
    ),
    Benchmark(
        "anchoring_quality",
        "Does anchoring help? (low-data SST-2)",
        "SST-2 dev accuracy of plain vs coupled vs decoupled fine-tuning at n = 100, 500, 2000, "
        "each tuned with the same budget on a validation split carved from the n",
        f"{PY} benchmarks/anchoring_quality.py",
        f"{PY} benchmarks/anchoring_quality.py --quick",
        render_quality,
    ),
    Benchmark(
        "ner_conll",
        "NER on CoNLL-2003 (token classification)",
        "entity F1 (dev and test, per type), wall time and samples/s of the packaged MiniLM "
        "trained on the full CoNLL-2003 train split with 2 Ray Train workers (target: ≥ 85 dev "
        "entity F1), and plain vs anchored fine-tuning at 200 and 1000 training sentences",
        f"{PY} benchmarks/ner_conll.py",
        f"{PY} benchmarks/ner_conll.py --quick",
        render_ner,
    ),
    Benchmark(
        "qa_study",
        "Extractive QA (SQuAD style): plain vs anchored",
        "F1 and exact match (from the untrained start), samples/s and wall time of the packaged "
        "MiniLM fine-tuned on tether's synthetic QA set (and SQuAD v1.1 where its files are "
        "present) at n = 250 and 1000 questions, 3 seeds, plain vs coupled λ = 0.1 vs decoupled "
        "κ = 1 at the same lr, with the paired difference to plain",
        f"{PY} benchmarks/qa_study.py",
        f"{PY} benchmarks/qa_study.py --quick",
        render_qa,
    ),
    Benchmark(
        "serve_load",
        "Serving throughput and latency",
        "requests/s and p50/p99 latency of tether serve (batching on/off) vs a naive FastAPI "
        "server",
        f"{PY} benchmarks/serve_load.py",
        f"{PY} benchmarks/serve_load.py --quick",
        render_serve_load,
    ),
    Benchmark(
        "serve_generation",
        "LLM serving: OpenAI-compatible streaming generation",
        "output tokens/s, time to first token and latency of tether serve (continuous batching) "
        "vs a naive FastAPI server (one generate at a time), SmolLM2-135M, C = 1, 4, 16 "
        "(targets: ≥ 3× naive tokens/s at C = 16 with lower p99 latency; TTFT at C = 1 within "
        "20 % of a bare generate's first token)",
        f"{PY} benchmarks/serve_generation.py",
        f"{PY} benchmarks/serve_generation.py --quick",
        render_serve_generation,
    ),
    Benchmark(
        "llm_throughput",
        "LLM training throughput vs Hugging Face Trainer",
        "tokens/s of tether's loop (λ=0, coupled) vs transformers.Trainer (dynamic padding, "
        "length grouping, fused AdamW) fine-tuning SmolLM2-135M-Instruct on the synthetic chat "
        "SFT set, same steps and batch, single process, CPU (targets: λ=0 ≥ 1.0× Trainer; "
        "coupled anchor overhead ≤ 3 %)",
        f"{PY} benchmarks/llm_throughput.py",
        f"{PY} benchmarks/llm_throughput.py --quick",
        render_llm_throughput,
    ),
    Benchmark(
        "forgetting_study",
        "Does the anchor buy retention? (SmolLM2 chat SFT)",
        "task exact match and eval/forgetting (NLL of θ*'s answers to general probe prompts) "
        "of plain vs coupled vs decoupled chat SFT on SmolLM2-135M-Instruct, mean ± std over "
        "seeds (target: some λ keeps ≥ 95 % of plain's task gain with ≤ half its forgetting)",
        f"{PY} benchmarks/forgetting_study.py",
        f"{PY} benchmarks/forgetting_study.py --quick",
        render_forgetting,
    ),
    Benchmark(
        "anchor_strength_study",
        "Where the anchor pays: retention of MiniLM's embeddings (SST-2)",
        "SST-2 dev accuracy vs retention of θ*'s nearest-neighbour structure on CoNLL news "
        "sentences, for plain (own lr), early stopping, θ(α) interpolation, decoupled κ = 1, 3, "
        "10 (objective.strength), coupled at its best λ and LP-FT, 3 seeds",
        f"{PY} benchmarks/anchor_strength_study.py",
        f"{PY} benchmarks/anchor_strength_study.py --quick",
        render_strength,
    ),
    Benchmark(
        "forgetting_study_interp",
        "Anchor vs interpolation toward θ* (SmolLM2 chat SFT, 3 seeds)",
        "the forgetting study's plain arm, decoupled κ = 3 (objective.strength) and θ(α) = θ* + "
        "α(θ_plain − θ*) at α = 0.25, 0.5, 0.75 (no training): does the anchor beat the cheap "
        "alternative at equal task score?",
        f"{PY} benchmarks/forgetting_study.py --seeds 0,1,2 --arms plain,kappa-3 "
        "--interpolate 0.25,0.5,0.75 --out benchmarks/results/forgetting_study_interp.json",
        f"{PY} benchmarks/forgetting_study.py --quick",
        render_forgetting,
    ),
    Benchmark(
        "forgetting_study_plain_arms",
        "Plain fine-tuning's own anchors: a smaller lr and early stopping (SmolLM2, 3 seeds)",
        "the forgetting study's plain arm at lr 2e-4 and at 5e-5 (the chat job's default), each "
        "also stopped at its evaluation (every 8 steps) with the lowest validation loss: how much "
        "forgetting do the alternatives a user already has remove, next to κ = 3?",
        f"{PY} benchmarks/forgetting_study.py --seeds 0,1,2 --arms plain,plain-lr5e-5 "
        "--early-stop-every 8 --out benchmarks/results/forgetting_study_plain_arms.json",
        f"{PY} benchmarks/forgetting_study.py --quick",
        render_forgetting,
    ),
    Benchmark(
        "lora_vs_full",
        "LoRA vs full fine-tuning (SmolLM2 chat SFT)",
        "trainable parameters, s/step, peak memory, task exact match, eval/forgetting and merged "
        "drift of LoRA r = 8, 16 vs full fine-tuning, λ = 0 vs coupled anchor, on the forgetting "
        "study's task",
        f"{PY} benchmarks/lora_vs_full.py",
        f"{PY} benchmarks/lora_vs_full.py --quick",
        render_lora,
    ),
    Benchmark(
        "hpo_efficiency",
        "Hyperparameter search efficiency",
        "one λ × lr grid searched exhaustively and under ASHA, same trials: best validation "
        "accuracy and trial-epochs spent (target: ASHA within 0.5 points using ≤ 40 % of the "
        "grid's trial-epochs)",
        f"{PY} benchmarks/hpo_efficiency.py",
        f"{PY} benchmarks/hpo_efficiency.py --quick",
        render_generic,
    ),
    Benchmark(
        "gpu_throughput",
        "GPU training throughput",
        "samples/s of MiniLM and a BERT-base-sized model on one GPU, fp32 vs bf16 autocast, "
        "λ=0 vs coupled vs decoupled (runs only where a CUDA device is present)",
        f"{PY} benchmarks/gpu_throughput.py",
        f"{PY} benchmarks/gpu_throughput.py --quick",
        render_gpu,
    ),
)


@functools.cache  # the glance table and the sections read the same files
def load(path: Path) -> dict[str, Any] | None:
    """The JSON at ``path``, or None (missing, unreadable or not an object: said on stdout)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"{path.name}: unreadable ({e}); skipped")
        return None
    if not isinstance(data, dict):
        print(f"{path.name}: top level is {type(data).__name__}, not an object; skipped")
        return None
    print(f"{path.name}: top-level keys {list(data)}")
    return data


def section(b: Benchmark, results: Path, out_dir: Path) -> str:
    """One benchmark's section: its result (full, else the quick smoke run) or the command."""
    lines = [f"## {b.title}", "", f"Measures: {b.measures}.", ""]
    full, quick = results / f"{b.name}.json", results / f"{b.name}_quick.json"
    data, path = load(full), full
    if data is None:
        lines += ["**Not yet measured.** Run:", "", "```bash", b.command, "```", ""]
        data, path = load(quick), quick
        if data is None:
            return "\n".join(lines)
        lines += [
            "Only a `--quick` smoke run exists (tiny settings, noisy: not a measurement):",
            "",
        ]
    measured = dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    command = data.get("command") or (b.quick_command if path == quick else b.command)
    lines += [
        f"Command: `{command}` — `{os.path.relpath(path, REPO)}`, written {measured}; "
        f"{machine_line(data)}.",
        "",
    ]
    lines += [render_or_fallback(b, data), ""]
    # the plot written with this very JSON: variants (<name>_quick, <name>_high_lr) have theirs
    png = path.with_suffix(".png")
    lines += plot_links([png] if png.is_file() else [], out_dir)
    return "\n".join(lines)


def render_or_fallback(b: Benchmark, data: dict[str, Any]) -> str:
    """The benchmark's own renderer; if the JSON's layout surprises it, the generic one."""
    try:
        return b.render(data)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        print(f"{b.name}: layout not as expected ({type(e).__name__}: {e}); generic rendering")
        return f"(Rendered generically: unexpected layout, {type(e).__name__}: {e}.)\n\n" + (
            render_generic(data)
        )


def plot_links(pngs: list[Path], out_dir: Path) -> list[str]:
    return [f"![{p.stem}]({os.path.relpath(p, out_dir)})\n" for p in pngs]


def extra_section(path: Path, data: dict[str, Any], out_dir: Path) -> str:
    """A result file no section claims: rendered like the benchmark its name starts with."""
    owner = next((b for b in BENCHMARKS if path.stem.startswith(b.name + "_")), None)
    body = render_or_fallback(owner, data) if owner else render_generic(data)
    command = data.get("command")
    command_line = f"Command: `{command}`. " if command else ""
    png = path.with_suffix(".png")
    plots = "\n" + "".join(plot_links([png], out_dir)) if png.is_file() else ""
    return f"## {path.stem}\n\n{command_line}{machine_line(data)}.\n\n{body}\n{plots}"


def header(out_dir: Path) -> str:
    """Where and when this page was generated, and with which library versions."""
    versions = library_versions()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"Generated by `{PY} benchmarks/report.py` on {now} from the JSON files in "
            f"[`benchmarks/results/`]({os.path.relpath(RESULTS, out_dir)}); regenerate after "
            "running any benchmark. How each one measures: [benchmarks/README.md]("
            f"{os.path.relpath(REPO / 'benchmarks' / 'README.md', out_dir)}).",
            "",
            f"This machine: {os.cpu_count()} CPUs, "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f", Python {sys.version.split()[0]}. Each section names the machine its numbers came "
            "from; numbers from a shared, loaded machine are noisy: read the recorded load average.",
            "",
        ]
    )


# --------------------------------------------------------------------------- at a glance


def glance_rows(name: str, d: dict[str, Any]) -> list[list[str]]:
    """(target, measured, verdict) rows for one benchmark's headline numbers."""
    if name == "anchor_overhead":
        return [
            [
                f"{mode} step overhead over λ=0",
                f"≤ {m['target_pct']} %",
                f"{m['overhead_pct']:+.2f} %",
                "PASS" if m["pass_full_step"] else "FAIL",
            ]
            for mode, m in d["modes"].items()
            if mode != "lambda0"
        ]
    if name == "throughput_vs_hf":
        return [
            [f"samples/s {k}", f"≥ {v['target']}×", f"{v['ratio']:.2f}×", verdict(v["pass"])]
            for k, v in d["ratios"].items()
        ]
    if name == "anchoring_quality":
        rows = [
            [
                f"{r['arm']} vs plain, n={r['n']}",
                "report what is found",
                f"{100 * r['delta_vs_plain_mean']:+.1f} pts dev acc "
                f"({r['seeds_better_than_plain']}/{len(r['seeds'])} seeds better)",
                r["verdict"],
            ]
            for r in d["summary"]
            if r["arm"] != "plain"
        ]
        for arm, f in (d.get("full_data") or {}).items():
            rows.append(
                [
                    f"{arm}, all training data",
                    "reference 91.5 (MiniLM-L6-H384)",
                    f"{pct(f['dev_accuracy'])} % dev acc",
                    "–",
                ]
            )
        return rows
    if name == "ner_conll":
        return ner_glance_rows(d)
    if name == "qa_study":
        return qa_glance_rows(d)
    if name == "llm_throughput":
        return llm_glance_rows(d)
    if name in ("forgetting_study", "forgetting_study_interp", "forgetting_study_plain_arms"):
        return forgetting_glance_rows(d)
    if name == "anchor_strength_study":
        return strength_glance_rows(d)
    if name == "lora_vs_full":
        return lora_glance_rows(d)
    if name == "hpo_efficiency":
        v = d["verdict"]
        return [
            [
                "ASHA vs grid",
                "≤ 0.5 pts below, ≤ 40 % of trial-epochs",
                f"{v['accuracy_gap_points']:+.2f} pts, {100 * v['compute_fraction']:.1f} %",
                verdict(v["pass"]),
            ]
        ]
    if name == "gpu_throughput":
        return [
            [
                f"{r['model']} {r['precision']} {r['mode']}",
                "–",
                f"{r['samples_per_s']:.0f} samples/s"
                + ("" if r.get("overhead_pct") is None else f" ({r['overhead_pct']:+.1f} %)"),
                "–",
            ]
            for r in d["results"]
            if r["mode"] != "decoupled"
        ]
    if name == "serve_load":
        top = max(r["concurrency"] for r in d["results"])
        at_top = {r["server"]: r for r in d["results"] if r["concurrency"] == top}
        cells = ", ".join(
            f"{k} {r['requests_per_s']:.1f} req/s (p99 {fmt(r['p99_ms'])} ms)"
            for k, r in at_top.items()
        )
        fastest = max(at_top, key=lambda k: at_top[k]["requests_per_s"])
        return [
            [f"requests/s at {top} clients", "batching beats naive", cells, f"{fastest} fastest"]
        ]
    if name == "serve_generation":
        cells = {(c["server"], c["clients"]): c for c in d["cells"]}
        top = max(c["clients"] for c in d["cells"])
        t, n = cells.get(("tether", top)), cells.get(("naive", top))
        rows = []
        if t and n and n["output_tokens_per_s"]:
            ratio = t["output_tokens_per_s"] / n["output_tokens_per_s"]
            faster = ratio >= 3 and (t["latency_p99_s"] or 0) < (n["latency_p99_s"] or 0)
            rows.append(
                [
                    f"tokens/s at C = {top}, tether / naive",
                    "≥ 3×, lower p99",
                    f"{ratio:.2f}× (p99 {fmt(t['latency_p99_s'])} vs {fmt(n['latency_p99_s'])} s)",
                    verdict(faster),
                ]
            )
        one, bare = cells.get(("tether", 1)), d.get("bare_first_token_s")
        if one and bare and one.get("ttft_p50_s"):
            over = one["ttft_p50_s"] / bare - 1
            rows.append(
                [
                    "TTFT p50 at C = 1 vs bare generate",
                    "within 20 %",
                    f"{one['ttft_p50_s']:.3f} vs {bare:.3f} s ({over:+.0%})",
                    verdict(over <= 0.20),
                ]
            )
        return rows
    return []


def qa_glance_rows(d: dict[str, Any]) -> list[list[str]]:
    """Plain's F1 at each n (and where it started), then each anchored arm's Δ to plain."""
    rows = []
    for name, label in QA_DATASETS.items():
        out = d.get(name)
        if isinstance(out, str) and name == "squad":
            rows.append([f"QA on {label}", "–", out, "–"])
        if not isinstance(out, dict):
            continue
        for r in out.get("summary", []):
            if r["arm"] == "plain":
                measured = (
                    f"F1 {pct(r['mean'], 1)} ± {pct(r['std'], 1)}, EM {pct(r['em_mean'], 1)} "
                    f"(start F1 {pct(r['start_f1_mean'], 1)}), {r['samples_per_s_mean']:.1f} "
                    "samples/s"
                )
                rows.append([f"QA {label}, plain, n={r['n']}", "reference", measured, "–"])
            else:
                rows.append(
                    [
                        f"QA {label}, {r['arm']} vs plain, n={r['n']}",
                        "report what is found",
                        f"{100 * r['delta_vs_plain_mean']:+.1f} pts F1, "
                        f"{100 * r['em_delta_vs_plain_mean']:+.1f} EM "
                        f"({r['seeds_better_than_plain']}/{len(r['seeds'])} seeds better)",
                        r["verdict"],
                    ]
                )
    return rows


def ner_glance_rows(d: dict[str, Any]) -> list[list[str]]:
    rows = []
    f = d.get("full")
    if f:
        rows.append(
            [
                f"dev entity F1, {f['num_train']} training sentences, {f['workers']} workers, "
                f"{f['epochs']} epoch(s)",
                f"≥ {pct(f['target_dev_entity_f1'], 0)}",
                f"{pct(f['dev']['entity_f1'])} (test {pct(f['test']['entity_f1'])})",
                verdict(f["pass"]),
            ]
        )
    for r in (d.get("lowdata") or {}).get("summary", []):
        if r["arm"] != "plain":
            rows.append(
                [
                    f"NER {r['arm']} vs plain, n={r['n']}",
                    "report what is found",
                    f"{100 * r['delta_vs_plain_mean']:+.1f} pts test F1 "
                    f"({r['seeds_better_than_plain']}/{len(r['seeds'])} seeds better)",
                    r["verdict"],
                ]
            )
    return rows


def llm_glance_rows(d: dict[str, Any]) -> list[list[str]]:
    summary = d.get("summary")
    if not summary:
        total = d["settings"]["rounds"] * len(LLM_ARMS)
        return [["tokens/s vs Trainer", "–", f"{len(d['runs'])} of {total} runs, no summary", "–"]]
    ratio, overhead = summary["lambda0_vs_trainer"], summary["coupled_overhead"]
    med = summary["median_tokens_per_s"]
    return [
        [
            "tokens/s tether λ=0 / Trainer",
            f"≥ {LLM_MIN_RATIO}×",
            f"{ratio:.2f}× ({med['tether-lambda0']:.1f} vs {med['trainer']:.1f} tokens/s)",
            verdict(ratio >= LLM_MIN_RATIO),
        ],
        llm_overhead_row(d, overhead),
    ]


def llm_overhead_row(d: dict[str, Any], end_to_end: float) -> list[str]:
    """The anchor's share of a step: the op timed alone where measured (end-to-end rounds
    drift by more than the op costs), else the end-to-end difference."""
    ops = d.get("anchor_ops") or {}
    target = f"≤ {100 * LLM_MAX_OVERHEAD:.0f} %"
    if "coupled" in ops:
        share = ops["coupled"]["share_of_step"]
        shown = (
            f"{100 * share:.1f} % ({1000 * ops['coupled']['op_s']:.0f} ms of a "
            f"{ops['step_s_lambda0']:.2f} s step, op timed alone; end to end "
            f"{100 * end_to_end:+.1f} %, within the rounds' spread)"
        )
        return [
            "coupled anchor overhead (op / λ=0 step)",
            target,
            shown,
            verdict(share <= LLM_MAX_OVERHEAD),
        ]
    return [
        "coupled anchor overhead over λ=0",
        target,
        f"{100 * end_to_end:+.1f} %",
        verdict(end_to_end <= LLM_MAX_OVERHEAD),
    ]


def forgetting_glance_rows(d: dict[str, Any]) -> list[list[str]]:
    arms, rule = forgetting_arms(d), forgetting_rule(d)
    if "plain" not in arms:
        return [["task vs forgetting", "–", f"{len(d.get('runs', []))} runs, no plain arm", "–"]]
    base = d["theta_star"]["eval/exact_match"]
    plain = arms["plain"]
    rows = [
        [
            "plain (λ=0): task gain over θ*, forgetting",
            "reference",
            f"{100 * (plain['exact_match'][0] - base):+.1f} pts exact match, forgetting "
            f"{plain['forgetting'][0]:+.4f}",
            "–",
        ]
    ]
    rows += [
        [
            f"{arm} vs plain",
            "≥ 95 % of gain, ≤ 50 % of forgetting",
            f"{100 * r['gain']:+.1f} pts{of_plain(r['gain_share'])}, forgetting "
            f"{r['forgetting']:+.4f}{of_plain(r['forgetting_share'])}",
            "meets" if r["keeps"] and r["halves"] else "misses",
        ]
        for arm, r in rule.items()
    ]
    passing = [a for a, r in rule.items() if r["keeps"] and r["halves"]]
    rows.append(
        [
            "some λ meets the retention rule",
            "≥ 1 anchored arm",
            f"met by {', '.join(passing)}" if passing else "met by no arm",
            verdict(bool(passing)) + ("" if "verdict" in d else " so far"),
        ]
    )
    return rows


def strength_glance_rows(d: dict[str, Any]) -> list[list[str]]:
    """The pass rule's outcome, and each κ against plain."""
    by_arm = {r["arm"]: r for r in d.get("summary", [])}
    plain = by_arm.get("plain")
    rule = d.get("pass_rule") or {}
    if plain is None:
        return [["retention vs task", "–", "no plain arm yet", "–"]]
    rows = []
    for arm, r in by_arm.items():
        if not arm.startswith(("kappa-", "interp-")):
            continue
        share = (
            r["task_gain_mean"] / plain["task_gain_mean"] if plain["task_gain_mean"] > 0 else None
        )
        rows.append(
            [
                f"{arm}: dev accuracy, retention@{d['settings']['knn']} (plain: "
                f"{100 * plain['dev_accuracy_mean']:.1f} %, {plain['retention_at_k_mean']:.2f})",
                "report what is found",
                f"{100 * r['dev_accuracy_mean']:.1f} %{'' if share is None else f' ({100 * share:.0f} % of the gain)'}, "
                f"{r['retention_at_k_mean']:.2f}",
                "–",
            ]
        )
    outcome = rule.get("outcome", "no verdict yet")
    rows.append(
        [
            "some κ keeps ≥ 95 % of the gain with ≤ half the forgetting, beating early stopping "
            "and interpolation",
            "≥ 1 κ",
            outcome,
            "pays"
            if rule.get("passing")
            else ("retention dial" if rule.get("dial") else "does not pay"),
        ]
    )
    return rows


def lora_glance_rows(d: dict[str, Any]) -> list[list[str]]:
    """Each LoRA arm against full fine-tuning at the same λ: cost, task, forgetting."""
    runs = {r["arm"]: r for r in d.get("runs", [])}
    timing = {r["arm"]: r for r in (d.get("timing") or {}).get("runs", [])}
    rows = []
    for arm, r in runs.items():
        if not arm.startswith("lora"):
            continue
        full = runs.get("full-plain" if arm.endswith("plain") else "full-coupled-0.1")
        t, tf = timing.get(arm), timing.get(full["arm"]) if full else None
        cost = f"{t['s_per_step']:.2f} vs {tf['s_per_step']:.2f} s/step, " if t and tf else ""
        rows.append(
            [
                f"{arm} vs {full['arm'] if full else 'full'}",
                "report what is found",
                f"{cost}exact match {pct(r['exact_match'], 1)} vs "
                f"{pct(full['exact_match'], 1) if full else '–'} %, forgetting "
                f"{r['forgetting']:+.3f} vs {full['forgetting']:+.3f}"
                if full
                else "",
                "–",
            ]
        )
    return rows


def is_partial(name: str, d: dict[str, Any]) -> bool:
    """A run stopped (or still running) before its summary: said so in the glance table."""
    if d.get("complete") is False:
        return True
    missing = {"llm_throughput": "summary", "forgetting_study": "verdict"}.get(name)
    return missing is not None and missing not in d


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def glance(results: Path) -> str:
    """One table of every benchmark's headline numbers, and whether each is a real run."""
    rows = []
    for b in BENCHMARKS:
        full, quick = results / f"{b.name}.json", results / f"{b.name}_quick.json"
        kind, path = ("full", full) if full.is_file() else ("quick only", quick)
        if not path.is_file():
            why = "(needs a CUDA device; none was available)" if b.name == "gpu_throughput" else ""
            rows.append([b.title, "–", "–", f"not measured {why}".strip(), "–", "–"])
            continue
        d = load(path)  # cached: the section reads the same file
        try:
            found = glance_rows(b.name, d) if d is not None else [["–", "–", "unreadable", "–"]]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            found = [["(see its section)", "–", f"unexpected layout: {type(e).__name__}", "–"]]
        if d is not None and is_partial(b.name, d):
            kind = "full, partial" if kind == "full" else "quick only, partial"
        rows += [[b.title, *r, kind] for r in found]
    headers = ["benchmark", "what", "target", "measured", "verdict", "run"]
    return "## At a glance\n\n" + md_table(headers, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder with the JSON files")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write")
    args = p.parse_args(argv)
    out_dir = args.out.resolve().parent
    parts = [header(out_dir), glance(args.results)]
    if FINDINGS.is_file():  # the reading of the numbers: written by people, kept verbatim
        parts.append(FINDINGS.read_text().strip() + "\n")
    parts += [section(b, args.results, out_dir) for b in BENCHMARKS]
    known = {b.name for b in BENCHMARKS}
    others = [
        f for f in sorted(args.results.glob("*.json")) if f.stem.removesuffix("_quick") not in known
    ]
    for f in others:  # variants (serve_load_quick_1cpu) and new benchmarks still show up
        data = load(f)
        if data is not None:
            parts.append(extra_section(f, data, out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
