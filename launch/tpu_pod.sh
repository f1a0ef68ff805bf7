#!/usr/bin/env bash
# Runs m2omni-train on every worker of a Cloud TPU VM pod slice.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE --config=configs/m2omni_9b.py --workdir=gs://bucket/run
#
# Copies this checkout to each worker, installs it with the TPU extra, and
# starts one process per host (jax.distributed.initialize finds the others).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE --config=... --workdir=... [--config.x=...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$repo" "$tpu":~/m2omni_jax
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/m2omni_jax && python3 -m pip install -q -e '.[tpu]' &&
  python3 -m m2omni_jax.main --multihost $*"
