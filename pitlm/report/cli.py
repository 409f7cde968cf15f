"""`pitlm report RUN...`"""

from __future__ import annotations

from typing import Annotated

import typer

from pitlm.cliutil import volume


def report(ctx: typer.Context,
           runs: Annotated[list[str], typer.Argument(help="Run ids (or prefixes/paths): eval, calibrate and train runs.")],
           corpus: Annotated[list[str] | None, typer.Option("--corpus", help="Corpus names whose manifests to summarise (train runs add theirs).")] = None,
           out: Annotated[str | None, typer.Option("--out", help="Output directory (default: a new runs/report-... dir).")] = None,
           title: Annotated[str, typer.Option(help="Report title.")] = "pitlm leakage report") -> None:
    """Write report.html (self-contained), PNGs and report.md; print verdict lines and the report's path."""
    from pathlib import Path

    from pitlm.report.collect import collect
    from pitlm.report.render import probe_flags, render, verdicts
    from pitlm.runs import start_run

    vol = volume(ctx)
    data = collect(vol, runs, corpus)
    with start_run(vol, "report", {"runs": runs, "corpus": corpus or [], "title": title}) as run:
        paths = render(data, Path(out) if out else run.dir, title)
        summary: dict[str, object] = {}
        for _, results in data.evals:
            for v in verdicts(results):
                if v["flagged"] is not None:
                    summary[f"verdict_{v['model']}"] = "leakage_detected" if v["flagged"] else "not_detected"
                summary[f"legacy_flags_{v['model']}"] = v["legacy_flagged"]
        for _, results in data.probes:  # which probes flag each model (net of its control, CI above 0)
            for m, stats in probe_flags(results).items():
                summary[f"probes_flagged_{m}"] = ",".join(stats) or "none"
        summary.update({"report_html": str(paths["html"]), "report_md": str(paths["markdown"]),
                        "figures": len(paths) - 2})
        run.finish(summary)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("report")(report)
