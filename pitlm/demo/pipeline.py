"""`pitlm demo`: the whole pipeline on the embedded synthetic world, offline, on a CPU, in minutes.

Read it top to bottom: it is the list of pitlm commands a user would type. Each step runs the real CLI in a
subprocess (exactly what a batch job would run) and is skipped when its output is already on the volume, so a
rerun only does what is missing.

    1. world build      fictional companies, JPX-format prices with planted moves, a dated FineWeb-format corpus
    2. market world     the world's prices through the JPX loader -> market/demo/panel.parquet
    3. corpus tokenizer a byte-level BPE trained on documents <= cutoff (a later tokenizer is itself a leak)
    4. corpus build x3  demo-all (every document: the leaky base's corpus), demo-pit (documents <= cutoff),
                        demo-family (one scan, a crawl period per year end 2017..2021: nested PIT slices)
    5. train x5         demo-scratch-leaky, demo-scratch-pit, demo-lora-pit, demo-full-pit (the seed's two arms
                        in miniature: continued pretraining of the leaky base on PIT text), and demo-family: one
                        chronological run that exports a PIT member at every year end (model:demo-family@<cutoff>)
    6. eval             every model, the family's members + the knowledge-free control, legacy / purged /
                        walk-forward, paired bootstrap; the family's knowledge matrix, slopes and staircase check
    7. probe            the leaky base and the PIT model: Min-K% / Min-K%++ of the planted move's statement, the
                        direction accuracy, the LAP interaction and the named-vs-anonymised entity gap, each net of
                        its knowledge-free control, on the eval's rows and draws
    8. report           HTML + PNGs + Markdown
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pitlm.errors import PitlmError
from pitlm.volume import Volume, atomic_write_json

log = logging.getLogger("pitlm.demo")

WORLD = "demo"
TOKENIZER = "demo-bpe"
CUTOFF = "2017-06-30"  # the seed's cutoff; the world's first news (about 2017) is published after it
CORPORA = {"demo-all": "2099-12-31", "demo-pit": CUTOFF}
FAMILY_CORPUS = ("demo-family", "yearly:2017..2021")  # news of year Y is crawled in Jan/Feb of Y+1
FAMILY = ("family", "demo-family")  # eval family name -> chronological training recipe (= run name)
MODELS = {  # eval name -> training recipe (= model run name); the first arm after the base is the eval's primary
    "base": "demo-scratch-leaky",  # (its premium_reduction is the seed's key: base - LoRA arm)
    "lora_pit": "demo-lora-pit",
    "full_pit": "demo-full-pit",
    "pit": "demo-scratch-pit",
}
PROBED = ("base", "pit")  # the probe step's models: the leaky base and the PIT model (eval names)
HEADLINE = ("leakage_premium", "base_leakage_premium", "premium_reduction", "leakage_flagged", "base_leakage_flagged",
            "family_slope", "family_slope_ci_lo", "family_slope_ci_hi", "family_slope_calibrated",
            "family_slope_calibrated_ci_lo", "family_slope_calibrated_ci_hi", "family_staircase_ok",
            "family_staircase_missed", "family_staircase_false_flags")


@dataclass
class Step:
    name: str
    argv: list[str]
    done: Path | None  # output whose presence means the step is finished (None: always run)
    seconds: float = 0.0
    skipped: bool = False
    stdout: list[str] = field(default_factory=list)


def steps(vol: Volume, seed: int, eval_args: list[str]) -> list[Step]:
    out = [
        Step("world", ["world", "build", WORLD, "--seed", str(seed)], vol.path("world", WORLD, "manifest.json")),
        Step("market", ["market", "world", WORLD, "--world", WORLD], vol.path("market", WORLD, "manifest.json")),
        Step("tokenizer", ["corpus", "tokenizer", TOKENIZER, "--source", f"world:{WORLD}", "--cutoff", CUTOFF,
                           "--vocab-size", "1500"], vol.path("corpus", "_tokenizers", TOKENIZER, "manifest.json")),
    ]
    for name, cutoff in CORPORA.items():
        out.append(Step(f"corpus:{name}", ["corpus", "build", name, "--source", f"world:{WORLD}", "--cutoff", cutoff,
                                           "--tokenizer", f"pit:{TOKENIZER}"], vol.path("corpus", name, "manifest.json")))
    name, cutoffs = FAMILY_CORPUS
    out.append(Step(f"corpus:{name}", ["corpus", "build", name, "--source", f"world:{WORLD}", "--cutoffs", cutoffs,
                                       "--tokenizer", f"pit:{TOKENIZER}"], vol.path("corpus", name, "manifest.json")))
    for recipe in [*MODELS.values(), FAMILY[1]]:
        out.append(Step(f"train:{recipe}", ["train", "--recipe", recipe], vol.path("models", recipe, "manifest.json")))
    models = [a for name, recipe in MODELS.items() for a in ("--model", f"{name}=model:{recipe}")]
    out.append(Step("eval", ["eval", "--recipe", "demo-eval", "--market", WORLD, *models, "--base", "base",
                             "--family", f"{FAMILY[0]}=model:{FAMILY[1]}", *eval_args], None))
    probed = [a for name in PROBED for a in ("--model", f"{name}=model:{MODELS[name]}")]
    out.append(Step("probe", ["probe", "--recipe", "demo-probe", "--market", WORLD, *probed], None))
    return out


def run_step(step: Step, env: dict[str, str]) -> None:
    """Run one pitlm command; its stderr (progress, logs) streams through, its stdout is echoed and kept."""
    cmd = [sys.executable, "-m", "pitlm.cli", *step.argv]
    log.info("demo step %s: pitlm %s", step.name, " ".join(step.argv))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        step.stdout.append(line.rstrip("\n"))
        if os.environ.get("PITLM_DEMO_QUIET", "") in ("", "0"):
            print(f"  [{step.name}] {line}", end="", flush=True)
    code = proc.wait()
    step.seconds = time.time() - t0
    if code != 0:
        raise PitlmError(f"demo step '{step.name}' failed (exit {code}): pitlm {' '.join(step.argv)}")


def summary_of(step: Step) -> dict[str, str]:
    out = {}
    for line in step.stdout:
        key, sep, value = line.partition(": ")
        if sep and " " not in key:
            out[key] = value
    return out


def latest_run(vol: Volume, stage: str, match: dict[str, str] | None = None) -> Path | None:
    """The newest successful run of `stage` whose config.yaml has the given key/values."""
    root = vol.path("runs")
    for d in sorted(root.glob(f"{stage}-*"), reverse=True):
        summary = d / "summary.json"
        if not summary.is_file() or json.loads(summary.read_text()).get("status") != "ok":
            continue
        cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
        if all(str((cfg or {}).get(k)) == v for k, v in (match or {}).items()):
            return d
    return None


def run_demo(vol: Volume, seed: int = 0, fresh: bool = False, eval_args: list[str] | None = None) -> dict:
    """Run (or resume) the demo; returns the summary printed at the end."""
    eval_args = list(eval_args or [])
    env = {**os.environ, "PITLM_HOME": str(vol.root)}
    state_path = vol.path("runs", f".demo-{WORLD}.json")
    state = json.loads(state_path.read_text()) if state_path.is_file() and not fresh else {}
    t0 = time.time()
    plan = steps(vol, seed, eval_args)
    timings: dict[str, float] = {}
    for step in plan:
        if step.done is None:  # eval, probe: done when the same command wrote its results.json
            prior = state.get(step.name)
            if prior and prior["argv"] == step.argv and vol.path("runs", prior["run"], "results.json").is_file():
                step.skipped = True
                step.stdout = prior["stdout"]
                log.info("demo step %s: done already (%s)", step.name, prior["run"])
                continue
        elif step.done is not None and step.done.exists() and not fresh:
            step.skipped = True
            log.info("demo step %s: done already (%s)", step.name, step.done)
            continue
        if fresh and step.done is not None and step.done.exists():
            step.argv = [*step.argv, "--overwrite"]
        run_step(step, env)
        timings[step.name] = round(step.seconds, 1)
        if step.done is None:
            results = summary_of(step)["results_json"]
            state[step.name] = {"argv": step.argv, "run": Path(results).parent.name, "stdout": step.stdout}
            atomic_write_json(state_path, state)
    eval_run, probe_run = state["eval"]["run"], state["probe"]["run"]
    train_runs = [latest_run(vol, "train", {"run_name": recipe}) for recipe in [*MODELS.values(), FAMILY[1]]]
    report_argv = ["report", eval_run, probe_run, *[str(r) for r in train_runs if r is not None],
                   *[a for c in [*CORPORA, FAMILY_CORPUS[0]] for a in ("--corpus", c)],
                   "--title", "pitlm demo: leakage on a synthetic world"]
    report = Step("report", report_argv, None)
    run_step(report, env)
    timings["report"] = round(report.seconds, 1)
    ev = summary_of(next(s for s in plan if s.name == "eval"))
    rep = summary_of(report)
    summary: dict[str, object] = {k: ev[k] for k in HEADLINE if k in ev}
    for name in ["control", *MODELS]:
        verdict = rep.get(f"verdict_{name}")
        if verdict:
            summary[f"verdict_{name}"] = verdict
        summary[f"legacy_flags_{name}"] = rep.get(f"legacy_flags_{name}", "n/a")
    for name in PROBED:
        summary[f"probes_flagged_{name}"] = rep.get(f"probes_flagged_{name}", "n/a")
    summary.update({"steps_run": sum(not s.skipped for s in plan) + 1, "steps_skipped": sum(s.skipped for s in plan),
                    "demo_seconds": round(time.time() - t0, 1), "eval_run": eval_run,
                    "report_html": rep.get("report_html"), "report_md": rep.get("report_md")})
    summary["step_seconds"] = timings
    return summary
