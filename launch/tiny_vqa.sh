#!/usr/bin/env bash
# The held-out VQA run (configs/experiments/shapes_world_vqa.py) on a CPU: tower pre-training, then the
# omni model from that tower, then held-out evaluation; prints each part's wall time.
#
#   bash launch/tiny_vqa.sh /tmp/m2omni_vqa [--config=CONFIG.py] [extra --config.* overrides for every part]
#
# --config (default configs/experiments/shapes_world_vqa.py) runs another VQA config, e.g.
# configs/experiments/shapes_world_vqa_paper.py (the paper's architecture).
# The data sets of the config (and overrides) are written first (once; not part of the timed run).
set -euo pipefail
root=${1:?usage: $0 ROOT [--config=CONFIG.py] [--config.x=... ...]}
shift
config=configs/experiments/shapes_world_vqa.py
if [[ "${1:-}" == --config=* ]]; then
  config=${1#--config=}
  shift
fi
mkdir -p "$root"
echo "config: $config"
seconds() { date +%s; }
echo "=== data (written once, cached) ==="
m2omni-prepare-data --config="$config" --workdir="$root/main" "$@"
start=$(seconds)
echo "=== tower pre-training ==="
m2omni-pretrain-tower --config="$config" --workdir="$root/tower" "$@"
tower=$(seconds)
echo "=== omni model ==="
m2omni-train --config="$config" --workdir="$root/main" "$@"
main=$(seconds)
echo "=== held-out evaluation ==="
m2omni-eval --config="$config" --workdir="$root/main" "$@"
echo "wall time: tower $((tower - start)) s, omni $((main - tower)) s," \
     "training total $((main - start)) s; eval $(( $(seconds) - main )) s"
