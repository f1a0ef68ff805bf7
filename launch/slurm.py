#!/usr/bin/env python3
"""Writes an sbatch script that runs m2omni-train on a SLURM GPU cluster, and submits it.

    python launch/slurm.py --nodes=2 --gpus-per-node=8 --partition=gpu --time=48:00:00 \\
        --venv=/shared/m2omni_jax/.venv --config=configs/m2omni_9b.py \\
        --workdir=/shared/runs/m2omni_9b [--prepare-data] [--dry-run] [--config.train.steps=10 ...]

The job runs `srun m2omni-train --multihost ...` in this checkout (which must sit on a file
system every node sees), one process per node driving all its GPUs (or, with
--tasks-per-node=GPUS, one per GPU). `jax.distributed.initialize()` reads the process count
and this process's id from SLURM (SLURM_NTASKS, SLURM_PROCID: its SLURM auto-detection); the
script sets the coordinator, the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`),
in JAX_COORDINATOR_ADDRESS, and with one process per node JAX_LOCAL_DEVICE_IDS, since the
auto-detection alone would give each process one GPU (its SLURM_LOCALID).

Every --config.* argument is passed to m2omni-train unchanged (shell-quoted in the script).
`--dry-run` prints the commands (the script written by a quoted here-document, then sbatch),
runs nothing; its output is itself a shell script. See docs/launch.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEREDOC_END = "M2OMNI_SBATCH_EOF"


def srun_prefix(args, *, single: bool = False) -> list[str]:
    argv = ["srun"] + (["--nodes=1", "--ntasks=1"] if single else [])
    if args.container_image:  # pyxis / enroot
        argv += [f"--container-image={args.container_image}", f"--container-workdir={args.chdir}",
                 f"--container-mounts={args.container_mounts or args.chdir + ':' + args.chdir}"]
    return argv


def m2omni_argv(name: str, args) -> list[str]:
    argv = [name] + (["--multihost"] if name == "m2omni-train" else [])
    return argv + [f"--config={args.config}", f"--workdir={args.workdir}"] + args.overrides


def sbatch_script(args) -> str:
    """The job script: #SBATCH header, environment, the coordinator, srun."""
    tasks = args.tasks_per_node
    header = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
              f"--gres=gpu:{args.gpus_per_node}", f"--time={args.time}",
              f"--output={os.path.join(args.log_dir, '%x-%j.out')}", "--exclusive"]
    header += [f"--partition={args.partition}"] if args.partition else []
    header += [f"--account={args.account}"] if args.account else []
    header += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    header += args.sbatch_arg
    lines = ["#!/bin/bash"] + [f"#SBATCH {h}" for h in header] + [
        "# Written by launch/slurm.py: change its flags and write it again rather than edit it.",
        "set -euo pipefail",
        f"cd {shlex.quote(args.chdir)}",
    ]
    lines += args.setup
    if args.venv:
        lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
    lines += [
        "# jax.distributed.initialize(): process count and id from SLURM_NTASKS / SLURM_PROCID (its",
        "# SLURM auto-detection); the coordinator is the job's first node.",
        'coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export JAX_COORDINATOR_ADDRESS=\"$coordinator:{args.port}\"" if args.port else
        'export JAX_COORDINATOR_ADDRESS="$coordinator:$((SLURM_JOB_ID % 4096 + 61440))"',
    ]
    if tasks == 1:  # one process drives all the node's GPUs (the auto-detection would give it one)
        lines.append(f"export JAX_LOCAL_DEVICE_IDS={','.join(str(i) for i in range(args.gpus_per_node))}")
    lines.append('echo "coordinator $JAX_COORDINATOR_ADDRESS, $SLURM_NTASKS processes on $SLURM_JOB_NODELIST"')
    if args.prepare_data:  # once, before training: no process generates data sets itself
        lines.append(shlex.join(srun_prefix(args, single=True) + m2omni_argv("m2omni-prepare-data", args)))
    lines.append(shlex.join(srun_prefix(args) + m2omni_argv("m2omni-train", args)))
    return "\n".join(lines) + "\n"


def script_path(args) -> str:
    return args.script or os.path.join(args.log_dir, f"{args.job_name}.sbatch")


def plan(args) -> tuple[str, list[list[str]]]:
    """(the script's text, the commands after writing it)."""
    return sbatch_script(args), [["sbatch", script_path(args)]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/slurm.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments --config.x=... after the flags are config overrides, passed to "
               "m2omni-train as given. See docs/launch.md.")
    p.add_argument("--config", required=True, help="config file, relative to --chdir, e.g. configs/m2omni_9b.py")
    p.add_argument("--workdir", required=True, help="the run's directory on a shared file system, or gs://")
    p.add_argument("--nodes", type=int, required=True, help="nodes (hosts)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (--gres=gpu:N)")
    p.add_argument("--tasks-per-node", type=int, default=1,
                   help="processes per node: 1 (default, all the node's GPUs each) or --gpus-per-node")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per process")
    p.add_argument("--job-name", default="m2omni", help="job name (default m2omni)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="another #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--chdir", default=str(REPO), help="the checkout on the shared file system (default: this one)")
    env = p.add_mutually_exclusive_group()
    env.add_argument("--venv", default=None, help="virtual environment to activate (with .[cuda] installed)")
    env.add_argument("--container-image", default=None, help="container image for srun (pyxis/enroot)")
    p.add_argument("--container-mounts", default=None, help="pyxis mounts (default: --chdir on itself)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before srun, e.g. 'module load cuda/12.4' (repeatable)")
    p.add_argument("--port", type=int, default=None,
                   help="coordinator port (default: 61440 + SLURM_JOB_ID %% 4096, as JAX's own choice)")
    p.add_argument("--prepare-data", action="store_true",
                   help="run m2omni-prepare-data once (one task) before training")
    p.add_argument("--log-dir", default="slurm_logs", help="job output and the script (default: slurm_logs)")
    p.add_argument("--script", default=None, help="where to write the sbatch script (default: LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the commands; write and submit nothing")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    p = parser()
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are --config.x=...)")
    args.overrides = rest
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be at least 1")
    if args.tasks_per_node not in (1, args.gpus_per_node):
        p.error(f"--tasks-per-node must be 1 or --gpus-per-node ({args.gpus_per_node}), got {args.tasks_per_node}")
    if "://" not in args.workdir:
        args.workdir = os.path.abspath(args.workdir)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    script, commands = plan(args)
    path = script_path(args)
    if args.dry_run:
        print(shlex.join(["mkdir", "-p", *dict.fromkeys([args.log_dir, os.path.dirname(path) or "."])]))
        print(f"cat > {shlex.quote(path)} <<'{HEREDOC_END}'\n{script}{HEREDOC_END}")
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    os.makedirs(args.log_dir, exist_ok=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Path(path).write_text(script)
    print(f"wrote {path}", flush=True)
    for cmd in commands:
        print("+ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
