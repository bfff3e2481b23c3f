#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels of this package's dependencies that the lent GPU
# machine's image lacks (Python 3.12, x86-64; it has jax, flax, optax, orbax, chex, torch, numpy,
# scipy, pillow, ...). 4.5 MB. Then, on the device, one command per suite part (see docs/speed.md):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
#   OUT=$OUT bash benchmarks/gpu_suite.sh kernel
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  ml-collections==1.1.0 grain==0.2.18 tensorboardX==2.6.5 array-record==0.8.6 portpicker==1.6.0
ls -la .whl
