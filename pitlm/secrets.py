"""Secrets never reach a file pitlm writes: job records and logs (pitlm/jobs), and every stage's run directory
(config.yaml, summary.json, log.txt; pitlm/runs.py), which a submitted command writes in the job's child process.

A secret is the value of a secret-named environment variable (KAGGLE_KEY, HF_TOKEN, ..., as forwarded into a
job with `--env`), any value given explicitly, and whatever follows a `SECRET_NAME=` assignment in a text.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = r"[A-Z][A-Z0-9_]*(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD)"
_SECRET_NAME_RE = re.compile(rf"^{SECRET_NAME}$")
_SECRET_ASSIGN_RE = re.compile(rf"\b({SECRET_NAME})=(\"[^\"]*\"|'[^']*'|\S+)")
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME_RE.match(name.upper()))


class Redactor:
    """Replaces secret values (those of secret-named environment variables, plus any given) with ***, and any
    `SECRET_NAME=value` assignment, so a key a job prints still never reaches a file pitlm writes."""

    def __init__(self, secrets: list[str] | tuple[str, ...] = ()):
        env = [v for k, v in os.environ.items() if is_secret_name(k)]
        self.secrets = sorted({s for s in [*env, *secrets] if len(s) >= 6}, key=len, reverse=True)

    def text(self, s: str) -> str:
        for secret in self.secrets:
            s = s.replace(secret, REDACTED)
        return _SECRET_ASSIGN_RE.sub(lambda m: f"{m.group(1)}={REDACTED}", s)

    def obj(self, o: Any) -> Any:
        if isinstance(o, str):
            return self.text(o)
        if isinstance(o, dict):
            return {k: self.obj(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [self.obj(v) for v in o]
        return o

