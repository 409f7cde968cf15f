"""Generated FineWeb-schema documents for tests and `pitlm bench corpus` (no network, deterministic per seed)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pitlm.corpus.dates import UTC, dump_for_date

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can out up who them "
         "some could what its into only other time new than two may first any like now my such make over our even "
         "most me state after also made many did must before back see through way where get much go well your know "
         "should down work year because come people just say each those take day good how long own too little use "
         "market stock price shares company bank trade growth report quarter profit loss sales rose fell percent "
         "investors analysts earnings revenue tokyo exchange index yen dollar economy rate policy central outlook "
         "energy oil gas steel auto electronics retail software network data cloud service customers product").split()


def fake_records(n: int, seed: int = 0, start: str = "2016-01-01", end: str = "2018-12-31",
                 words: tuple[int, int] = (40, 400)) -> list[dict]:
    """`n` documents with crawl dates uniform in [start, end] (UTC, 'Z' suffix) and FineWeb's columns."""
    rng = np.random.default_rng(seed)
    t0 = dt.datetime.fromisoformat(start).replace(tzinfo=UTC)
    span = (dt.datetime.fromisoformat(end).replace(tzinfo=UTC) - t0).total_seconds()
    vocab = np.array(WORDS)
    out = []
    for i in range(n):
        date = t0 + dt.timedelta(seconds=int(rng.integers(0, int(span))))
        dump = dump_for_date(date)
        length = int(rng.integers(words[0], words[1]))
        text = " ".join(vocab[rng.integers(0, len(vocab), length)]).capitalize() + "."
        uid = rng.bytes(16).hex()
        out.append({"text": text, "id": f"<urn:uuid:{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:]}>",
                    "dump": dump, "url": f"https://example{i % 97}.com/{seed}/{i}",
                    "date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "file_path": f"s3://commoncrawl/crawl-data/{dump}/segments/0/warc/{i}.warc.gz",
                    "language": "en", "language_score": 0.9, "token_count": length + 1})
    return out


def write_parquet(records: list[dict], path: str | Path, row_group_size: int = 1000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_fineweb_tree(records: list[dict], root: str | Path, rows_per_file: int = 2000) -> list[Path]:
    """FineWeb's layout: root/data/<dump>/000_00000.parquet, ..."""
    by_dump: dict[str, list[dict]] = {}
    for r in records:
        by_dump.setdefault(r["dump"], []).append(r)
    files = []
    for dump, recs in sorted(by_dump.items()):
        for k in range(0, len(recs), rows_per_file):
            files.append(write_parquet(recs[k:k + rows_per_file], Path(root) / "data" / dump / f"000_{k // rows_per_file:05d}.parquet"))
    return files
