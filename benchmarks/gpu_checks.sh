#!/usr/bin/env bash
# The GPU checks still open, in one call that fits a 10-minute limit, most wanted first:
#   1. benchmarks/fold_time.py --config configs/focalnet.py --config.model.dtype=bfloat16
#      --max-steps 2000 (projects the paper's fold: 200 epochs of ~1400 slices, batch 16);
#   2. benchmarks/train_step.py on the paper's model (configs/focalnet.py), FL and FL+MFL select,
#      in bfloat16 (with 3 steps of each traced by jax.profiler: where the step's time goes) and
#      in float32;
#   3. benchmarks/mfl_scaling.py on the paper's model with four components, 2 and 14 subsets,
#      select mode (the default), against the plain step of the same run;
#   4. benchmarks/inference.py --config configs/focalnet.py --models 5 (seconds per patient).
# Each writes one JSON line to OUT/<name>_<device>_<date>.json, its stderr goes to
# OUT/gpu_checks.log (six files in all); each has its own time limit, so one that fails or runs
# long leaves the others' results. The repository root is put first on PYTHONPATH.
#
#   benchmarks/gpu_checks.sh [OUT]          (OUT default: benchmarks/results; PYTHON default: python)
#   QUICK=1 benchmarks/gpu_checks.sh OUT    tiny model and sizes: checks the script on a CPU
# Each line records the commit measured (`git describe`); on a copy of the tree without its git
# history pass it: BENCHMARK_COMMIT=$(git rev-parse HEAD) benchmarks/gpu_checks.sh (else null).
set -u
out=${1:-benchmarks/results}
python=${PYTHON:-python}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log=$out/gpu_checks.log
: >"$log"
device=$("$python" -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
day=$(date +%F)
if [[ ${QUICK:-0} == 1 ]]; then
  tiny=(--config.model.depth=18 --config.model.width=0.125 --config.model.output_stride=16
        --config.train.batch_size=4)
  size=(--size 32) steps=(--steps 1)
  fold=(--max-steps 4 --cases 6 --out "${TMPDIR:-/tmp}/fold_time_data_quick"
        --config.train.log_every=1)
  limits=(600 300 300 600 300) rounds=(--rounds 1) repeats=(--repeats 1)
else
  tiny=() size=() steps=(--steps 20)
  fold=(--max-steps 2000 --cases 24 --out "${TMPDIR:-/tmp}/fold_time_data")
  limits=(170 110 100 130 70) rounds=() repeats=()
fi
status=0
run() {  # name limit_s script args...
  local name=$1 limit=$2
  shift 2
  local file="$out/${name}_${device}_${day}.json"
  echo "== $name: $*" >>"$log"
  if timeout "$limit" "$python" "$@" >"$file.tmp" 2>>"$log"; then
    mv "$file.tmp" "$file" && echo "$name: $file"
  else
    echo "$name: failed or over ${limit}s (rc $?), see $log" >&2
    rm -f "$file.tmp" && status=1
  fi
}
run fold_time_bfloat16 "${limits[0]}" benchmarks/fold_time.py --config configs/focalnet.py \
  --config.model.dtype=bfloat16 "${fold[@]}" "${tiny[@]}"
run train_step_bfloat16 "${limits[1]}" benchmarks/train_step.py --config configs/focalnet.py \
  --kinds fl,fl_mfl_select --config.model.dtype=bfloat16 --profile-steps 3 "${steps[@]}" \
  "${size[@]}" "${tiny[@]}"
run train_step_float32 "${limits[2]}" benchmarks/train_step.py --config configs/focalnet.py \
  --kinds fl,fl_mfl_select --config.model.dtype=float32 "${steps[@]}" "${size[@]}" "${tiny[@]}"
run mfl_scaling "${limits[3]}" benchmarks/mfl_scaling.py --config configs/focalnet.py \
  --components t2w,adc,hbv,dce --subset-counts 2,14 --modes select "${rounds[@]}" \
  "${size[@]}" "${tiny[@]}"
run inference "${limits[4]}" benchmarks/inference.py --config configs/focalnet.py --models 5 \
  "${repeats[@]}" "${tiny[@]}"
exit $status
