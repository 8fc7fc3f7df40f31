#!/usr/bin/env bash
# The GPU checks, the open ones first, most wanted first:
#   train_step_bfloat16  benchmarks/train_step.py on the paper's model, FL and FL+MFL vmap (as
#                        configs/focalnet.py trains), in bfloat16 (3 more steps of each traced by
#                        jax.profiler: where time goes);
#   train_step_float32   FL and FL+MFL select (the project's default mode) in float32;
#   mfl_scaling          benchmarks/mfl_scaling.py on the paper's model with four components, 2, 6
#                        and 14 subsets, select mode (the default), against the plain step;
#   fold_time_bfloat16   benchmarks/fold_time.py --config configs/focalnet.py
#                        --config.model.dtype=bfloat16 --max-steps 2000 (projects the paper's
#                        fold: 200 epochs of ~1400 slices, batch 16, MFL vmap as the config
#                        trains; measured on an H200 on 2026-12-04 with MFL select, the config's
#                        mode then: benchmarks/results/fold_time_bfloat16_NVIDIA_H200_*.json);
#   inference            benchmarks/inference.py --models 5 (seconds per patient; not by default).
#
#   benchmarks/gpu_checks.sh [OUT [NAMES]]
# OUT: default $OUT, else benchmarks/results. NAMES: a comma-separated list of the names above,
# or `all`; default the first three. The time limits allow for XLA's compiles on a GPU: on an H200
# (2026-12-04, JAX 0.11.2) one step program of the paper's model compiled in about 65 s (the
# fold's first logged interval), and a new process on a new machine spent 80 to 95 s before XLA
# autotuned its first step's kernels (limits of 150 and 130 s held no two kinds). The default
# three's limits add up to 840 s: to keep each command under 10 minutes, run them as two
# commands, NAMES train_step_bfloat16,train_step_float32 (480 s) and then mfl_scaling (360 s). A
# run stopped by its limit leaves in the log what it measured (train_step: each kind's result as
# it is measured; mfl_scaling: each step's compile time). fold_time's 300 s hold the 2026-12-04
# run's 108 s of start-up and compilation, its 2,000 steps at 44 ms and the two validations its
# projection times (steps 1,000 and 2,000); that run's 200 s stopped it at step 1,492.
#
# Each benchmark writes one JSON line to OUT/<name>_<device>_<date>.json (also printed here) and
# its stderr to OUT/gpu_checks.log (appended); each has its own time limit (SIGTERM, then SIGKILL
# 30 s later), so one that fails or runs long leaves the others' results, and fold_time stopped
# by its limit still prints what it measured (`stopped_by_sigterm`). Before any, a preflight
# imports the project and its dependencies, prints their versions and, unless QUICK=1 or
# REQUIRE_GPU=0, stops (exit 2) where JAX sees no GPU. PYTHON: default .venv/bin/python where it
# exists, else python3. On a GPU node without a package index (JAX with CUDA installed, the
# project's other dependencies not), copy along the wheels benchmarks/gpu_wheels.sh downloads
# into .whl/ (WHEELS: another folder): they are installed into a temporary folder first. fold_time's
# compiled programs are cached in $JAX_COMPILATION_CACHE_DIR (default a temporary folder), so a
# rerun on the same machine skips compiling (the line records the cache); the other benchmarks
# run without the cache, so the compile times they report are compilations.
#   QUICK=1 benchmarks/gpu_checks.sh OUT all    tiny model and sizes: checks the script on a CPU
# Each line records the commit measured (`git describe --always --dirty`); on a copy of the tree
# without its git history pass it: BENCHMARK_COMMIT=$(git describe --always --dirty).
set -u
out=${1:-${OUT:-benchmarks/results}}
names=${2:-train_step_bfloat16,train_step_float32,mfl_scaling}
known=train_step_bfloat16,train_step_float32,mfl_scaling,fold_time_bfloat16,inference
[[ $names == all ]] && names=$known
for name in ${names//,/ }; do
  if [[ ",$known," != *",$name,"* ]]; then
    echo "unknown benchmark '$name': expected names of $known, or all" >&2
    exit 2
  fi
done
if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi
tmp=${TMPDIR:-/tmp}
mkdir -p "$out"
log=$out/gpu_checks.log
echo "== $(date -u +%FT%TZ) gpu_checks.sh $names" >>"$log"
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$tmp/focalnet_site" "$wheels"/*.whl >>"$log" 2>&1; then
    echo "installing $wheels/*.whl failed, see $log" >&2
    exit 2
  fi
  export PYTHONPATH=$tmp/focalnet_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cache=${JAX_COMPILATION_CACHE_DIR:-$tmp/focalnet_jax_cache}
unset JAX_COMPILATION_CACHE_DIR  # the compile times train_step and mfl_scaling report are real
require_gpu=${REQUIRE_GPU:-1}
[[ ${QUICK:-0} == 1 ]] && require_gpu=0
# The benchmarks asked for are imported too: what they import beyond the list is named now, not
# after another benchmark's minutes (fold_time and inference need tqdm, inference matplotlib).
preflight='
import importlib, sys
import jax
names = ("flax", "optax", "orbax.checkpoint", "ml_collections", "SimpleITK", "pydicom",
         "highdicom", "numpy", "scipy", "tensorboard", "tqdm", "focalnet_jax.training")
versions = {n: getattr(importlib.import_module(n), "__version__", "") for n in names}
sys.path.insert(0, "benchmarks")
for benchmark in sys.argv[-1].split(","):
    importlib.import_module(benchmark)
device = jax.devices()[0]
print("jax", jax.__version__, device.platform, device.device_kind, versions)
if sys.argv[-2] == "1" and device.platform != "gpu":
    sys.exit(f"JAX sees no GPU (platform {device.platform}): a CUDA build of jax is needed")
'
modules=$(echo "$names" | sed -E 's/train_step_[a-z0-9]+/train_step/g; s/fold_time_bfloat16/fold_time/')
if ! "$python" -c "$preflight" "$require_gpu" "$modules" >>"$log" 2>&1; then
  echo "preflight failed: $(tail -n 1 "$log")" >&2
  exit 2
fi
device=$("$python" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
day=$(date +%F)
if [[ ${QUICK:-0} == 1 ]]; then
  tiny=(--config.model.depth=18 --config.model.width=0.125 --config.model.output_stride=16
        --config.train.batch_size=4)
  size=(--size 32) steps=(--steps 1)
  fold=(--max-steps 4 --cases 6 --out "$tmp/fold_time_data_quick" --config.train.log_every=1)
  limits=(300 300 600 600 300) rounds=(--rounds 1) repeats=(--repeats 1)
else
  tiny=() size=() steps=(--steps 20)
  fold=(--max-steps 2000 --cases 24 --out "$tmp/fold_time_data")
  limits=(260 220 360 300 90) rounds=() repeats=()
fi
status=0
run() {  # name limit_s script args...
  local name=$1 limit=$2
  shift 2
  [[ ",$names," == *",$name,"* ]] || return 0
  local file="$out/${name}_${device}_${day}.json" start=$SECONDS rc cached=()
  echo "== $name (limit ${limit} s): $*" >>"$log"
  # fold_time records the cache, and a rerun skips compiling
  [[ $name == fold_time_* ]] && cached=("JAX_COMPILATION_CACHE_DIR=$cache")
  env "${cached[@]}" timeout -k 30 "$limit" "$python" "$@" >"$file.tmp" 2>>"$log"
  rc=$?
  if "$python" -c 'import json, sys; json.loads(open(sys.argv[-1]).read())' "$file.tmp" 2>/dev/null
  then
    mv "$file.tmp" "$file" && echo "$name: $file ($((SECONDS - start)) s, rc $rc)" && cat "$file"
  else
    echo "$name: no result (rc $rc after $((SECONDS - start)) s), see $log" >&2
    rm -f "$file.tmp"
    status=1
  fi
  [[ $rc == 0 ]] || status=1
}
run train_step_bfloat16 "${limits[0]}" benchmarks/train_step.py --config configs/focalnet.py \
  --kinds fl,fl_mfl_vmap --config.model.dtype=bfloat16 --profile-steps 3 "${steps[@]}" \
  "${size[@]}" "${tiny[@]}"
run train_step_float32 "${limits[1]}" benchmarks/train_step.py --config configs/focalnet.py \
  --kinds fl,fl_mfl_select --config.model.dtype=float32 "${steps[@]}" "${size[@]}" "${tiny[@]}"
run mfl_scaling "${limits[2]}" benchmarks/mfl_scaling.py --config configs/focalnet.py \
  --components t2w,adc,hbv,dce --subset-counts 2,6,14 --modes select "${rounds[@]}" \
  "${size[@]}" "${tiny[@]}"
run fold_time_bfloat16 "${limits[3]}" benchmarks/fold_time.py --config configs/focalnet.py \
  --config.model.dtype=bfloat16 "${fold[@]}" "${tiny[@]}"
run inference "${limits[4]}" benchmarks/inference.py --config configs/focalnet.py --models 5 \
  "${repeats[@]}" "${tiny[@]}"
exit $status
