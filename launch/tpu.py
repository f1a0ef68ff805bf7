#!/usr/bin/env python3
"""Runs m2omni-train on a Cloud TPU slice (or several: multislice) through a queued resource.

    python launch/tpu.py train --name=m2omni-9b --zone=us-east5-a --accelerator-type=v5p-64 \\
        --config=configs/m2omni_9b.py --workdir=gs://my-bucket/m2omni_9b \\
        [--spot | --reserved] [--node-count=2] [--data=gs://my-bucket/data --prepare-data] \\
        [--keep] [--dry-run] [--config.train.steps=10 ...]

`train`: requests the queued resource, waits until it is ACTIVE, installs this checkout on
every worker of every slice (a `git archive` of HEAD through a gs:// staging path: never
.venv or .git, and uncommitted changes are not included; or `--source=GIT_URL[@REF]`,
cloned on each worker), runs `m2omni-train --multihost` on all of them (their output streams
here), and deletes the queued resource at the end, on a failure and on Ctrl-C (not with
`--keep`). `--existing` uses a queued resource that is already there and keeps it.

`prepare`: runs `m2omni-prepare-data` once, on this machine, and copies the data sets to a
gs:// path; `train --data=THAT_PATH` copies them down to each worker instead of having every
host generate them (`train --prepare-data` does the `prepare` step on worker 0 first).

Every --config.* argument is passed to the command unchanged (shell-quoted on the way).
`--dry-run` prints the commands, one a line, and runs nothing. See docs/launch.md.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REMOTE_DIR = "m2omni_jax"  # the checkout on each worker, under the ssh user's home
REMOTE_PATH = 'export PATH="$HOME/.local/bin:$PATH"'  # pip's --user scripts (m2omni-train)
# Runtime (TPU VM image) per TPU generation, from the accelerator type's prefix.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
FINAL_STATES = {"FAILED", "SUSPENDED", "SUSPENDING"}  # a queued resource that will not become ACTIVE


def gcloud(*args: str, project: str | None = None) -> list[str]:
    return ["gcloud", *args] + ([f"--project={project}"] if project else [])


def default_runtime(accelerator_type: str) -> str:
    family = accelerator_type.rsplit("-", 1)[0]
    if family not in RUNTIME_VERSIONS:
        raise ValueError(f"no default --runtime-version for accelerator type {accelerator_type!r} "
                         f"(known: {sorted(RUNTIME_VERSIONS)}); pass --runtime-version")
    return RUNTIME_VERSIONS[family]


def create_command(args) -> list[str]:
    """`queued-resources create`: one slice (`--node-id`) or `--node-count` slices (multislice)."""
    nodes = ([f"--node-count={args.node_count}", f"--node-prefix={args.name}"] if args.node_count > 1
             else [f"--node-id={args.name}"])
    tier = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    return gcloud("compute", "tpus", "queued-resources", "create", args.name, f"--zone={args.zone}",
                  f"--accelerator-type={args.accelerator_type}",
                  f"--runtime-version={args.runtime_version}",
                  *nodes, *tier, project=args.project)


def describe_command(args) -> list[str]:
    return gcloud("compute", "tpus", "queued-resources", "describe", args.name, f"--zone={args.zone}",
                  "--format=value(state.state)", project=args.project)


def delete_command(args) -> list[str]:
    return gcloud("compute", "tpus", "queued-resources", "delete", args.name, f"--zone={args.zone}",
                  "--force", "--quiet", project=args.project)


def ssh_command(args, script: list[str], worker: str = "all") -> list[str]:
    """Runs `script` (shell commands, joined by &&) on `worker` of every slice: the queued
    resource's ssh (every node) for multislice, the TPU VM's for one slice."""
    command = f"--command={' && '.join(script)}"
    if args.node_count > 1:
        nodes = "all" if worker == "all" else "0"
        return gcloud("compute", "tpus", "queued-resources", "ssh", args.name, f"--zone={args.zone}",
                      f"--node={nodes}", f"--worker={worker}", command, project=args.project)
    return gcloud("compute", "tpus", "tpu-vm", "ssh", args.name, f"--zone={args.zone}",
                  f"--worker={worker}", command, project=args.project)


def staging_url(args) -> str:
    return args.staging or f"{args.workdir.rstrip('/')}_launch"


def archive_path(args) -> str:
    return f"/tmp/m2omni_jax-{args.name}.tar.gz"


def source_commands(args) -> list[list[str]]:
    """Local commands that put the source where the workers fetch it (the archive mode)."""
    if args.source != "archive":
        return []
    archive = archive_path(args)
    return [["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
            ["gcloud", "storage", "cp", archive, f"{staging_url(args)}/source.tar.gz"]]


def install_script(args) -> list[str]:
    """The worker's commands: a fresh checkout in ~/m2omni_jax, installed with the TPU extra."""
    if args.source == "archive":
        fetch = [f"rm -rf {REMOTE_DIR}", f"mkdir -p {REMOTE_DIR}",
                 f"gcloud storage cat {shlex.quote(staging_url(args) + '/source.tar.gz')}"
                 f" | tar -xz -C {REMOTE_DIR}"]
    else:
        url, ref = split_git_source(args.source)
        fetch = [f"rm -rf {REMOTE_DIR}",
                 f"git clone --depth=1 {'--branch=' + shlex.quote(ref) + ' ' if ref else ''}"
                 f"{shlex.quote(url)} {REMOTE_DIR}"]
    return fetch + [f"cd {REMOTE_DIR}", f"python3 -m pip install --user -q -e {shlex.quote(args.extra)}"]


def split_git_source(source: str) -> tuple[str, str]:
    """`https://host/org/repo.git@v1` -> (url, "v1"); an `@` before the host (user@) stays."""
    head, sep, ref = source.rpartition("@")
    if sep and "/" not in ref and ":" not in ref:
        return head, ref
    return source, ""


def command_line(name: str, args, data_dir: str | None) -> str:
    """`m2omni-train --multihost ...` (or another command) with every argument shell-quoted.
    m2omni-prepare-data runs on the CPU (JAX_PLATFORMS=cpu): one worker alone must not start
    the TPU runtime of a multi-host slice."""
    argv = ([name, "--multihost"] if name == "m2omni-train" else ["env", "JAX_PLATFORMS=cpu", name])
    argv += [f"--config={args.config}", f"--workdir={args.workdir}"]
    if data_dir:
        argv.append(f"--config.data.dir={data_dir}")
    return shlex.join(argv + dcn_overrides(name, args) + args.overrides)


def dcn_overrides(name: str, args) -> list[str]:
    """Multislice: the slices form the mesh's DCN data axis (`config.mesh.dcn.data`) unless the
    overrides lay the slices out themselves."""
    if name != "m2omni-train" or getattr(args, "node_count", 1) <= 1:
        return []
    if any(o.startswith("--config.mesh.dcn") for o in args.overrides):
        return []
    return [f"--config.mesh.dcn.data={args.node_count}"]


def prepare_script(args) -> list[str]:
    """On worker 0: write the data sets once and copy them to --data."""
    return [f"cd {REMOTE_DIR}", REMOTE_PATH, command_line("m2omni-prepare-data", args, args.remote_data_dir),
            shlex.join(["gcloud", "storage", "rsync", "--recursive", args.remote_data_dir, args.data])]


def train_script(args) -> list[str]:
    script = [f"cd {REMOTE_DIR}", REMOTE_PATH]
    if args.data:  # every worker copies the prepared data down; none generates it
        script.append(shlex.join(["mkdir", "-p", args.remote_data_dir]))
        script.append(shlex.join(["gcloud", "storage", "rsync", "--recursive", args.data, args.remote_data_dir]))
    return script + [command_line("m2omni-train", args, args.remote_data_dir if args.data else None)]


def train_plan(args) -> tuple[list[list[str]], list[list[str]]]:
    """(commands in order, cleanup commands); the describe command is polled until ACTIVE."""
    steps = [] if args.existing else [create_command(args), describe_command(args)]
    steps += source_commands(args) + [ssh_command(args, install_script(args))]
    if args.prepare_data:
        steps.append(ssh_command(args, prepare_script(args), worker="0"))
    steps.append(ssh_command(args, train_script(args)))
    cleanup = [] if (args.keep or args.existing) else [delete_command(args)]
    return steps, cleanup


def prepare_plan(args) -> list[list[str]]:
    """Locally: write the data sets under --local-dir once, then copy them to --data."""
    argv = ["env", "JAX_PLATFORMS=cpu", "m2omni-prepare-data", f"--config={args.config}", f"--workdir={args.workdir}",
            f"--config.data.dir={args.local_dir}"] + args.overrides
    return [argv, ["gcloud", "storage", "rsync", "--recursive", args.local_dir, args.data]]


def wait_until_active(args) -> None:
    """Polls the queued resource's state; returns when ACTIVE, raises on a final state."""
    last = None
    while True:
        state = subprocess.run(describe_command(args), check=True, capture_output=True,
                               text=True).stdout.strip()
        if state != last:
            print(f"queued resource {args.name}: {state}", flush=True)
            last = state
        if state == "ACTIVE":
            return
        if state in FINAL_STATES:
            raise RuntimeError(f"queued resource {args.name} is {state}; see "
                               f"`{shlex.join(describe_command(args)[:-1])}`")
        time.sleep(args.poll_seconds)


def run(cmd: list[str]) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def execute_train(args) -> int:
    steps, cleanup = train_plan(args)
    describe = describe_command(args)
    try:
        for cmd in steps:
            if cmd == describe:
                wait_until_active(args)
            else:
                run(cmd)
        return 0
    except subprocess.CalledProcessError as e:
        print(f"tpu.py: command failed (exit {e.returncode}): {shlex.join(e.cmd)}", file=sys.stderr)
        return e.returncode or 1
    except RuntimeError as e:
        print(f"tpu.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tpu.py: interrupted", file=sys.stderr)
        return 130
    finally:
        for cmd in cleanup:  # delete the queued resource whatever happened (not with --keep)
            print("+ " + shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=False)
        if cleanup == [] and not args.existing:
            print(f"tpu.py: kept queued resource {args.name}; delete it with: "
                  f"{shlex.join(delete_command(args))}", flush=True)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="launch/tpu.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each subcommand answers --help. Arguments --config.x=... after the flags are "
               "config overrides, passed to the m2omni command as given.")
    commands = top.add_subparsers(dest="command", required=True, metavar="{train,prepare}")

    def common(p):
        p.add_argument("--config", required=True, help="config file, e.g. configs/m2omni_9b.py[:variant]")
        p.add_argument("--workdir", required=True, help="the run's gs:// directory (checkpoints, metrics)")
        p.add_argument("--dry-run", action="store_true", help="print the commands, one a line; run nothing")

    train = commands.add_parser(
        "train", help="queued resource -> install -> m2omni-train on every worker -> delete",
        description="Request a queued resource, install on every worker, run m2omni-train "
                    "--multihost on all of them, delete the queued resource at the end.")
    train.add_argument("--name", required=True, help="queued resource ID (also the TPU node ID / "
                       "the node prefix with --node-count)")
    train.add_argument("--zone", required=True, help="e.g. us-east5-a")
    train.add_argument("--accelerator-type", default=None,
                       help="slice type, e.g. v5p-64, v5litepod-256 (required unless --existing)")
    train.add_argument("--runtime-version", default=None, help="TPU VM image; default by generation: "
                       + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()))
    train.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
    tier = train.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
    tier.add_argument("--reserved", action="store_true", help="the project's reservation")
    train.add_argument("--node-count", type=int, default=1,
                       help="slices (> 1: multislice, over DCN; nodes NAME-0, NAME-1, ...)")
    train.add_argument("--source", default="archive",
                       help="'archive' (default): git archive of HEAD via --staging; or GIT_URL[@REF] "
                            "to clone on each worker")
    train.add_argument("--staging", default=None,
                       help="gs:// directory for the source archive (default: WORKDIR_launch)")
    train.add_argument("--extra", default=".[tpu]", help="what pip installs in the checkout (default: .[tpu])")
    train.add_argument("--data", default=None,
                       help="gs:// path of data sets written once by `prepare` (or --prepare-data); "
                            "each worker copies them to --remote-data-dir, read as config.data.dir")
    train.add_argument("--prepare-data", action="store_true",
                       help="first run m2omni-prepare-data on worker 0 and copy the result to --data")
    train.add_argument("--remote-data-dir", default="/tmp/m2omni_data",
                       help="config.data.dir on the workers when --data is given")
    train.add_argument("--existing", action="store_true",
                       help="use the queued resource --name as it is: no create, no delete")
    train.add_argument("--keep", action="store_true", help="do not delete the queued resource at the end")
    train.add_argument("--poll-seconds", type=float, default=60, help="between state checks while queued")
    common(train)

    prepare = commands.add_parser(
        "prepare", help="m2omni-prepare-data once, here, copied to a gs:// path (train --data)",
        description="Run m2omni-prepare-data on this machine (with this checkout installed) and "
                    "copy the data sets to --data, for `train --data=...`.")
    prepare.add_argument("--data", required=True, help="gs:// destination of the data sets")
    prepare.add_argument("--local-dir", default="/tmp/m2omni_prepare",
                         help="config.data.dir while writing (default: /tmp/m2omni_prepare)")
    common(prepare)
    return top


def parse(argv: list[str]) -> argparse.Namespace:
    top = parser()
    args, rest = top.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        top.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are --config.x=...)")
    args.overrides = rest
    if not args.workdir.startswith("gs://"):
        top.error(f"--workdir must be a gs:// URL (every host writes it), got {args.workdir!r}")
    if args.command == "train":
        if args.node_count < 1:
            top.error("--node-count must be at least 1")
        if args.prepare_data and not args.data:
            top.error("--prepare-data needs --data=gs://... (where the data sets go)")
        if args.data and not args.data.startswith("gs://"):
            top.error(f"--data must be a gs:// URL, got {args.data!r}")
        if not args.existing:
            if not args.accelerator_type:
                top.error("the following arguments are required: --accelerator-type (or --existing)")
            try:
                args.runtime_version = args.runtime_version or default_runtime(args.accelerator_type)
            except ValueError as e:
                top.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.command == "prepare":
        plan, cleanup = prepare_plan(args), []
    else:
        plan, cleanup = train_plan(args)
    if args.dry_run:
        for cmd in plan + cleanup:
            print(shlex.join(cmd))
        return 0
    if args.command == "prepare":
        for cmd in plan:
            run(cmd)
        return 0
    return execute_train(args)


if __name__ == "__main__":
    sys.exit(main())
