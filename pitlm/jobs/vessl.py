"""The VESSL Cloud backend: `vesslctl job create` with the cache volume mounted at the container's PITLM_HOME; the
container clones this repository at the submitted commit, pip-installs pitlm from it and runs the command.

Every vesslctl command line pitlm runs, and the container script, are in `VESSLCTL` and `CONTAINER_SCRIPT` below:
if your vesslctl spells a flag differently, fix it there. The flags follow VESSL's own cookbook scripts
(vessl-cloud-cookbook, aqr-finance/batch-job/*.sh): `job create --name --resource-spec --image
--object-volume SLUG:PATH --env K=V --tag T --cmd`, `job list -o json` (objects with `slug` and `name`),
`job show SLUG -o json` (`workloadState`: ... succeeded | failed | terminated | cancelled), `job logs --limit 1000`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pitlm
from pitlm.errors import PitlmError
from pitlm.jobs.core import (
    WRITING_STAGES,
    Job,
    SubmitOptions,
    command_lines,
    command_stage,
    forward_env,
    run_tool,
)
from pitlm.secrets import is_secret_name

log = logging.getLogger("pitlm.jobs")

# ----------------------------------------------------------------------------- the templates (fix flags here)
VESSLCTL = os.environ.get("PITLM_VESSLCTL", "vesslctl")
VESSLCTL_ARGS = {
    "create": ["job", "create", "--name", "{name}", "--resource-spec", "{resource_spec}", "--image", "{image}"],
    "volume": ["--object-volume", "{volume}:{mount_path}"],
    "env": ["--env", "{key}={value}"],
    "tag": ["--tag", "{tag}"],
    "cmd": ["--cmd", "{cmd}"],
    "list": ["job", "list", "-o", "json"],
    "show": ["job", "show", "{slug}", "-o", "json"],
    "logs": ["job", "logs", "--limit", "1000", "{slug}"],  # the API caps --limit at 1000 lines
    "terminate": ["job", "terminate", "{slug}"],
}
STATE_KEY = "workloadState"  # in `job show -o json`
DEFAULT_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel"  # the seed's image; torch comes with it
# Runs in the container before the command. `set -e` for setup; the command itself runs under `set +e` so that
# its exit status is recorded in the log (see core.command_lines). With a volume, PITLM_REQUIRE_PERSISTENT=1 makes
# long stages refuse to start if the mount did not happen (PITLM_HOME would be the pod's ephemeral disk).
CONTAINER_SCRIPT = """\
set -e
export PITLM_HOME={mount_path}
{require_persistent}export PYTHONUNBUFFERED=1
mkdir -p "$PITLM_HOME"
command -v git >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq git >/dev/null)
git clone --quiet --filter=blob:none {repo_url} /workspace/pitlm
cd /workspace/pitlm
git checkout --quiet {commit}
echo "pitlm source: {repo_url} @ $(git rev-parse HEAD)"
python -m pip install --no-cache-dir --quiet {pip_target}
set +e
"""
VESSL_TERMINAL = {"succeeded": "succeeded", "completed": "succeeded", "failed": "failed", "error": "failed",
                  "terminated": "cancelled", "cancelled": "cancelled", "canceled": "cancelled", "stopped": "cancelled"}


def vesslctl(template: str, **values: str) -> list[str]:
    return [part.format(**values) for part in VESSLCTL_ARGS[template]]


def map_state(raw: str | None) -> str:
    r = (raw or "").strip().lower()
    if not r:
        return "unknown"
    if r in VESSL_TERMINAL:
        return VESSL_TERMINAL[r]
    if any(k in r for k in ("pend", "queue", "schedul", "init", "creat", "wait", "provision", "submit")):
        return "pending"
    return "running"


# ----------------------------------------------------------------------------- the source the container clones

def _git(repo: Path, *args: str) -> str | None:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def https_url(url: str) -> str:
    """The container has no SSH key: clone over https (public repositories, or a token in the URL)."""
    m = re.match(r"^(?:ssh://)?git@([^:/]+)[:/](.+)$", url)
    return f"https://{m.group(1)}/{m.group(2)}" if m else url


def resolve_source(opts: SubmitOptions) -> dict:
    """Repository URL and full commit the container will install. From the checkout pitlm runs from (or
    --repo-dir): refuses uncommitted changes to tracked files (--allow-dirty) and a commit on no remote branch
    (--allow-unpushed). With both --repo-url and --commit and no --repo-dir, they are taken as given."""
    if opts.repo_url and opts.commit and not opts.repo_dir:
        if not re.fullmatch(r"[0-9a-fA-F]{7,40}", opts.commit):
            raise PitlmError(f"--commit {opts.commit!r}: give a commit SHA (or --repo-dir to resolve a ref)")
        return {"repo_url": opts.repo_url, "commit": opts.commit, "checked": False}
    repo = Path(opts.repo_dir or Path(pitlm.__file__).resolve().parent.parent)
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top is None:
        raise PitlmError(f"{repo} is not a git checkout, so there is no commit for the job to install; "
                         "pass --repo-dir CHECKOUT, or --repo-url URL --commit SHA")
    repo = Path(top)
    commit = _git(repo, "rev-parse", "--verify", f"{opts.commit or 'HEAD'}^{{commit}}")
    if commit is None:
        raise PitlmError(f"no commit {opts.commit or 'HEAD'!r} in {repo}")
    changed = (_git(repo, "status", "--porcelain", "--untracked-files=no") or "").splitlines()
    if changed and not opts.commit and not opts.allow_dirty:
        raise PitlmError(f"{repo} has uncommitted changes to {len(changed)} tracked file(s); the job would run "
                         f"commit {commit[:10]} without them. Commit and push, or pass --allow-dirty")
    url = opts.repo_url or _git(repo, "remote", "get-url", "origin")
    if not url:
        raise PitlmError(f"{repo} has no `origin` remote for the job to clone; add one or pass --repo-url URL")
    pushed = bool(_git(repo, "branch", "-r", "--contains", commit))
    if not pushed and not opts.allow_unpushed:
        raise PitlmError(f"commit {commit[:10]} is on no remote branch (as of your last push/fetch), so the job "
                         f"cannot check it out from {url}. `git push` it, or pass --allow-unpushed")
    return {"repo_url": https_url(url), "commit": commit, "checked": True, "dirty": bool(changed), "pushed": pushed}


# ----------------------------------------------------------------------------- the backend

class VesslBackend:
    name = "vessl"
    default_poll_s = 30.0
    log_is_local = False

    def __init__(self) -> None:
        self._source: dict | None = None

    def check(self, stage: str, opts: SubmitOptions, command: list[str]) -> None:
        if stage in WRITING_STAGES and not opts.volume and not opts.allow_ephemeral:
            raise PitlmError(f"`pitlm {stage}` writes to PITLM_HOME, and without --volume a VESSL job writes to the "
                             "pod's ephemeral disk: everything is lost when the job ends (the seed lost a $329 run "
                             "this way). Pass --volume objvol-... (`vesslctl volume list`), or --allow-ephemeral")
        if not opts.resource_spec:
            raise PitlmError("the vessl backend needs --resource-spec (or PITLM_VESSL_RESOURCE_SPEC); list them "
                             "with `vesslctl resource-spec list`")
        self._source = resolve_source(opts)

    def submit(self, job: Job, opts: SubmitOptions) -> None:
        assert self._source is not None, "check() first"
        volume, _, mount = (opts.volume or "").partition(":")
        mount_path = mount or opts.mount_path
        src = self._source
        pip_target = shlex.quote(f".[{opts.extras}]" if opts.extras else ".")
        script = CONTAINER_SCRIPT.format(mount_path=shlex.quote(mount_path), repo_url=shlex.quote(src["repo_url"]),
                                         commit=src["commit"], pip_target=pip_target,
                                         require_persistent="export PITLM_REQUIRE_PERSISTENT=1\n" if volume else "")
        script += command_lines(job.run_id, job.command, gpus=opts.gpus or "auto")
        job.write_file("job.sh", script)
        env = forward_env(opts.env)
        job.secrets = [v for k, v in env.items() if is_secret_name(k)]
        job.env_forwarded = sorted(env)
        stage = command_stage(job.command)
        name = _job_name(opts.name or f"pitlm-{stage}", job.run_id)
        argv = [VESSLCTL, *vesslctl("create", name=name, resource_spec=opts.resource_spec,
                                    image=opts.image or DEFAULT_IMAGE)]
        if volume:
            argv += vesslctl("volume", volume=volume, mount_path=mount_path)
        for key, value in env.items():
            argv += vesslctl("env", key=key, value=value)
        for tag in ("pitlm", f"pitlm-{stage}"):
            argv += vesslctl("tag", tag=tag)
        job.submit_argv = [*argv, *vesslctl("cmd", cmd="$(cat job.sh)")]
        job.options = {"name": name, "image": opts.image or DEFAULT_IMAGE, "resource_spec": opts.resource_spec,
                       "volume": volume or None, "mount_path": mount_path, "gpus": opts.gpus or "auto", **src}
        redact = job.redactor()
        proc = run_tool([*argv, *vesslctl("cmd", cmd=script)], "install and log in to vesslctl first")
        if proc.stdout.strip():
            log.info("vesslctl: %s", redact.text(proc.stdout.strip()))
        if proc.returncode != 0:
            raise PitlmError(f"vesslctl job create failed (exit {proc.returncode}): "
                             f"{redact.text((proc.stderr or proc.stdout).strip()[-500:])}")
        job.native_id = _slug_from(proc.stdout) or self._find_slug(name, job, opts.poll_interval)

    def _find_slug(self, name: str, job: Job, poll_interval: float | None) -> str:
        """A new job shows up in `job list` after a short delay: retry (as the cookbook's find_job_slug does)."""
        delay = min(2.0, poll_interval if poll_interval is not None else 2.0)
        for _ in range(10):
            proc = run_tool([VESSLCTL, *vesslctl("list")], "install vesslctl")
            try:
                rows = json.loads(proc.stdout) if proc.returncode == 0 else []
            except json.JSONDecodeError:
                rows = []
            rows = rows.get("items", rows) if isinstance(rows, dict) else rows
            slug = next((r.get("slug") for r in rows if isinstance(r, dict) and r.get("name") == name), None)
            if slug:
                return slug
            time.sleep(delay)
        raise PitlmError(f"created VESSL job {name} but could not find its slug in `vesslctl job list`; "
                         "find it there and follow it with `vesslctl job show SLUG`")

    def poll(self, job: Job) -> tuple[str, str | None]:
        proc = run_tool([VESSLCTL, *vesslctl("show", slug=job.native_id or "")], "install vesslctl")
        try:
            data = json.loads(proc.stdout) if proc.returncode == 0 else {}
        except json.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        raw = data.get(STATE_KEY) or data.get("state") or data.get("status")
        if not raw:
            log.warning("%s: `vesslctl job show %s` gave no state (exit %s); retrying", job.run_id, job.native_id,
                        proc.returncode)
            return "unknown", None
        return map_state(str(raw)), str(raw)

    def collect(self, job: Job) -> str:
        proc = run_tool([VESSLCTL, *vesslctl("logs", slug=job.native_id or "")], "install vesslctl")
        if proc.returncode != 0:
            job.error = f"vesslctl job logs failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
            return proc.stdout + proc.stderr
        return proc.stdout

    def cancel_hint(self, job: Job) -> str:
        return shlex.join([VESSLCTL, *vesslctl("terminate", slug=job.native_id or "SLUG")])


def _job_name(base: str, run_id: str) -> str:
    """Lower-case, dash-separated, unique per job (the slug is found by name): base + the run id's suffix."""
    clean = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-") or "pitlm"
    return f"{clean[:40]}-{run_id.rsplit('-', 1)[-1]}"


def _slug_from(stdout: str) -> str | None:
    """`job create` output is not documented; use a slug only when it is JSON that names one."""
    try:
        data = json.loads(stdout)
    except (json.JSONDecodeError, TypeError):
        return None
    return data.get("slug") if isinstance(data, dict) else None
