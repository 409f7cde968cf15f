import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pitlm.errors import NotPersistentError, PitlmError
from pitlm.volume import (
    SUBDIRS,
    Volume,
    atomic_dir,
    atomic_write_json,
    build_manifest,
    check_persistence,
    read_manifest,
    sha256_file,
    write_manifest,
)


def test_volume_layout_and_home_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("PITLM_HOME", str(tmp_path / "env"))
    assert Volume.resolve().root == (tmp_path / "env").resolve()
    vol = Volume.resolve(tmp_path / "flag").ensure()
    assert vol.root == (tmp_path / "flag").resolve()
    assert all((vol.root / s).is_dir() for s in SUBDIRS)
    assert vol.path("corpus", "x") == vol.root / "corpus" / "x"


def test_atomic_write_killed_mid_write_leaves_no_partial_file(tmp_path):
    """A writer killed while writing must leave neither the target nor a half-written file under its name."""
    target = tmp_path / "big.bin"
    script = textwrap.dedent(f"""
        import sys, time
        import pitlm.volume as v
        class Slow:
            def __init__(self): self.n = 0
        def slow_write(data):
            pass
        data = b"x" * (1 << 20)
        import os, tempfile
        orig = os.fsync
        def hang(fd):
            print("writing", flush=True); time.sleep(60)
        os.fsync = hang
        v.atomic_write_bytes({str(target)!r}, data)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # inside the write, before the rename
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    # an earlier complete version survives a killed rewrite too
    target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old"


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("partial")
        raise RuntimeError("killed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("done")
    assert (final / "a.txt").read_text() == "done"
    with pytest.raises(PitlmError, match="already exists"), atomic_dir(final):
        pass


def test_manifest_round_trip(tmp_path):
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"abc")
    m = build_manifest("corpus", inputs={"source": "x"}, payload=[payload], root=tmp_path,
                       config={"cutoff": "2017-06-30"}, wall_seconds=1.5, docs_kept=3)
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back == json.loads(json.dumps(m))
    assert back["payload"] == [{"path": "p.bin", "sha256": sha256_file(payload), "bytes": 3}]
    assert back["versions"]["pitlm"] and back["versions"]["torch"]
    with pytest.raises(PitlmError, match="no manifest"):
        read_manifest(tmp_path / "missing")


def test_persistence_guard_tmpfs_vs_normal(tmp_path, monkeypatch):
    mounts = [("/", "ext4"), ("/dev/shm", "tmpfs"), ("/data", "overlay"), ("/mnt/vol", "fuse.s3fs")]
    assert not check_persistence("/dev/shm/pitlm", mounts, container=False).persistent
    assert not check_persistence("/data/x", mounts, container=False).persistent
    assert check_persistence("/mnt/vol/pitlm", mounts, container=True).persistent
    assert check_persistence("/home/u/.cache", mounts, container=False).persistent
    root_in_pod = check_persistence("/root/.cache/pitlm", mounts, container=True)
    assert not root_in_pod.persistent and "container" in root_in_pod.reason


def test_persistence_guard_real_tmpfs(tmp_path, monkeypatch):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not any(m.split()[1] == "/dev/shm" and m.split()[2] == "tmpfs"
                                   for m in Path("/proc/mounts").read_text().splitlines()):
        pytest.skip("no tmpfs at /dev/shm")
    d = shm / f"pitlm-test-{os.getpid()}-{time.time_ns()}"
    try:
        vol = Volume(d)
        assert not vol.persistence().persistent
        with pytest.raises(NotPersistentError, match="refusing to start train"):
            vol.guard(require=True, stage="train")
        monkeypatch.setenv("PITLM_REQUIRE_PERSISTENT", "1")
        with pytest.raises(NotPersistentError):
            vol.guard(stage="train")
        monkeypatch.setenv("PITLM_REQUIRE_PERSISTENT", "0")
        assert vol.guard(stage="train").persistent is False  # warns only
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def test_atomic_write_json(tmp_path):
    p = atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    assert [f.name for f in p.parent.iterdir()] == ["b.json"]


def test_atomic_outputs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write_json(tmp_path / "m.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("args", [
    ["market", "world", "m1", "--world", "../.."],
    ["corpus", "tokenizer", "t1", "--source", "world:../x", "--cutoff", "2017-06-30"],
    ["corpus", "build", "c1", "--source", "world:demo", "--cutoff", "2017-06-30", "--tokenizer", "pit:../x"],
    ["eval", "--market", "m", "--model", "a=model:../x"],
    ["eval", "--market", "../m", "--model", "a=control:random-features"],
    ["train", "--recipe", "demo-scratch-pit", "--set", "corpus=.."],
])
def test_input_names_cannot_read_outside_the_volume(cli, home, args):
    """Names of inputs (a world, a PIT tokenizer, a trained run, a market, a corpus) are checked like the
    names of outputs: one line, exit 2, before anything outside PITLM_HOME/<kind>/ is read."""
    (home / "x").mkdir(parents=True)
    (home / "x" / "index.json").write_text("{}")  # bait one level up: a corpus-looking directory
    code, out, err = cli(*args)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    # a corpus may also be named by its directory (a path the user gives on purpose): it must hold a built corpus
    corpus_dir = args[-1].startswith("corpus=") and "is not a built corpus" in line
    assert ("must be a plain directory name" in line or "points outside PITLM_HOME" in line or corpus_dir), line


def test_volume_path_refuses_to_climb_out_of_its_kind(tmp_path):
    vol = Volume(tmp_path).ensure()
    assert vol.path("world", "w", "corpus") == vol.root / "world" / "w" / "corpus"
    for parts in (("..",), ("..", "models", "x"), ("w", "..", ".."), ("/etc",)):
        with pytest.raises(PitlmError, match="points outside PITLM_HOME/world/"):
            vol.path("world", *parts)


def test_write_lock_excludes_other_processes_and_this_one(tmp_path):
    from pitlm.volume import LockedError

    vol = Volume(tmp_path).ensure()
    holder = textwrap.dedent(f"""
        import sys, time
        from pitlm.volume import Volume
        with Volume({str(tmp_path)!r}).lock("world", "w"):
            print("held", flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match="another pitlm process is writing world 'w'"):
            with vol.lock("world", "w"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with vol.lock("world", "w"):  # released by the kernel when its holder died
        with pytest.raises(LockedError):
            with vol.lock("world", "w"):  # and exclusive within one process too
                pass


def test_write_lock_never_holds_an_orphaned_lock_file(tmp_path):
    """A holder unlinks the lock file on release: a process that opened the old file just before that must not
    end up holding a lock on the orphaned inode while another holds the new file at the same path."""
    from pitlm.volume import LockedError, _acquire

    path = tmp_path / ".w.lock"
    stale = open(path, "a")  # opened before the previous holder's release ...
    path.unlink()  # ... which unlinks the file; a third process then creates and locks a new one
    opened = []

    def opener(p, mode):
        f = stale if not opened else open(p, mode)
        opened.append(f)
        return f

    f = _acquire(path, LockedError("busy"), opener=opener)
    try:
        assert len(opened) == 2 and stale.closed  # the orphan was locked, seen, closed, and the path reopened
        assert os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    finally:
        f.close()
