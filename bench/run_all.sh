#!/usr/bin/env bash
# Every benchmark in order, each writing its table(s) to bench/results/ (see bench/README.md).
#   bench/run_all.sh            full runs (~35-45 min on 2 quiet cores; each step about 10 min at most)
#   bench/run_all.sh --quick    small settings, to check the scripts (~5 min)
# Run it on a quiet machine: every table records the 1-minute load average when each row started.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
quick=("$@")

python bench/planning.py "${quick[@]}" --profile
python bench/throughput.py "${quick[@]}"
python bench/network.py "${quick[@]}" --parts forward
python bench/network.py "${quick[@]}" --parts train
