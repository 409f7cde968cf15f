"""`pitlm audit corpus` and `pitlm audit tokenizer`.

A corpus audit re-derives what the manifest claims: shard and ids-file hashes, document and token counts, and that
no kept document is dated after the cutoff. Every cutoff's slice (one for a plain corpus, one per period of a nested
one) is checked as a reader of that slice sees it, through index.json: no document dated after its cutoff, every
period's documents inside its crawl interval, token counts, and the sha256 of the slice's token stream. `--deep`
re-reads the source and checks every kept id: present, dated on or before the cutoff by the source itself (the
same date the corpus records), passing the build's filters, with the same text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pitlm.corpus.config import CorpusConfig
from pitlm.corpus.dates import end_of_day, format_utc, parse_cutoff, parse_doc_date
from pitlm.corpus.scan import DocFilter, iter_eligible, text_hash
from pitlm.corpus.shards import INDEX, ShardIndex
from pitlm.corpus.sources import iter_records, resolve_source
from pitlm.corpus.tokenizer import load_tokenizer
from pitlm.errors import PitlmError
from pitlm.volume import Volume, sha256_file


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name}: {'pass' if self.ok else 'fail'} ({self.detail})"


def audit_corpus(vol: Volume, name: str, deep: bool = False) -> list[Check]:
    root = vol.path("corpus", name)
    if not (root / "manifest.json").is_file() or not (root / INDEX).is_file():
        raise PitlmError(f"no built corpus '{name}' at {root}; see `pitlm corpus build`")
    manifest = json.loads((root / "manifest.json").read_text())
    index = json.loads((root / INDEX).read_text())
    checks = [_check_complete(root), _check_hashes(root, manifest, index)]
    ids = _read_ids(root, manifest["shards"])
    checks += [_check_counts(manifest, ids), _check_dates(manifest, ids)]
    if manifest.get("slices") is not None:  # corpora built before slices were recorded have none to compare
        checks += _check_slices(root, manifest, index)
    if deep:
        checks.append(_check_source(vol, manifest, ids))
    return checks


def _check_complete(root: Path) -> Check:
    try:
        index = ShardIndex.load(root)
    except PitlmError as e:
        return Check("complete", False, str(e))
    return Check("complete", True, f"{sum(len(v) for v in index.splits.values())} shards present")


def _check_hashes(root: Path, manifest: dict, index: dict) -> Check:
    listed = [{k: e.get(k) for k in ("file", "sha256", "bytes", "tokens", "period")} for e in manifest["shards"]]
    indexed = [{k: e.get(k) for k in ("file", "sha256", "bytes", "tokens", "period")} for s in ("train", "val")
               for e in index["splits"].get(s, [])]
    if listed != indexed:
        return Check("shard_hashes", False, "index.json and manifest.json list different shards")
    bad = []
    for e in manifest["shards"]:
        for file, digest in ((e["file"], e["sha256"]), (e["ids"], e["ids_sha256"])):
            p = root / file
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(file)
        if (root / e["file"]).is_file() and (root / e["file"]).stat().st_size != e["bytes"]:
            bad.append(e["file"])
    if bad:
        return Check("shard_hashes", False, f"{len(bad)} file(s) differ from the manifest: {', '.join(sorted(set(bad))[:5])}")
    return Check("shard_hashes", True, f"{2 * len(manifest['shards'])} files re-hashed")


def _read_ids(root: Path, shards: list[dict]) -> pd.DataFrame:
    frames = []
    for e in shards:
        p = root / e["ids"]
        if p.is_file():
            try:
                frames.append(pd.read_parquet(p).assign(split=e["split"]))
            except Exception:  # noqa: BLE001 - a corrupt ids file is reported by the hash check
                continue
    cols = ["id", "date", "dump", "n_tokens", "text_hash", "start", "split"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _check_counts(manifest: dict, ids: pd.DataFrame) -> Check:
    problems = []
    if len(ids) != manifest["docs"]["kept"]:
        problems.append(f"{len(ids)} ids listed, manifest says {manifest['docs']['kept']} kept")
    if ids["id"].duplicated().any():
        problems.append(f"{int(ids['id'].duplicated().sum())} repeated ids")
    for split in ("train", "val"):
        got = int((ids.loc[ids["split"] == split, "n_tokens"] + 1).sum())
        if got != manifest["tokens"][split]:
            problems.append(f"{split}: ids account for {got} tokens, manifest says {manifest['tokens'][split]}")
    d = manifest["docs"]
    if d["read"] != d["kept"] + sum(v for k, v in d.items() if k.startswith("dropped_")):
        problems.append("read != kept + dropped")
    if problems:
        return Check("counts", False, "; ".join(problems))
    return Check("counts", True, f"{len(ids)} documents, {manifest['tokens']['train']} train + "
                                 f"{manifest['tokens']['val']} val tokens")


def _check_dates(manifest: dict, ids: pd.DataFrame) -> Check:
    cutoff_end = format_utc(end_of_day(parse_cutoff(manifest["cutoff"])))
    recorded = manifest.get("max_doc_date")
    if recorded is None or recorded > cutoff_end:
        return Check("dates", False, f"recorded max document date {recorded} is after the cutoff end {cutoff_end}")
    late = ids[ids["date"] > cutoff_end]
    if len(late):
        return Check("dates", False, f"{len(late)} kept document(s) dated after {cutoff_end}, e.g. "
                                     f"{late['id'].iloc[0]} at {late['date'].iloc[0]}")
    if len(ids) and ids["date"].max() != recorded:
        return Check("dates", False, f"ids say max date {ids['date'].max()}, manifest says {recorded}")
    return Check("dates", True, f"max kept document date {recorded} <= {cutoff_end}")


def _check_source(vol: Volume, manifest: dict, ids: pd.DataFrame) -> Check:
    """Re-read the source: every kept id present, eligible by its own date and the build's filters, same text."""
    cfg = CorpusConfig(**{**manifest["config"], "workers": 1})
    filt = DocFilter.from_config(cfg)
    try:
        source = resolve_source(cfg.source, vol, cfg.cutoff, cfg.dumps)
    except PitlmError as e:
        return Check("source", False, f"cannot re-read the source: {e}")
    want = dict(zip(ids["id"], ids["text_hash"], strict=True))
    dated = dict(zip(ids["id"], ids["date"], strict=True))
    remaining_by_dump = Counter(ids["dump"])
    seen, problems = set(), Counter()
    example = {}
    for unit in source.units:
        for _row, rec in iter_records(unit):
            doc_id = str(rec.get("id"))
            if doc_id not in want or doc_id in seen:
                continue
            seen.add(doc_id)
            reason, date = filt.check(rec)
            problem = reason or ("text_changed" if text_hash(rec["text"]) != want[doc_id] else None)
            if problem is None and format_utc(date) != dated[doc_id]:  # its date decides its period
                problem = "date_changed"
            if problem:
                problems[problem] += 1
                example.setdefault(problem, doc_id)
            remaining_by_dump[rec.get("dump") or unit.dump] -= 1
            if unit.kind == "hub" and remaining_by_dump[unit.dump] <= 0:
                break  # every kept id of this dump found: the rest of the stream is not needed
    missing = len(want) - len(seen)
    if missing:
        problems["missing_from_source"] = missing
        example["missing_from_source"] = next(i for i in want if i not in seen)
    if problems:
        return Check("source", False, "; ".join(f"{k}={v} (e.g. {example[k]})" for k, v in sorted(problems.items())))
    return Check("source", True, f"all {len(want)} kept ids re-read from the source and eligible")


def _slice_table(manifest: dict, index: dict) -> list[dict]:
    if "periods" in index:
        return index["periods"]
    return [{"period": 1, "start": manifest.get("after"), "cutoff": manifest["cutoff"]}]


def _check_slices(root: Path, manifest: dict, index: dict) -> list[Check]:
    """One check per cutoff, `slice@CUTOFF`, over what a reader of that slice reads (index.json's entries of
    periods <= k, in index order): every document dated on or before the cutoff and inside its own period, counts
    and the stream hash as the manifest records them. The streams are hashed in one pass, slice after slice."""
    table = _slice_table(manifest, index)
    ends = {int(p["period"]): format_utc(end_of_day(parse_cutoff(p["cutoff"]))) for p in table}
    starts = {int(p["period"]): None if p["start"] is None else format_utc(end_of_day(parse_cutoff(p["start"])))
              for p in table}
    recorded = {s["cutoff"]: s for s in manifest["slices"]}
    hashes = {s: hashlib.sha256() for s in ("train", "val")}
    tokens, id_tokens, docs, checks, frames = {"train": 0, "val": 0}, {"train": 0, "val": 0}, 0, [], []
    order = [p for s in ("train", "val") for p in _order_problems(index, s)]
    for p in table:
        k, cutoff = int(p["period"]), str(p["cutoff"])
        problems = list(order)
        for split in ("train", "val"):
            for e in index["splits"].get(split, []):
                if int(e.get("period", 1)) != k:
                    continue
                tokens[split] += int(e["tokens"])
                _hash_file(root / e["file"], hashes[split])
                frame = _ids_of(root, e)
                if frame is None:
                    problems.append(f"{e['file']}: its ids file {e.get('ids')} cannot be read")
                    continue
                docs += len(frame)
                frames.append(frame.assign(file=e["file"]))
                problems += _period_problems(e, frame, k, starts[k], ends[k])
                id_tokens[split] += int((frame["n_tokens"] + 1).sum())  # documents may run on into the next shard
        seen = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "date", "file"])
        late = seen[seen["date"] > ends[k]]
        if len(late):  # the leak this audit exists for: a reader of this slice would train on a later document
            problems.insert(0, f"{len(late)} document(s) of the slice dated after {ends[k]}, e.g. {late['id'].iloc[0]} "
                               f"at {late['date'].iloc[0]} in {late['file'].iloc[0]}")
        if id_tokens != tokens:
            problems.append(f"the slice's ids account for {id_tokens} tokens, its shards hold {tokens}")
        want = recorded.get(cutoff)
        if want is None:
            problems.append(f"the manifest records no slice {cutoff}")
        else:
            if want["tokens"] != tokens:
                problems.append(f"index.json gives {tokens} tokens, the manifest {want['tokens']}")
            if want.get("max_doc_date") and want["max_doc_date"] > ends[k]:
                problems.append(f"recorded max document date {want['max_doc_date']} is after {ends[k]}")
            got = {s: h.copy().hexdigest() for s, h in hashes.items()}
            bad = [s for s in ("train", "val") if got[s] != want["stream_sha256"][s]]
            if bad:
                problems.append(f"the {'/'.join(bad)} token stream differs from the manifest's sha256")
        name = f"slice@{cutoff}"
        if problems:
            checks.append(Check(name, False, "; ".join(problems[:4]) + (f" (+{len(problems) - 4} more)"
                                                                        if len(problems) > 4 else "")))
        else:
            checks.append(Check(name, True, f"periods 1..{k}: {docs} documents <= {ends[k]}, {tokens['train']} "
                                            f"train + {tokens['val']} val tokens, stream hashes match"))
    return checks


def _order_problems(index: dict, split: str) -> list[str]:
    periods = [int(e.get("period", 1)) for e in index["splits"].get(split, [])]
    if periods != sorted(periods):
        return [f"index.json lists the {split} shards out of period order ({periods})"]
    return []


def _hash_file(path: Path, h) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)


def _ids_of(root: Path, entry: dict) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(root / entry["ids"], columns=["id", "date", "n_tokens"])
    except Exception:  # noqa: BLE001 - a missing or corrupt ids file is reported by the caller
        return None


def _period_problems(entry: dict, frame: pd.DataFrame, k: int, start: str | None, end: str) -> list[str]:
    """A shard of period k: none of its documents crawled on or before the period's start (one after its end is
    reported by the slice's own date check), and its recorded max_date not after the end."""
    out = []
    if start is not None and len(early := frame[frame["date"] <= start]):
        out.append(f"{len(early)} document(s) of period {k} ({entry['file']}) crawled on or before its start "
                   f"{start}, e.g. {early['id'].iloc[0]}")
    if entry.get("max_date") and entry["max_date"] > end:
        out.append(f"index.json says {entry['file']} holds documents up to {entry['max_date']}, after {end}")
    return out


# ----------------------------------------------------------------------------- tokenizer audit

def token_counts(tok, texts) -> np.ndarray:
    counts = np.zeros(len(tok), np.int64)
    batch = []
    for text in [*texts, None]:
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) >= 256):
            for enc in tok.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
                counts += np.bincount(np.asarray(enc.ids, np.int64), minlength=len(tok))[:len(tok)]
            batch = []
    return counts


def audit_tokenizer(vol: Volume, spec: str, pit_source: str, cutoff: str | dt.date, later_source: str,
                    top: int = 30, min_count: int = 3, max_docs: int | None = None, lang: str | None = "en") -> dict:
    """Vocabulary entries of `spec` that never occur in the PIT corpus (docs of `pit_source` crawled on or before
    the cutoff) but occur >= min_count times in the later corpus (docs of `later_source` crawled after it)."""
    cutoff = parse_cutoff(cutoff)
    tok = load_tokenizer(spec, vol)
    pit = resolve_source(pit_source, vol, cutoff)
    pit_counts = token_counts(tok, (r["text"] for r in iter_eligible(pit.units, DocFilter(cutoff, lang), max_docs)))
    later = resolve_source(later_source, vol, dt.date(9999, 12, 31))
    after = (r["text"] for r in iter_eligible(later.units, DocFilter(dt.date(9999, 12, 30), lang))
             if (d := parse_doc_date(r.get("date"))) is not None and d > end_of_day(cutoff))
    if max_docs is not None:
        after = itertools.islice(after, max_docs)
    later_counts = token_counts(tok, after)
    if pit_counts.sum() == 0:
        raise PitlmError(f"no document of '{pit_source}' is crawled on or before {cutoff}")
    if later_counts.sum() == 0:
        raise PitlmError(f"no document of '{later_source}' is crawled after {cutoff}")
    special = set(tok.all_special_ids)
    found = [i for i in np.argsort(-later_counts, kind="stable")
             if pit_counts[i] == 0 and later_counts[i] >= min_count and int(i) not in special]
    entries = [{"id": int(i), "token": tok.convert_ids_to_tokens(int(i)), "text": tok.decode([int(i)]),
                "later_count": int(later_counts[i])} for i in found[:top]]
    used = [i for i in range(len(tok)) if i not in special]
    return {"vocab_size": len(tok), "pit_tokens": int(pit_counts.sum()), "later_tokens": int(later_counts.sum()),
            "unused_in_pit": int(sum(pit_counts[i] == 0 for i in used)), "absent_in_pit_frequent_later": len(found),
            "entries": entries}
