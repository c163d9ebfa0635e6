#!/usr/bin/env bash
# Wheels for a GPU machine without internet whose python3 (3.12) already has CUDA torch,
# transformers, peft, safetensors, pyarrow, pandas and matplotlib (this workplace's device image),
# but not Ray, DeepSpeed or datasets. Run here, from the repository root; carry .whl/ to the GPU
# machine and run `bash benchmarks/gpu_check.sh --wheels .whl` there. Prints the total size (the
# device tool carries at most 64 MiB per call).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl "$@"; }
dl "ray==2.60.0"
# DeepSpeed publishes an sdist only: build its pure-python wheel here (ops are JIT-built on use).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
dl "datasets==5.2.0" "hjson" "py-cpuinfo" "ninja" "dill" "multiprocess" "xxhash" "aiohttp_cors" \
   "opencensus" "opencensus-context" "colorful" "py-spy" "smart_open" "virtualenv" "distlib" "platformdirs" "python-discovery"
# Ray's wheel (79 MB) is larger than one call may carry (64 MiB): split it across .whl/ and .whl2/.
# Call 1 carries .whl2 and copies it to /tmp/wheels (a warm machine keeps /tmp between calls);
# call 2 carries .whl and runs:  cp .whl/* /tmp/wheels/ && cat /tmp/wheels/ray.part.* > \
#   /tmp/wheels/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl && rm /tmp/wheels/ray.part.* && \
#   bash benchmarks/gpu_check.sh --wheels /tmp/wheels
mkdir -p .whl2
grep -qx '/.whl2/' .git/info/exclude || echo '/.whl2/' >> .git/info/exclude
RAY=$(ls .whl/ray-*.whl)
split -b 40M "$RAY" .whl/ray.part.
mv .whl/ray.part.ab .whl2/ && rm "$RAY"
du -sh .whl .whl2
