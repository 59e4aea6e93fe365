#!/usr/bin/env bash
# The one check to run on a GPU machine (bench/README.md, "GPU check"): everything into OUT.
#
#   bench/gpu_check.sh OUT          # on the GPU machine: CUDA, paper scale, about 6-8 minutes
#   bench/gpu_check.sh --cpu OUT    # the rehearsal here: the same steps on the CPU at tiny sizes
#
# Steps: the machine (nvidia-smi, torch / CUDA / cuDNN versions, CPU), the wheels of .gpu-wheels/
# unpacked into a scratch folder put first on PYTHONPATH (GPU mode; nothing of the machine's own
# Python is changed, torch is the machine's), the `gpu` tests (tests/test_gpu.py), bench/network.py
# CUDA rows of the paper-width network at 64x192x192 (forward fp32 and bf16 per pair, training step
# at batch 2, peak torch.cuda.max_memory_allocated), and bench/throughput.py on a 41-subject cohort
# at paper scale (prepared in the background while the tests run). Each step has a time limit and
# the script goes on after a failed one. OUT gets at most four files, rewritten after every step
# so that a run killed at its limit still leaves its figures:
#   log.txt          every step's output, with its exit status and seconds
#   summary.md       the figures against the issue's targets, as Markdown for bench/README.md
#   figures.tsv      the same, one row per figure
#   results.tar.gz   the benchmark tables (TSV + JSON), the tests' JSON lines and JUnit XML
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [[ ${1:-} == --cpu ]]; then
    mode=cpu
    shift
fi
out=${1:?usage: bench/gpu_check.sh [--cpu] OUT_FOLDER}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/lungreg-gpu-check.XXXXXX")
results=$work/results
mkdir -p "$results"
log=$out/log.txt
: >"$log"
began=$(date +%s)
export LUNGREG_BENCH_RESULTS=$results LUNGREG_GPU_REPORT=$results/gpu_tests.jsonl
export CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1

say() { echo "[$(($(date +%s) - began)) s] $*" | tee -a "$log"; }

step() { # step NAME LIMIT_S COMMAND...: run with a time limit, log everything, record the status
    local name=$1 limit=$2 started rc
    shift 2
    say "=== $name (limit $limit s): $*"
    started=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - started))" >>"$results/steps.tsv"
    say "=== $name: exit status $rc after $(($(date +%s) - started)) s"
    collect
}

collect() { # the summary and the bundle, after every step
    "$python" bench/gpu_summary.py --mode "$mode" "$results" "$out" >>"$log" 2>&1 || say "summary failed"
    tar -czf "$out/results.tar.gz.tmp" -C "$results" . && mv "$out/results.tar.gz.tmp" "$out/results.tar.gz"
}

if [[ $mode == gpu ]]; then
    python=${PYTHON:-$(command -v python3)} # the machine's Python 3.12 with its CUDA torch
    site=$work/site
    # the wheels first: the summary and every later step import from them
    say "=== wheels: $python bench/gpu_wheels.py install .gpu-wheels $site"
    "$python" bench/gpu_wheels.py install .gpu-wheels "$site" >>"$log" 2>&1 || say "wheels: install FAILED"
    export PYTHONPATH=$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    shape=64x192x192
    cohort=(--configfile config/paper.yaml --synthesize-at-grid --subjects 41 --variants paper)
    runs=(--max-pairs 16 --refined-pairs 8 --max-seconds 45)
    network=(--variants paper --shapes "$shape" --warmup 1 --repeats 5 --budget 3 --max-call-s 60)
    limits=(220 110 130 200) # tests, network, throughput, the cohort's preparation: 8 minutes in all
else
    python=$(if [[ -x .venv/bin/python ]]; then echo "$PWD/.venv/bin/python"; else command -v python3; fi)
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} LUNGREG_GPU_REHEARSAL=1 OMP_NUM_THREADS=1
    cohort=(--subjects 3 --variants w0.25)
    runs=(--max-pairs 4 --refined-pairs 2 --max-seconds 20)
    shape=16x32x32
    network=(--variants w0.25 --shapes "$shape" --warmup 1 --repeats 1 --budget 5 --max-call-s 60)
    limits=(2400 300 600 900)
fi
jobs=$(($(nproc) / 2 > 0 ? $(nproc) / 2 : 1))

step environment 60 bash -c '
    date -u; uname -a; lscpu | grep -E "Model name|^CPU\(s\)"; grep -o -w -m1 avx512f /proc/cpuinfo || echo "no avx512f"
    free -g | head -2; df -h . | tail -1; nvidia-smi || echo "nvidia-smi: not available"
    "$0" -c "import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")"
    "$0" -c "import numpy, pandas, scipy, sklearn, matplotlib, SimpleITK, nibabel, snakemake, yaml, jsonschema, pytest; print({m.__name__: getattr(m, \"__version__\", \"?\") for m in (numpy, pandas, scipy, sklearn, matplotlib, SimpleITK, nibabel, snakemake, yaml, jsonschema, pytest)})"
    "$0" -c "import lungreg.registration.chunk, lungreg.classify.crossval; print(\"lungreg imports\")"
' "$python"
if [[ $mode == cpu && -d .gpu-wheels ]]; then # the wheels cannot be imported here (cp312): check and unpack them
    step wheels 300 bash -c '"$0" bench/gpu_wheels.py check .gpu-wheels && "$0" bench/gpu_wheels.py install .gpu-wheels "$1/site-rehearsal"' "$python" "$work"
fi

# The cohort of the throughput step, prepared on half the cores while the tests run.
say "=== cohort (background): bench/throughput.py ${cohort[*]} --prepare-only"
timeout -k 5 "${limits[3]}" "$python" bench/throughput.py "${cohort[@]}" --jobs "$jobs" --workdir "$work/cohort" \
    --prepare-only >"$work/cohort.log" 2>&1 &
preparing=$!

step gpu_tests "${limits[0]}" "$python" -m pytest -m gpu -rs -p no:cacheprovider tests/test_gpu.py \
    --junitxml="$results/junit.xml" -o junit_family=xunit2

step network "${limits[1]}" "$python" bench/network.py "${network[@]}" --parts forward,train --device auto \
    --out gpu_network

say "=== cohort: waiting for the background preparation"
wait "$preparing"
printf 'cohort\t%s\t-\n' "$?" >>"$results/steps.tsv"
cat "$work/cohort.log" >>"$log"

step throughput "${limits[2]}" "$python" bench/throughput.py "${cohort[@]}" "${runs[@]}" --jobs "$jobs" \
    --workdir "$work/cohort" --device auto --baselines "" --refined --stream-all --no-save-all --out gpu_throughput

say "=== done in $(($(date +%s) - began)) s"
collect
rm -rf "$work"
