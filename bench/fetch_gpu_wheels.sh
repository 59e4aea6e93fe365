#!/usr/bin/env bash
# The wheels the GPU machine lacks (bench/gpu_wheels.py says which and why), as cp312 manylinux
# wheels in a git-ignored folder that travels with the working tree to the device:
#   bench/fetch_gpu_wheels.sh [FOLDER]      # default .gpu-wheels; needs PyPI and this repo's venv
# Large wheels are recompressed (LZMA) so that folder and tree stay under 64 MiB; the last step
# checks that every wheel is there, installable on CPython 3.12, and the total size.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
folder=${1:-.gpu-wheels}
mkdir -p "$folder"
python bench/gpu_wheels.py list >"$folder/requirements.txt"
python bench/gpu_wheels.py missing "$folder" >"$folder/missing.txt" # a rerun fetches only these
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
while read -r requirement; do
    if ! pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --dest "$folder" "$requirement" 2>/dev/null; then
        # No wheel on the index (an sdist only): build it here, and accept it only when pure Python.
        echo "no cp312 wheel of $requirement: building it" >&2
        built=$(mktemp -d)
        pip wheel --quiet --no-deps --no-binary "${requirement%%==*}" --wheel-dir "$built" "$requirement"
        if ! compgen -G "$built/*-py3-none-any.whl" >/dev/null && ! compgen -G "$built/*-py2.py3-none-any.whl" >/dev/null; then
            echo "$requirement: the wheel built from its sdist is not pure Python" >&2
            exit 1
        fi
        mv "$built"/*.whl "$folder/"
        rmdir "$built"
    fi
done <"$folder/missing.txt"
rm -f "$folder/missing.txt"
python bench/gpu_wheels.py repack "$folder"
python bench/gpu_wheels.py check "$folder"
