#!/usr/bin/env bash
# The whole M2-omni recipe on the tiny model, on a CPU: PT1 -> PT2 -> calibration -> PT3
# (step balance) -> IT1 -> IT2 -> IT3 (dynamic balance) -> alignment (LoRA + DPO).
#
#   bash launch/tiny_pipeline.sh /tmp/m2omni_stages [extra --config.* overrides for every stage]
#
# Each stage starts from the previous stage's parameters (config.init_from = ../<previous>).
set -euo pipefail
root=${1:?usage: $0 ROOT [--config.x=... ...]}
shift
mkdir -p "$root"
run() { echo "=== $1 ==="; }
for stage in pt1 pt2; do
  run "$stage"; m2omni-train --config="configs/stages/$stage.py:tiny" --workdir="$root/$stage" "$@"
done
run calibration
# Each modality alone in rounds of --steps until its loss plateaus (or --max_steps); L* = the tail's mean.
m2omni-calibrate --config=configs/stages/pt3.py:tiny --workdir="$root/calib" --steps=20 --max_steps=200 --tail=10 "$@"
run pt3
m2omni-train --config=configs/stages/pt3.py:tiny --workdir="$root/pt3" \
  --config.balance.step.calibration_file="$root/calib/converged_losses.json" "$@"
for stage in it1 it2 it3; do
  run "$stage"; m2omni-train --config="configs/stages/$stage.py:tiny" --workdir="$root/$stage" "$@"
done
run alignment
m2omni-align --config=configs/stages/alignment.py:tiny --workdir="$root/alignment" "$@"
echo "done: every stage's metrics are in $root/<stage>/metrics.jsonl"
