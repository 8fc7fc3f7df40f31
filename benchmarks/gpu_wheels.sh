#!/usr/bin/env bash
# Downloads into DIR (default .whl, git-ignored) the wheels of the project's dependencies that a
# GPU node's Python usually lacks, for CPython 3.12 on x86-64 Linux: for a node without a package
# index where JAX with CUDA, flax, optax, orbax-checkpoint, numpy, scipy and tensorboard are
# installed. benchmarks/gpu_checks.sh installs DIR's wheels (.whl) into a temporary folder before
# it runs. About 57 MB (SimpleITK 53 MB).
#
#   benchmarks/gpu_wheels.sh [DIR]       (PYTHON: a Python with pip; default python3)
set -eu
dir=${1:-.whl}
python=${PYTHON:-python3}
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# The versions the test suite runs with. Their other dependencies (absl-py, PyYAML, pillow,
# numpy, typing-extensions, packaging) are not downloaded, nor matplotlib (only the `inference`
# check, not run by default, needs it): gpu_checks.sh's preflight first imports the checks asked
# for, and so all they use, and names what is missing.
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" \
  ml_collections==1.1.0 simpleitk==2.5.7 pydicom==3.0.2 highdicom==0.28.2 pyjpegls==1.5.1 \
  tqdm==4.70.1
ls -l "$dir"
