"""Point-in-time corpora: read FineWeb-schema documents, keep those crawled on or before a cutoff, tokenize into
shards on the volume.

    dates.py      CC dump name <-> crawl period, document dates (UTC), the cutoff rule, dump preselection
    sources.py    fineweb | hf:REPO (hub streaming) | local parquet/JSONL | world:NAME -> units of records
    scan.py       the per-document filter with drop reasons, seeded sampling/validation hashes, the unit scan
    workers.py    the worker pool; tokenize and pack jobs (atomic outputs, completion markers)
    build.py      build_corpus(cfg, vol): scan -> select -> tokenize (rounds) -> cut -> pack -> manifest
    periods.py    crawl periods of a nested build (--cutoffs): hub shares per period, the manifest's slices
    shards.py     the shard format (writer, memmap reader, ShardIndex, slices, NAME@CUTOFF) shared with training
    tokenizer.py  load_tokenizer(spec, vol) (name, path or pit:NAME), vocabulary hash, PIT BPE training
    audit.py      audit_corpus (hashes, counts, dates, --deep source re-read), audit_tokenizer
    bench.py      tokens/s at 1 and N workers on a generated corpus
    fake.py       generated FineWeb-schema documents for tests and the benchmark
    config.py     CorpusConfig, TokenizerConfig
    cli.py        pitlm corpus build|tokenizer, pitlm audit corpus|tokenizer, pitlm bench corpus
"""
