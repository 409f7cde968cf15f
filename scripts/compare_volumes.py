"""Two demo volumes, the same numbers? The eval's and the probe's results.json and the train runs' summaries, leaf by
leaf (|a - b| <= 1e-12 * max(1, |a|)), skipping wall-clock fields, timestamps, run ids and paths. It shows that a
refactor leaves `pitlm demo` unchanged (BENCHMARKS.md, issue 26):

    PITLM_HOME=/tmp/before OMP_NUM_THREADS=1 pitlm demo       # from the old checkout
    PITLM_HOME=/tmp/after  OMP_NUM_THREADS=1 pitlm demo       # from the new one
    python scripts/compare_volumes.py /tmp/before /tmp/after  # leaves_compared: N, differing: 0 (exit 0)
"""

import glob
import json
import math
import re
import sys

# wall-clock, throughput and where-things-are fields: they differ between any two runs
SKIP = re.compile(r"(seconds|_s$|wall|utc|created|timing|per_s|tok_s|tokens_per_second|_dir$|path|run_id|^run$|"
                  r"eval_run|cached|versions|peak|rss|mib|report_|elapsed|eta|throughput|device)", re.I)


class Walk:
    def __init__(self):
        self.leaves = 0
        self.bad: list[str] = []

    def __call__(self, a, b, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            if list(a) != list(b):
                self.bad.append(f"{where}: keys differ {sorted(set(a) ^ set(b))}")
            for k in a:
                if k in b and not SKIP.search(str(k)):
                    self(a[k], b[k], f"{where}.{k}")
            return
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                self.bad.append(f"{where}: lengths {len(a)} vs {len(b)}")
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                self(x, y, f"{where}[{i}]")
            return
        self.leaves += 1
        if isinstance(a, float) or isinstance(b, float):
            try:
                x, y = float(a), float(b)
            except (TypeError, ValueError):
                self.bad.append(f"{where}: {a!r} vs {b!r}")
                return
            if not (math.isnan(x) and math.isnan(y)) and not abs(x - y) <= 1e-12 * max(1.0, abs(x)):
                self.bad.append(f"{where}: {a!r} vs {b!r}")
        elif isinstance(a, str) and isinstance(b, str) and ("/" in a or re.match(r"\d{8}T", a)):
            return  # a path or a run id
        elif a != b:
            self.bad.append(f"{where}: {a!r} vs {b!r}")


def main(a_home: str, b_home: str) -> int:
    walk = Walk()
    for stage in ("eval", "probe"):
        fa = sorted(glob.glob(f"{a_home}/runs/{stage}-*/results.json"))
        fb = sorted(glob.glob(f"{b_home}/runs/{stage}-*/results.json"))
        if len(fa) != len(fb):
            walk.bad.append(f"{stage}: {len(fa)} vs {len(fb)} runs")
        for x, y in zip(fa, fb, strict=False):
            walk(json.load(open(x)), json.load(open(y)), stage)
    ta = sorted(glob.glob(f"{a_home}/runs/train-*/summary.json"))
    tb = sorted(glob.glob(f"{b_home}/runs/train-*/summary.json"))
    if len(ta) != len(tb):
        walk.bad.append(f"train: {len(ta)} vs {len(tb)} runs")
    for x, y in zip(ta, tb, strict=False):
        walk(json.load(open(x)), json.load(open(y)), "train")
    print(f"leaves_compared: {walk.leaves}")
    print(f"differing: {len(walk.bad)}")
    for line in walk.bad[:40]:
        print("  " + line)
    return 1 if walk.bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/compare_volumes.py HOME_A HOME_B")
    sys.exit(main(sys.argv[1], sys.argv[2]))
