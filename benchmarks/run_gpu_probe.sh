#!/usr/bin/env bash
# Run benchmarks/gpu_probe.py on a GPU machine that has torch (and transformers, accelerate, ...) but not
# diffusers, datasets, trl or peft's tested version, and that cannot download anything.
#
# 1. Here, in the repository root (needs pip and the PyPI registry):
#        bash benchmarks/run_gpu_probe.sh download
#    downloads the missing packages' wheels (--no-deps, the versions of this checkout's .venv) into .whl/
#    (ignored by git; about 9 MiB, under the device tool's 64 MiB) and writes .whl/COMMIT.
# 2. On the device machine, with the device tool (one call; the probe itself keeps within 8 minutes):
#        run(command="bash benchmarks/run_gpu_probe.sh device", carry=[".whl"], timeout_s=600)
#    installs the wheels into /tmp/egrpo-site, reports unmet requirements, runs the probe, and puts
#    probe.log, the results JSON and the updated benchmarks/RESULTS.md under $OUT.
# 3. Here again, with the folder the tool returned the files in (its files_at):
#        bash benchmarks/run_gpu_probe.sh collect FILES_AT
#    copies the JSON into benchmarks/results/ and RESULTS.md over benchmarks/RESULTS.md; commit both.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
# What the device image lacks (diffusers, datasets, trl and their own missing dependencies), plus peft so
# that the probe runs the version the tests run. torch, transformers, accelerate, huggingface_hub,
# safetensors, tokenizers, sentencepiece, numpy, pyarrow, pandas, ... are in the image (see
# .library/device/KINDS.md); `device` checks the project's requirements before running anything.
PACKAGES=(diffusers datasets trl peft dill multiprocess importlib-metadata)
PYTHON_VERSIONS=(3.11 3.12 3.13)  # the device has 3.12; multiprocess has one wheel per version (diffusers 0.42 needs >= 3.11)

download() {
    local python=${PYTHON:-.venv/bin/python}
    local specs=() name version
    for name in "${PACKAGES[@]}"; do
        version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
        specs+=("$name==$version")
    done
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    for version in "${PYTHON_VERSIONS[@]}"; do
        "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$WHEELS" "${specs[@]}"
    done
    printf '%s\n' "${PACKAGES[@]}" > "$WHEELS/PACKAGES"
    local commit
    commit=$(git rev-parse --short=12 HEAD)
    git diff --quiet HEAD -- . ':!benchmarks/RESULTS.md' || commit="$commit+dirty"
    echo "$commit" > "$WHEELS/COMMIT"
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

device() {
    local python=${PYTHON:-python3} site=/tmp/egrpo-site out=${OUT:-/tmp/egrpo-probe-out}
    [ -f "$WHEELS/PACKAGES" ] || { echo "no $WHEELS/PACKAGES: run 'bash benchmarks/run_gpu_probe.sh download' here first and carry .whl" >&2; exit 2; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        --find-links "$WHEELS" $(cat "$WHEELS/PACKAGES")
    export PYTHONPATH="$site:$PWD" EGRPO_COMMIT="$(cat "$WHEELS/COMMIT")" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    mkdir -p "$out"
    # Report unmet requirements but run anyway: a device call is too dear to waste on, say, an old pillow.
    "$python" benchmarks/gpu_probe.py --check_requirements || echo "some requirements are unmet; running the probe anyway"
    local status=0
    timeout "${PROBE_TIMEOUT:-560}" "$python" benchmarks/gpu_probe.py "$@" 2>&1 | tee "$out/probe.log" || status=$?
    local newest
    newest=$(ls -t benchmarks/results/*.json 2>/dev/null | head -1) || true
    [ -n "$newest" ] && cp "$newest" "$out/"
    cp benchmarks/RESULTS.md "$out/" 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
    return $status
}

collect() {
    local from=${1:?usage: run_gpu_probe.sh collect FILES_AT}
    mkdir -p benchmarks/results
    cp "$from"/*.json benchmarks/results/
    cp "$from"/RESULTS.md benchmarks/RESULTS.md
    git status --short benchmarks/results benchmarks/RESULTS.md
}

case "${1:-}" in
    download) download ;;
    device) shift; device "$@" ;;
    collect) shift; collect "$@" ;;
    *) echo "usage: bash benchmarks/run_gpu_probe.sh download | device [probe options] | collect FILES_AT" >&2; exit 2 ;;
esac
