"""`pitlm doctor`: what this machine can do for pitlm, the truth about fast kernels, and fixes for problems.

Each check yields (name, status, detail, hint). status is ok | warn | fail | info; only `fail` (something
required is broken) makes the command exit non-zero.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

from pitlm.errors import PitlmError
from pitlm.kernels.availability import Check, fast_kernel_checks, gpu_info, version
from pitlm.market.jpx import kaggle_credentials
from pitlm.volume import Volume

VERSIONED = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "triton")
# Needed only by some stages: missing ones warn with the stage that needs them instead of failing.
OPTIONAL = {"triton": "only needed on GPU", "datasets": "needed to stream FineWeb from the HF hub (`corpus build --source fineweb`)"}


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def run_checks(vol: Volume) -> list[Check]:
    checks: list[Check] = []
    py_ok = sys.version_info >= (3, 10)
    checks.append(Check("python", "ok" if py_ok else "fail", platform.python_version(),
                        "" if py_ok else "pitlm needs Python >= 3.10"))
    for name in VERSIONED:
        v = version(name)
        if v is None:
            why = OPTIONAL.get(name)
            checks.append(Check(name, "warn" if why else "fail", "not installed",
                                f"pip install {name}" + (f" ({why})" if why else "")))
        else:
            checks.append(Check(name, "ok", v))
    mem = memory_gib()
    checks.append(Check("cpu", "info", f"{os.cpu_count()} cores, {mem:.1f} GiB RAM" if mem else f"{os.cpu_count()} cores"))
    gpus = gpu_info()
    if gpus:
        for g in gpus:
            checks.append(Check(f"gpu{g['index']}", "ok", f"{g['name']}, {g['memory_gib']} GiB, sm_{g['capability']}"))
    else:
        checks.append(Check("gpu", "info", "none (CPU-only: fine for the demo and tests)"))
    checks += fast_kernel_checks(gpus)
    # the volume
    try:
        vol.ensure()
        free = vol.free_bytes() / 2**30
        checks.append(Check("PITLM_HOME", "ok", f"{vol.root} ({free:.1f} GiB free)",
                            "" if free > 5 else "less than 5 GiB free"))
        verdict = vol.persistence()
        checks.append(Check("persistence", "ok" if verdict.persistent else "warn", verdict.reason,
                            "" if verdict.persistent else "mount a persistent volume and set PITLM_HOME to it"))
    except Exception as e:  # noqa: BLE001 - doctor reports, never crashes
        checks.append(Check("PITLM_HOME", "fail", f"{vol.root}: {e}", "pass --home to a writable directory"))
    try:
        source = kaggle_credentials()
        problem = ""
    except PitlmError as e:  # a malformed kaggle.json: say so, never print its contents
        source, problem = None, str(e)
    checks.append(Check("kaggle credentials", "ok" if source else ("warn" if problem else "info"),
                        f"present ({source})" if source else (problem or "absent"),
                        "" if source else "export KAGGLE_USERNAME/KAGGLE_KEY, or stage the JPX CSVs and use "
                                          "`pitlm market jpx NAME --from DIR`"))
    for tool, what in (("vesslctl", "VESSL batch jobs"), ("sbatch", "Slurm batch jobs")):
        path = shutil.which(tool)
        checks.append(Check(tool, "ok" if path else "info", path or "not on PATH",
                            "" if path else f"needed only for {what}"))
    return checks
