#!/usr/bin/env bash
# Runs m2omni-train on every worker of a Cloud TPU VM (or queued resource) that already exists;
# kept for the commands in older notes. launch/tpu.py does the same and more: it requests the
# TPU as a queued resource, waits for it, and deletes it at the end (docs/launch.md).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE --config=configs/m2omni_9b.py --workdir=gs://bucket/run \
#       [--config.x=... ...] [--dry-run]
#
# = python3 launch/tpu.py train --existing --name=TPU_NAME --zone=ZONE ... (arguments kept as given)
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE --config=... --workdir=gs://... [--config.x=...] [--dry-run]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
exec python3 "$(dirname "$0")/tpu.py" train --existing --name="$tpu" --zone="$zone" "$@"
