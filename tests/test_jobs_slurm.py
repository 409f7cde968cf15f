"""The slurm backend against fake `sbatch`/`squeue`/`sacct` (see test_jobs_fakes.py): the fake sbatch really runs
the script, so these check the sbatch script, submission, polling through PENDING/RUNNING to sacct's verdict, log
collection and exit-status mirroring."""

from test_jobs_fakes import fake_tools_fixture, job_record, summary  # noqa: F401 (registers the fixture)

SECRET = "kg-5ecret-VALUE-0123456789"


def slurm(cli, *args):
    return cli("submit", "--backend", "slurm", "--poll-interval", "0.2", "--timeout", "60", *args)


def test_script_resources_and_torchrun_launch(cli, home, fake_tools, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_NORUN", "1")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    code, out, err = slurm(cli, "--async", "--nodes", "2", "--gpus", "8", "--time", "02:00:00", "--partition", "gpu",
                           "--volume", "/shared/pitlm", "--sbatch-arg=--account=abc", "--",
                           "train", "--recipe", "full-qwen35-35b-fsdp2")
    assert code == 0, err
    s = summary(out)
    job_dir = home / "runs" / s["job_id"]
    script = (job_dir / "job.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gres=gpu:8", "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu",
                 f"#SBATCH --output={job_dir / 'job.log'}", "#SBATCH --export=ALL", "export PITLM_HOME=/shared/pitlm",
                 "GPUS=8", 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 'srun --ntasks-per-node=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" --rdzv-id '
                 '"$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:29500" -m pitlm.cli train '
                 '--recipe full-qwen35-35b-fsdp2', 'echo "pitlm_exit_code: $rc"'):
        assert line in script.splitlines(), line
    assert SECRET not in script
    assert fake_tools("sbatch") == [["--parsable", "--account=abc", str(job_dir / "job.sbatch")]]
    rec = job_record(home, s["job_id"])
    assert rec["native_id"] == "1001" and rec["state"] == "pending" and rec["options"]["volume"] == "/shared/pitlm"
    assert rec["env_forwarded"] == ["KAGGLE_KEY"] and SECRET not in (job_dir / "job.json").read_text()

    code, out, _ = slurm(cli, "--async", "--gpus", "4", "--", "train")  # one node: torchrun --standalone
    script = (home / "runs" / summary(out)["job_id"] / "job.sbatch").read_text()
    assert 'GPUS=4\ntorchrun --standalone --nproc-per-node "$GPUS" -m pitlm.cli train\n' in script
    assert f"export PITLM_HOME={home}" in script  # default: this PITLM_HOME, on the shared filesystem
    code, out, _ = slurm(cli, "--async", "--gpus", "4", "--", "eval")  # not training: one process
    script = (home / "runs" / summary(out)["job_id"] / "job.sbatch").read_text()
    assert "torchrun" not in script and "#SBATCH --gres=gpu:4" in script and " -m pitlm.cli eval\n" in script


def test_job_runs_is_polled_and_collected(cli, home, fake_tools, tmp_path):
    volume = tmp_path / "shared-volume"
    code, out, err = slurm(cli, "--volume", str(volume), "--", "doctor")
    assert code == 0, err
    s = summary(out)
    assert s["job_state"] == "succeeded" and s["job_exit_code"] == "0" and s["doctor_failed"] == "0"
    assert s["pitlm_home"] == str(volume)  # the job ran with the volume as PITLM_HOME
    assert fake_tools("squeue")[0] == ["-h", "-j", "1001", "-o", "%T"]
    assert fake_tools("sacct")[-1] == ["-j", "1001", "-X", "-n", "-P", "-o", "State,ExitCode"]
    rec = job_record(home, s["job_id"])
    assert rec["state"] == "succeeded" and rec["native_state"] == "COMPLETED" and rec["exit_code"] == 0
    assert [state for _, state in rec["history"]] == ["pending", "running", "succeeded"]
    assert rec["metrics"]["doctor_failed"] == 0
    assert "pitlm_exit_code: 0" in (home / "runs" / s["job_id"] / "job.log").read_text()
    code, out, _ = cli("runs")
    assert "backend=slurm state=succeeded exit_code=0" in out


def test_failure_exit_status_from_sacct_or_the_log(cli, home, fake_tools, monkeypatch):
    code, out, _ = slurm(cli, "--", "runs", "show", "nope")
    rec = job_record(home, summary(out)["job_id"])
    assert code == 2 and rec["state"] == "failed" and rec["native_state"] == "FAILED" and rec["exit_code"] == 2
    assert "no run matching 'nope'" in rec["error"]
    monkeypatch.setenv("FAKE_SACCT_DISABLED", "1")  # no accounting: the exit marker in the log decides
    code, out, _ = slurm(cli, "--", "runs", "show", "nope")
    rec = job_record(home, summary(out)["job_id"])
    assert code == 2 and rec["state"] == "failed" and rec["exit_code"] == 2 and rec["native_state"] == "exit 2"


def test_multi_cluster_id_and_async_wait(cli, home, fake_tools, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_SUFFIX", ";cluster-b")
    code, out, err = slurm(cli, "--async", "--", "runs")
    assert code == 0, err
    job_id = summary(out)["job_id"]
    code, out, err = cli("jobs", "wait", job_id, "--poll-interval", "0.2", "--timeout", "60")
    assert code == 0, err
    assert out.splitlines()[1].split()[:4] == [job_id, "slurm", "succeeded", "0"]
    assert fake_tools("squeue")[0] == ["-h", "-j", "1001", "-o", "%T", "-M", "cluster-b"]


def test_corpus_build_executor_is_read_as_the_build_reads_it(tmp_path):
    from pitlm.jobs.slurm import corpus_build_executor

    recipe = tmp_path / "r.yaml"
    recipe.write_text("executor: slurm\ntasks: 64\n")
    build = ["corpus", "build", "c", "--source", "fineweb"]
    for extra, expect in [((), "mp"), (("--executor", "slurm"), "slurm"), (("--executor=ray",), "ray"),
                          (("--recipe", str(recipe)), "slurm"), (("-r", str(recipe), "--executor", "local"), "local"),
                          (("--executor", "slurm", "--set", "executor=mp"), "mp"), (("--set=executor=slurm",), "slurm"),
                          (("--recipe", "no-such-recipe"), "mp")]:
        assert corpus_build_executor([*build, *extra]) == expect, extra
    assert corpus_build_executor(["--home", "corpus", "corpus", "build", "c", "--executor", "slurm"]) == "slurm"
    assert corpus_build_executor(["corpus", "tokenizer", "t", "--executor", "slurm"]) is None
    assert corpus_build_executor(["train", "--executor", "slurm"]) is None


def test_corpus_driver_script_and_refusal(cli, home, fake_tools, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_NORUN", "1")
    build = ["corpus", "build", "c", "--source", "s", "--cutoff", "2017-06-30", "--tokenizer", "gpt2"]
    code, out, err = slurm(cli, "--async", "--", *build, "--executor", "slurm")
    assert code == 0, err
    script = (home / "runs" / summary(out)["job_id"] / "job.sbatch").read_text().splitlines()
    assert "#SBATCH --cpus-per-task=1" in script and not any("--gres" in line for line in script)
    code, out, err = slurm(cli, "--async", "--", *build)  # mp: the build's workers run in the job itself
    assert code == 0 and "#SBATCH --cpus-per-task=1" not in (home / "runs" / summary(out)["job_id"] / "job.sbatch").read_text()
    code, out, err = slurm(cli, "--async", "--nodes", "2", "--", *build, "--executor", "slurm")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: `corpus build --executor slurm` runs as a")
    assert len(fake_tools("sbatch")) == 2
