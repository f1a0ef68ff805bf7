"""The launchers' dry-runs (launch/tpu.py, launch/slurm.py): the commands they would run, with
config overrides that survive the shell quoting unchanged. No network, gcloud or sbatch."""
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
# One override with spaces and both kinds of quotes: the shell must hand it over unchanged.
OVERRIDES = ["--config.train.steps=10", """--config.data.sources.text.dir=/data/it's a "dir" $HOME"""]


def launch(script, *argv, check=True):
    result = subprocess.run([sys.executable, str(REPO / "launch" / script), *argv],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def remote_script(argv):
    """The shell commands a `gcloud ... ssh --command=SCRIPT` runs, as argv lists."""
    [script] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    commands, current = [], []
    for token in shlex.split(script):
        if token == "&&":
            commands.append(current)
            current = []
        else:
            current.append(token)
    return commands + [current]


def test_tpu_dry_run():
    out = launch("tpu.py", "train", "--name=m2omni-9b", "--zone=us-east5-a", "--accelerator-type=v5p-64",
                 "--config=configs/m2omni_9b.py", "--workdir=gs://bucket/m2omni_9b", "--spot",
                 "--data=gs://bucket/data", "--dry-run", *OVERRIDES).stdout
    lines = [shlex.split(line) for line in out.splitlines()]
    assert all(line[0] in ("gcloud", "git") for line in lines), out
    create, describe, archive, upload, install, train, delete = lines

    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"m2omni-9b", "--zone=us-east5-a", "--accelerator-type=v5p-64", "--node-id=m2omni-9b",
            "--spot", "--runtime-version=v2-alpha-tpuv5"} <= set(create)
    assert describe[4] == "describe" and "--format=value(state.state)" in describe

    # The source goes as a git archive of HEAD (never .venv / .git), through the staging bucket.
    assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    assert upload[-1] == "gs://bucket/m2omni_9b_launch/source.tar.gz"
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "m2omni-9b"]
    assert "--worker=all" in install
    assert ["python3", "-m", "pip", "install", "--user", "-q", "-e", ".[tpu]"] in remote_script(install)

    assert "--worker=all" in train
    commands = remote_script(train)
    [run] = [c for c in commands if c[0] == "m2omni-train"]
    assert run[:4] == ["m2omni-train", "--multihost", "--config=configs/m2omni_9b.py",
                       "--workdir=gs://bucket/m2omni_9b"]
    assert run[4:] == ["--config.data.dir=/tmp/m2omni_data"] + OVERRIDES  # parsed back: unchanged
    # The prepared data are copied down on every worker, not generated there.
    assert ["gcloud", "storage", "rsync", "--recursive", "gs://bucket/data", "/tmp/m2omni_data"] in commands

    assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
    assert {"m2omni-9b", "--zone=us-east5-a", "--force", "--quiet"} <= set(delete)


def test_tpu_multislice_keep_and_prepare():
    out = launch("tpu.py", "train", "--name=ms", "--zone=us-east5-a", "--accelerator-type=v5p-128",
                 "--node-count=2", "--reserved", "--keep", "--data=gs://b/data", "--prepare-data",
                 "--config=configs/m2omni_9b.py", "--workdir=gs://b/run", "--dry-run").stdout
    lines = [shlex.split(line) for line in out.splitlines()]
    create = lines[0]
    assert {"--node-count=2", "--node-prefix=ms", "--reserved"} <= set(create)
    assert not any(a.startswith("--node-id") for a in create)
    ssh = [line for line in lines if "ssh" in line]
    assert all(line[3] == "queued-resources" and "--node=all" in line for line in ssh[::2])  # every slice
    prepare = next(line for line in ssh if "--worker=0" in line)  # once, on worker 0 of slice 0
    assert "--node=0" in prepare
    assert any("m2omni-prepare-data" in c for c in remote_script(prepare))
    assert not any("delete" in line for line in lines)  # --keep
    train = next(c for line in ssh for c in remote_script(line) if "m2omni-train" in c)
    assert "--config.mesh.dcn.data=2" in train  # the slices are the DCN data axis
    out = launch("tpu.py", "train", "--name=ms", "--zone=us-east5-a", "--accelerator-type=v5p-128",
                 "--node-count=2", "--config=configs/m2omni_9b.py", "--workdir=gs://b/run", "--dry-run",
                 "--config.mesh.dcn.fsdp=2").stdout
    ssh = [shlex.split(line) for line in out.splitlines() if " ssh " in line]
    train = next(c for line in ssh for c in remote_script(line) if "m2omni-train" in c)
    assert "--config.mesh.dcn.fsdp=2" in train  # the user's layout wins
    assert not any(a.startswith("--config.mesh.dcn.data") for a in train)


def test_tpu_prepare_locally():
    out = launch("tpu.py", "prepare", "--config=configs/tiny.py", "--workdir=gs://b/run",
                 "--data=gs://b/data", "--dry-run", *OVERRIDES).stdout
    prepare, upload = [shlex.split(line) for line in out.splitlines()]
    assert prepare[2] == "m2omni-prepare-data" and prepare[-2:] == OVERRIDES
    assert upload == ["gcloud", "storage", "rsync", "--recursive", "/tmp/m2omni_prepare", "gs://b/data"]


def test_slurm_dry_run():
    out = launch("slurm.py", "--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--time=02:00:00",
                 "--venv=/shared/venv", "--config=configs/m2omni_9b.py", "--workdir=/shared/runs/9b",
                 "--dry-run", *OVERRIDES).stdout
    head, _, rest = out.partition("<<'M2OMNI_SBATCH_EOF'\n")
    script, _, tail = rest.partition("M2OMNI_SBATCH_EOF\n")
    assert shlex.split(head.splitlines()[-1])[:2] == ["cat", ">"]
    assert shlex.split(tail) == ["sbatch", "slurm_logs/m2omni.sbatch"]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--gres=gpu:8", "--ntasks-per-node=1", "--partition=gpu", "--time=02:00:00"):
        assert f"#SBATCH {directive}" in lines
    assert "source /shared/venv/bin/activate" in lines
    # The coordinator: the job's first node; all 8 GPUs for the node's one process.
    assert 'coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert any(line.startswith('export JAX_COORDINATOR_ADDRESS="$coordinator:') for line in lines)
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    [srun] = [shlex.split(line) for line in lines if line.startswith("srun ")]
    assert srun == ["srun", "m2omni-train", "--multihost", "--config=configs/m2omni_9b.py",
                    "--workdir=/shared/runs/9b"] + OVERRIDES


def test_slurm_writes_the_script(tmp_path):
    """Without --dry-run the script is written; the dry-run's here-document is the same text."""
    argv = ["--nodes=2", "--gpus-per-node=8", "--tasks-per-node=8", "--config=c.py", "--workdir=/w",
            f"--log-dir={tmp_path}"]
    dry = launch("slurm.py", *argv, "--dry-run").stdout
    real = launch("slurm.py", *argv, check=False)  # sbatch is not here: submission fails
    script = (tmp_path / "m2omni.sbatch").read_text()
    assert script in dry and "JAX_LOCAL_DEVICE_IDS" not in script  # one process per GPU: SLURM_LOCALID
    assert real.returncode != 0 or "sbatch" in real.stdout


def test_missing_or_bad_flags_are_clear_errors():
    result = launch("tpu.py", "train", "--name=x", "--zone=z", "--accelerator-type=v5p-64",
                    "--workdir=gs://b/r", "--dry-run", check=False)
    assert result.returncode == 2 and "required: --config" in result.stderr
    result = launch("slurm.py", "--nodes=2", "--config=c.py", "--workdir=/w", "--dry-run", check=False)
    assert result.returncode == 2 and "required: --gpus-per-node" in result.stderr
    result = launch("tpu.py", "train", "--name=x", "--zone=z", "--accelerator-type=v5p-64", "--config=c",
                    "--workdir=/local/dir", "--dry-run", check=False)
    assert result.returncode == 2 and "gs://" in result.stderr
    result = launch("tpu.py", "train", "--name=x", "--zone=z", "--accelerator-type=v5p-64", "--config=c",
                    "--workdir=gs://b/r", "--steps=10", "--dry-run", check=False)
    assert result.returncode == 2 and "--steps=10" in result.stderr
    for script in ("tpu.py", "slurm.py"):
        assert "--dry-run" in launch(script, "--help").stdout
    assert "--node-count" in launch("tpu.py", "train", "--help").stdout


def test_tpu_deletes_the_queued_resource_when_training_fails(tmp_path):
    """A real (not dry) run against stand-in gcloud / git: it waits for ACTIVE, and a failed
    training command still ends with the delete."""
    log = tmp_path / "calls"
    for name, body in (("gcloud", 'case "$*" in *describe*) n=$(grep -c describe "$LOG"); '
                                  '[ "$n" -ge 2 ] && echo ACTIVE || echo PROVISIONING;; '
                                  '*m2omni-train*) exit 3;; esac'),
                       ("git", "true")):
        (tmp_path / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "$LOG"\n{body}\n')
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOG": str(log)}
    result = subprocess.run([sys.executable, str(REPO / "launch" / "tpu.py"), "train", "--name=t",
                             "--zone=z", "--accelerator-type=v5p-64", "--config=c.py", "--workdir=gs://b/r",
                             "--poll-seconds=0"], capture_output=True, text=True, env=env, timeout=60)
    calls = log.read_text().splitlines()
    assert result.returncode == 3, result.stderr
    assert sum("describe" in c for c in calls) == 2  # polled until ACTIVE
    assert "m2omni-train" in calls[-2] and "queued-resources delete t" in calls[-1]


def test_shell_launchers_parse_and_name_their_usage():
    for script in sorted((REPO / "launch").glob("*.sh")):
        parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{script.name}: {parsed.stderr}"
    for script in ("tiny_vqa.sh", "tiny_tts.sh"):  # the ROOT argument is required: usage, no run
        result = subprocess.run(["bash", str(REPO / "launch" / script)], capture_output=True, text=True,
                                cwd=REPO, timeout=60)
        assert result.returncode != 0 and "usage" in result.stderr, (script, result.stderr)
