#!/usr/bin/env bash
# The GPU check (issue 31, item 5): one script to run on a machine with an NVIDIA GPU and this
# repository, in under 8 minutes. docs/GPU.md ("The GPU check") says what it measures.
#
#   benchmarks/gpu_check.sh [--dry-run] [--skip-install] [--out DIR]
#
# Stages, each under `timeout` and all under one budget (GPU_CHECK_BUDGET_S, 470 s):
#   install      the GPU extra: pip install 'tensorflow[and-cuda]==2.20.*' (setup.py extras_require
#                "gpu"; the same TensorFlow, only NVIDIA's CUDA wheels added), skipped when the
#                CUDA wheels are already importable or with --skip-install
#   devices      nvidia-smi, and the GPUs TensorFlow sees (none: stop, exit 3)
#   gpu_tests    pytest tests/test_gpu_path.py (the trainer's GPU path: strategy, mixed precision)
#   train_bench  python -m benchmarks --sections training: the training step of ICAN and MicRec in
#                float32 and mixed_float16 (the benchmark times both when TensorFlow sees a GPU)
#   slice_preprocess, slice_train: the epoch slice at 1 M items: configs/synthetic-1m.yaml's
#                1,000,000-item catalogue (vocabulary `catalogue`: every generated item gets an
#                embedding row) with a bounded slice of its clicks, GPU_CHECK_SLICE_EVENTS
#                (100,000) events of GPU_CHECK_SLICE_USERS (20,000) users (not its 10 M), then
#                one epoch of them (about 20 steps of 4,096) of ICAN + feature and session CL (no
#                semantic CL: title neighbours of 1 M items do not fit the budget), validation and
#                test on 500 clicks each, train.require_gpu=true; examples/s from the run's log
#   report       every figure into $OUT_DIR/gpu_check.json and gpu_check.md
# A stage that fails or runs out of time is recorded as such and the next one runs; the script
# exits 0 when every stage passed, 1 otherwise, 3 without a GPU, 2 on a bad flag.
#
# Output folder: --out DIR, else $OUT when set, else ./gpu-check-out. Environment: PYTHON (default
# .venv/bin/python, else python3), GPU_CHECK_NVIDIA_SMI (nvidia-smi), GPU_CHECK_BUDGET_S (470),
# GPU_CHECK_SLICE_ITEMS (1000000), GPU_CHECK_SLICE_EVENTS (100000), GPU_CHECK_SLICE_USERS (20000),
# GPU_CHECK_STAGES (a space-separated subset of the stage names; default all).
# GPU_CHECK_ALLOW_CPU=1 is for checking this script on a machine without a GPU (tiny slice sizes,
# a few stages): no refusal, and the slice trains with train.require_gpu=false.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
SKIP_INSTALL=0
OUT_DIR="${OUT:-$PWD/gpu-check-out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --out) shift; OUT_DIR="${1:?--out needs a folder}" ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown flag $1 (use --dry-run, --skip-install, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi
NVSMI="${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
ITEMS="${GPU_CHECK_SLICE_ITEMS:-1000000}"
EVENTS="${GPU_CHECK_SLICE_EVENTS:-100000}"
USERS="${GPU_CHECK_SLICE_USERS:-20000}"
ALLOW_CPU="${GPU_CHECK_ALLOW_CPU:-0}"
ONLY=" ${GPU_CHECK_STAGES:-install devices gpu_tests train_bench slice_preprocess slice_train} "
REQUIRE_GPU=true
[ "$ALLOW_CPU" = 1 ] && REQUIRE_GPU=false
WORK="$OUT_DIR/work"
LOGS="$OUT_DIR/logs"

# The 1 M-item slice: configs/synthetic-1m.yaml with its clicks bounded (see the header).
SLICE_SETS=(--set name=gpu-check-1m --set "artifacts_root=$WORK/artifacts"
  --set "data.data_dir=$WORK/data-1m" --set "data.synthetic.num_items=$ITEMS"
  --set "data.synthetic.num_users=$USERS" --set "data.synthetic.num_events=$EVENTS"
  --set preprocess.item_vocabulary=catalogue --set preprocess.num_shards=4
  --set "model.cl=[feature,session]" --set "train.runs_dir=$WORK/runs"
  --set "train.require_gpu=$REQUIRE_GPU" --set train.early_stopping_patience=0
  --set train.validation_max_examples=500 --set eval.test_max_examples=500)

printf -v QPY '%q' "$PY"
printf -v QSMI '%q' "$NVSMI"
printf -v QOUT '%q' "$OUT_DIR"
printf -v QWORK '%q' "$WORK"
printf -v QSETS '%q ' "${SLICE_SETS[@]}"
# name | timeout (s) | command (run with bash -c; every path quoted)
STAGES=(
  "install|90|$QPY -m pip install 'tensorflow[and-cuda]==2.20.*'"
  "devices|40|$QSMI && $QPY -c 'import micrec_tf, tensorflow as tf; print(tf.config.list_physical_devices(\"GPU\"))'"
  "gpu_tests|60|$QPY -m pytest -q -p no:cacheprovider tests/test_gpu_path.py"
  "train_bench|150|$QPY -m benchmarks --sections training --config configs/synthetic.yaml --out $QOUT/bench --work-dir $QWORK/bench"
  "slice_preprocess|120|$QPY -m pipelines.preprocess --config configs/synthetic-1m.yaml $QSETS"
  "slice_train|90|$QPY -m micrec_tf.train --config configs/synthetic-1m.yaml $QSETS"
)

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check: dry run; output folder $OUT_DIR; budget ${BUDGET_S}s; python $PY"
  for s in "${STAGES[@]}"; do
    IFS='|' read -r name limit cmd <<< "$s"
    echo "stage $name (timeout ${limit}s): $cmd"
  done
  echo "stage report: $OUT_DIR/gpu_check.json and $OUT_DIR/gpu_check.md"
  exit 0
fi

refuse() {
  mkdir -p "$OUT_DIR"
  printf '{"status": "refused", "reason": "%s"}\n' "$1" > "$OUT_DIR/gpu_check.json"
  echo "gpu_check: no GPU: $1; nothing was run" >&2
  exit 3
}

# No GPU: refuse before installing anything.
if [ "$ALLOW_CPU" = 1 ]; then
  echo "gpu_check: GPU_CHECK_ALLOW_CPU=1: not checking for a GPU (a check of the script itself)" >&2
elif [ "${CUDA_VISIBLE_DEVICES+set}" = set ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; }; then
  refuse "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides every GPU"
elif ! command -v "$NVSMI" > /dev/null 2>&1; then
  refuse "$NVSMI not found (no NVIDIA driver on this machine)"
elif ! "$NVSMI" -L 2>/dev/null | grep -q '^GPU '; then
  refuse "$NVSMI -L lists no GPU"
fi

mkdir -p "$WORK" "$LOGS"
cd "$ROOT" || exit 1
START=$(date +%s)
STATUS_FILE="$OUT_DIR/stages.tsv"
: > "$STATUS_FILE"
FAILED=0

run_stage() {  # name limit cmd
  local name="$1" limit="$2" cmd="$3" left t0 rc status
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt "$limit" ]; then limit="$left"; fi
  if [ "$limit" -le 5 ]; then
    echo "gpu_check: $name skipped: the ${BUDGET_S}s budget is spent" >&2
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped (budget spent)" "" 0 >> "$STATUS_FILE"
    FAILED=1; return 1
  fi
  echo "gpu_check: == $name (timeout ${limit}s)" >&2
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$LOGS/$name.log" 2>&1
  rc=$?
  case "$rc" in
    0) status="passed" ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >> "$STATUS_FILE"
  echo "gpu_check: $name: $status in $(( $(date +%s) - t0 ))s (log $LOGS/$name.log)" >&2
  return "$rc"
}

for s in "${STAGES[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  case "$ONLY" in *" $name "*) ;; *) continue ;; esac
  case "$name" in
    install)
      if [ "$SKIP_INSTALL" = 1 ]; then
        printf '%s\t%s\t%s\t%s\n' install "skipped (--skip-install)" "" 0 >> "$STATUS_FILE"; continue
      fi
      if "$PY" -c "import nvidia.cudnn, nvidia.cublas" > /dev/null 2>&1; then
        printf '%s\t%s\t%s\t%s\n' install "skipped (CUDA wheels already installed)" "" 0 >> "$STATUS_FILE"
        continue
      fi
      run_stage "$name" "$limit" "$cmd" ;;
    devices)
      run_stage "$name" "$limit" "$cmd"
      if [ "$ALLOW_CPU" != 1 ] && ! grep -q "PhysicalDevice(name='/physical_device:GPU" "$LOGS/devices.log"; then
        cat "$LOGS/devices.log" >&2
        refuse "nvidia-smi sees a GPU but TensorFlow does not (did the install stage pass? see $LOGS)"
      fi ;;
    slice_train)
      if grep -q '^slice_preprocess	passed' "$STATUS_FILE"; then
        run_stage "$name" "$limit" "$cmd"
      else
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped (slice_preprocess did not pass)" "" 0 >> "$STATUS_FILE"
        FAILED=1
      fi ;;
    *) run_stage "$name" "$limit" "$cmd" ;;
  esac
done

# The report: every figure in one JSON and one markdown file.
GPU_CHECK_OUT="$OUT_DIR" GPU_CHECK_WORK="$WORK" GPU_CHECK_TOTAL_S="$(( $(date +%s) - START ))" \
GPU_CHECK_SLICE="$ITEMS items, $EVENTS events, $USERS users" \
"$PY" - <<'EOF' || FAILED=1
import glob, json, os, re, subprocess

out, work = os.environ["GPU_CHECK_OUT"], os.environ["GPU_CHECK_WORK"]
rep = {"status": "ran", "total_s": int(os.environ["GPU_CHECK_TOTAL_S"]), "stages": {}}
for line in open(os.path.join(out, "stages.tsv")):
    name, status, rc, secs = line.rstrip("\n").split("\t")
    rep["stages"][name] = {"status": status, "seconds": int(secs or 0)}
try:
    rep["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as err:  # noqa: BLE001
    rep["nvidia_smi"] = repr(err)
cpu = open("/proc/cpuinfo").read()
model = re.search(r"model name\s*:\s*(.*)", cpu)
rep["cpu"] = {"model": model.group(1) if model else "?", "cores": os.cpu_count(),
              "avx512f": " avx512f" in cpu, "avx2": " avx2" in cpu}
log = os.path.join(out, "logs", "gpu_tests.log")
if os.path.exists(log):
    tail = [l for l in open(log).read().splitlines() if re.search(r"passed|failed|error", l)]
    rep["gpu_tests"] = tail[-1] if tail else ""
bench = os.path.join(out, "bench", "benchmarks.json")
if os.path.exists(bench):
    tr = json.load(open(bench)).get("training", {})
    rep["train_bench"] = {k: tr.get(k) for k in ("device", "artifacts", "batch_size",
                                                 "headline", "gpu", "error")}
runs = glob.glob(os.path.join(work, "runs", "*", "metrics.json"))
slice_ = {"data": os.environ["GPU_CHECK_SLICE"]}
if runs:
    m = json.load(open(runs[0]))
    slice_.update(seconds=m.get("seconds"), epochs_run=m.get("epochs_run"),
                  test={k: v for k, v in (m.get("test") or {}).items() if "/" not in k})
log = os.path.join(out, "logs", "slice_train.log")
if os.path.exists(log):
    text = open(log).read()
    done = re.findall(r"\[train\] done in ([\d.]+)s \((\d+) examples/s", text)
    if done:
        slice_["train_s"], slice_["examples_per_s"] = float(done[-1][0]), int(done[-1][1])
    slice_["devices_line"] = next((l for l in text.splitlines() if "[train] devices" in l), "")
    slice_["precision_line"] = next((l for l in text.splitlines()
                                     if "[train] mixed precision" in l), "")
rep["slice_1m"] = slice_
with open(os.path.join(out, "gpu_check.json"), "w") as fh:
    json.dump(rep, fh, indent=1, default=str)
lines = ["# GPU check", "", f"GPU: {rep['nvidia_smi']}  ", f"CPU: {rep['cpu']}  ",
         f"Total: {rep['total_s']} s", "", "| stage | status | seconds |", "|---|---|---|"]
lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in rep["stages"].items()]
lines += ["", "```json", json.dumps({k: rep.get(k) for k in ("gpu_tests", "train_bench",
                                                             "slice_1m")}, indent=1,
                                    default=str), "```", ""]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(lines))
print(f"gpu_check: wrote {out}/gpu_check.json and gpu_check.md")
EOF

exit "$FAILED"
