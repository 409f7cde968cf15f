"""`pitlm corpus build|tokenizer`, `pitlm audit corpus|tokenizer`, `pitlm bench corpus`."""

from __future__ import annotations

from typing import Annotated

import typer

from pitlm.cliutil import RecipeOpt, SetOpt, guarded_volume, volume

corpus_app = typer.Typer(help="Point-in-time corpora: FineWeb-schema documents crawled on or before a cutoff, "
                              "tokenized into shards on the volume.", no_args_is_help=True)
audit_app = typer.Typer(help="Audit what was built: corpora (hashes, dates, ids) and tokenizers (later vocabulary).",
                        no_args_is_help=True)

SourceOpt = Annotated[str | None, typer.Option("--source", help="fineweb | fineweb-edu | hf:REPO | PATH/DIR/GLOB of "
                                                                "FineWeb-schema parquet/JSONL | world:NAME")]
CutoffOpt = Annotated[str | None, typer.Option("--cutoff", help="Keep documents crawled on or before this day "
                                                                "(YYYY-MM-DD, end of day UTC).")]
LangOpt = Annotated[str | None, typer.Option("--lang", help="Keep documents whose `language` is this ('any' to "
                                                            "disable); default en.")]
MinCharsOpt = Annotated[int | None, typer.Option("--min-chars", help="Drop documents shorter than this (default 1).")]
DumpsOpt = Annotated[str | None, typer.Option("--dumps", help="Only these dumps, comma-separated (CC-MAIN-YYYY-WW).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampling / validation-split seed (default 0).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing one (the old stays visible "
                                                                "until the new one is complete).")]


def _require(recipe: str | None, overrides: list[str] | None, **flags) -> None:
    """A clear error for a missing required flag (unless a recipe or --set may provide it)."""
    from pitlm.errors import PitlmError

    if recipe:
        return
    for key, value in flags.items():
        if value is None and not any(o.split("=", 1)[0].strip() == key for o in overrides or []):
            raise PitlmError(f"--{key.replace('_', '-')} is required (see --help)")


def _source_fields(source, cutoff, lang, min_chars, dumps, seed) -> dict:
    return {"source": source, "cutoff": cutoff, "lang": lang, "min_chars": min_chars, "dumps": dumps, "seed": seed}


def build_cmd(ctx: typer.Context,
              name: Annotated[str, typer.Argument(help="Corpus name: written to PITLM_HOME/corpus/NAME/.")],
              source: SourceOpt = None, cutoff: CutoffOpt = None,
              cutoffs: Annotated[str | None, typer.Option("--cutoffs", help="A nested corpus: D1,D2,... (increasing) "
                                                          "or yearly:Y0..Y1 (each Dec 31). Period k holds documents "
                                                          "crawled in (D(k-1), Dk]; read slice Dk as NAME@Dk.")] = None,
              after: Annotated[str | None, typer.Option("--after", help="Keep only documents crawled after this day "
                                                        "(YYYY-MM-DD, end of day UTC): one period (after, cutoff].")] = None,
              tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="HF tokenizer name or path, or "
                                                                               "pit:NAME (see `pitlm corpus tokenizer`).")] = None,
              target_tokens: Annotated[str | None, typer.Option("--target-tokens", help="Train tokens to sample: "
                                                                "100M, 1B, 2.5k, ... or 'all' (default: all; "
                                                                "required for hub sources).")] = None,
              val_fraction: Annotated[float | None, typer.Option("--val-fraction", help="Share of documents held out "
                                                                "for validation (default 0.005).")] = None,
              workers: Annotated[int | None, typer.Option("--workers", help="Worker processes (default: cores, <= 8); "
                                                          "local/ray: tasks running at once.")] = None,
              executor: Annotated[str | None, typer.Option("--executor", help="mp (multiprocessing, default) | local "
                                                           "| slurm | ray: datatrove's executors, the same bytes.")] = None,
              tasks: Annotated[int | None, typer.Option("--tasks", help="datatrove tasks per stage (default: "
                                                        "--workers); slurm: the array size.")] = None,
              ray_address: Annotated[str | None, typer.Option("--ray-address", help="ray: a cluster (default: "
                                                              "$RAY_ADDRESS, else a local ray.init()).")] = None,
              slurm_partition: Annotated[str | None, typer.Option("--slurm-partition", help="slurm: partition of "
                                                                  "the arrays (default: this job's, if any).")] = None,
              slurm_time: Annotated[str | None, typer.Option("--slurm-time", help="slurm: time limit per array "
                                                             "task (default 24:00:00).")] = None,
              slurm_arg: Annotated[list[str] | None, typer.Option("--slurm-arg", help="slurm: extra #SBATCH option "
                                                                  "of the arrays, e.g. --slurm-arg=--account=abc "
                                                                  "(repeatable).")] = None,
              lang: LangOpt = None, min_chars: MinCharsOpt = None,
              min_language_score: Annotated[float | None, typer.Option("--min-language-score")] = None,
              dumps: DumpsOpt = None, seed: SeedOpt = None,
              shard_tokens: Annotated[int | None, typer.Option("--shard-tokens", help="Tokens per shard (default 2^25).")] = None,
              overwrite: OverwriteOpt = False, recipe: RecipeOpt = None, set_: SetOpt = None) -> None:
    """Build a point-in-time corpus: filter by crawl date, sample, tokenize, write shards + index + manifest."""
    from pitlm.config import load_config
    from pitlm.corpus.build import build_corpus
    from pitlm.corpus.config import CorpusConfig
    from pitlm.errors import PitlmError
    from pitlm.runs import start_run

    if cutoff is not None and cutoffs is not None:
        raise PitlmError("give --cutoff D (one period) or --cutoffs D1,D2,... (nested periods), not both")
    _require(recipe, set_, source=source, cutoff=cutoff if cutoffs is None else cutoffs, tokenizer=tokenizer)
    cfg = load_config(CorpusConfig, recipe, set_, name=name, tokenizer=tokenizer, target_tokens=target_tokens,
                      val_fraction=val_fraction, workers=workers, min_language_score=min_language_score,
                      shard_tokens=shard_tokens, overwrite=overwrite or None, cutoffs=cutoffs, after=after,
                      executor=executor, tasks=tasks, ray_address=ray_address, slurm_partition=slurm_partition,
                      slurm_time=slurm_time, slurm_args=slurm_arg or None,
                      **_source_fields(source, cutoff, lang, min_chars, dumps, seed))
    vol = guarded_volume(ctx, "corpus build")
    with start_run(vol, "corpus", cfg) as run:
        m = build_corpus(cfg, vol)
        run.save_json("manifest.json", m)
        summary = {"corpus": cfg.name, "path": str(vol.path("corpus", cfg.name)), "cutoff": m["cutoff"],
                   "dumps_used": len(m["dumps_used"]), "docs_read": m["docs"]["read"], "docs_kept": m["docs"]["kept"]}
        summary.update({f"docs_{k}": v for k, v in m["docs"].items() if k.startswith("dropped_")})
        summary.update(tokens_train=m["tokens"]["train"], tokens_val=m["tokens"]["val"], shards=len(m["shards"]),
                       dtype=m["dtype"], min_doc_date=m["min_doc_date"], max_doc_date=m["max_doc_date"],
                       vocab_sha256=m["tokenizer"]["vocab_sha256"], executor=cfg.executor,
                       tasks=cfg.tasks or cfg.workers, wall_seconds=m["wall_seconds"])
        if cfg.nested:
            summary.update(cutoffs=",".join(m["cutoffs"]), periods=len(m["periods"]))
        for sl in m["slices"]:  # per cutoff, e.g. tokens_train@2018-12-31: N
            c = sl["cutoff"]
            summary.update({f"tokens_train@{c}": sl["tokens"]["train"], f"tokens_val@{c}": sl["tokens"]["val"],
                            f"docs_kept@{c}": sum(sl["docs_by_split"].values()),
                            f"stream_sha256_train@{c}": sl["stream_sha256"]["train"]})
        run.finish(summary)


def tokenizer_cmd(ctx: typer.Context,
                  name: Annotated[str, typer.Argument(help="Tokenizer name: PITLM_HOME/corpus/_tokenizers/NAME/, "
                                                           "used as --tokenizer pit:NAME.")],
                  source: SourceOpt = None, cutoff: CutoffOpt = None,
                  vocab_size: Annotated[int | None, typer.Option("--vocab-size", help="Default 1500.")] = None,
                  max_docs: Annotated[int | None, typer.Option("--max-docs", help="Train on at most this many "
                                                               "documents (read round-robin across dumps).")] = None,
                  lang: LangOpt = None, min_chars: MinCharsOpt = None, dumps: DumpsOpt = None, seed: SeedOpt = None,
                  overwrite: OverwriteOpt = False, recipe: RecipeOpt = None, set_: SetOpt = None) -> None:
    """Train a byte-level BPE on documents crawled on or before the cutoff (a later tokenizer is itself a leak)."""
    from pitlm.config import load_config
    from pitlm.corpus.config import TokenizerConfig
    from pitlm.corpus.tokenizer import train_pit_tokenizer
    from pitlm.log import emit_summary

    _require(recipe, set_, source=source, cutoff=cutoff)
    cfg = load_config(TokenizerConfig, recipe, set_, name=name, vocab_size=vocab_size, max_docs=max_docs,
                      overwrite=overwrite or None, **_source_fields(source, cutoff, lang, min_chars, dumps, seed))
    vol = guarded_volume(ctx, "corpus tokenizer")
    m = train_pit_tokenizer(cfg, vol)
    emit_summary({"tokenizer": f"pit:{cfg.name}", "path": str(vol.path("corpus", "_tokenizers", cfg.name)),
                  "vocab_size": m["vocab_size"], "docs": m["docs"], "chars": m["chars"],
                  "max_doc_date": m["max_doc_date"], "vocab_sha256": m["vocab_sha256"],
                  "wall_seconds": m["wall_seconds"]})


def audit_corpus_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Corpus name.")],
                     deep: Annotated[bool, typer.Option("--deep", help="Re-read the source and verify every kept id.")] = False) -> None:
    """Re-hash shards, check counts and that no kept document is dated after the cutoff; exit 1 on failure."""
    from pitlm.corpus.audit import audit_corpus

    checks = audit_corpus(volume(ctx), name, deep=deep)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    print(f"audit_checks: {len(checks)}\naudit_failed: {len(failed)}\naudit: {'fail' if failed else 'pass'}")
    if failed:
        raise typer.Exit(1)


def audit_tokenizer_cmd(ctx: typer.Context,
                        tokenizer: Annotated[str, typer.Argument(help="HF tokenizer name or path, or pit:NAME.")],
                        pit_source: Annotated[str, typer.Option("--pit-source", help="Source of the PIT corpus.")],
                        cutoff: Annotated[str, typer.Option("--cutoff", help="PIT cutoff (YYYY-MM-DD).")],
                        later_source: Annotated[str, typer.Option("--later-source", help="Source of later text "
                                                                  "(its documents crawled after the cutoff).")],
                        top: Annotated[int, typer.Option(help="List at most this many entries.")] = 30,
                        min_count: Annotated[int, typer.Option("--min-count", help="Minimum later count.")] = 3,
                        max_docs: Annotated[int | None, typer.Option("--max-docs", help="Read at most this many "
                                                                     "documents of each corpus.")] = None,
                        lang: LangOpt = "en") -> None:
    """List vocabulary entries that never occur in the PIT corpus but are frequent in later text."""
    from pitlm.corpus.audit import audit_tokenizer
    from pitlm.corpus.config import SourceFilterConfig
    from pitlm.log import emit_summary

    lang = SourceFilterConfig(source=pit_source, cutoff=cutoff, lang=lang).lang
    r = audit_tokenizer(volume(ctx), tokenizer, pit_source, cutoff, later_source, top, min_count, max_docs, lang)
    for e in r["entries"]:
        print(f"later_only: id={e['id']} later_count={e['later_count']} token={e['token']!r} text={e['text']!r}")
    emit_summary({k: v for k, v in r.items() if k != "entries"})


def bench_cmd(docs: Annotated[int, typer.Option(help="Generated documents (~1.3 k characters each).")] = 40_000,
              workers: Annotated[int | None, typer.Option("--workers", help="N (default: cores, at least 2).")] = None,
              vocab_size: Annotated[int, typer.Option("--vocab-size")] = 4096,
              executor: Annotated[str, typer.Option("--executor", help="Executors to time, comma-separated: mp, "
                                                    "local, ray (slurm is left out: it needs a cluster).")] = "mp",
              project_tokens: Annotated[str, typer.Option("--project-tokens", help="Projection (local or ray "
                                                          "measured): tokens of the large build, e.g. 100e9 or "
                                                          "100B.")] = "100e9",
              project_cores_per_node: Annotated[int, typer.Option("--project-cores-per-node",
                                                                  help="Projection: cores per node.")] = 64,
              project_hours: Annotated[float, typer.Option("--project-hours", help="Projection: wall time to fit "
                                                           "the build in, hours.")] = 24.0) -> None:
    """Corpus build throughput at 1 and N workers on a generated corpus, per executor (and that every build gives
    identical shards); with local or ray, a projection of the nodes a large build needs."""
    from pitlm.corpus.bench import Projection, bench_corpus, parse_executors
    from pitlm.log import emit_summary

    executors = parse_executors(executor)
    projection = Projection(project_tokens, project_cores_per_node, project_hours)
    emit_summary(bench_corpus(docs=docs, workers=workers, vocab_size=vocab_size, executors=executors,
                              projection=projection))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    corpus_app.command("build")(build_cmd)
    corpus_app.command("tokenizer")(tokenizer_cmd)
    audit_app.command("corpus")(audit_corpus_cmd)
    audit_app.command("tokenizer")(audit_tokenizer_cmd)
    app.add_typer(corpus_app, name="corpus")
    app.add_typer(audit_app, name="audit")
    bench_app.command("corpus")(bench_cmd)
