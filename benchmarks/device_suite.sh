#!/usr/bin/env bash
# One-GPU benchmark suite of flax_textvae: run it once on a machine with an accelerator (under 8 minutes).
#
#   bash benchmarks/device_suite.sh [--out-dir=DIR] [--budget-s=SECONDS]
#   bash benchmarks/device_suite.sh --smoke        # tiny sizes on CPU, end to end, under a minute
#
# Writes one JSON file per measurement to benchmarks/results/DEVICE_NAME/ (DEVICE_NAME from jax's
# device_kind, e.g. NVIDIA_H200; --smoke: cpu_smoke) plus environment.json, then prints the tables of
# benchmarks/RESULTS.md from them (benchmarks/device_report.py). In order of priority:
#   1. training step, bfloat16: t5-small and bart-base shapes (random weights), global batch 64 / 256 / 1024,
#      PTB sentence lengths (../shared/data/ptb/test.txt when present, else the synthetic fit), 3 length
#      buckets: real tokens/s, examples/s, padding, compile time, peak device memory, MFU;
#   2. the same VAE in PyTorch + transformers (bfloat16 autocast), batch 64 / 256, when torch sees a GPU;
#   3. cross-entropy with the LM head: full float32 logits vs losses.chunked_token_nll, bart-base shapes;
#   4. importance-weighted evaluation, K = 500 samples, t5-small, bfloat16 and float32;
#   5. time to the first step of a fresh process with an empty / a filled compilation cache (tiny config);
#   6. the fast paths against the rows of 1 and 4 (which use the default dot_product attention), bart-base
#      bfloat16 (its attention has no dropout, so the fused path runs in training too): the explicit
#      attention and chunked cross-entropy at batch 256, per-layer rematerialisation at batch 1024 (peak
#      memory), and the K = 500 evaluation of 4 with the explicit attention;
#      on a CUDA GPU also cuDNN flash attention (model.attention=cudnn): its equality with the explicit path
#      (one attention layer fwd+bwd and the whole VAE's forward, t5-small and bart-base shapes, bfloat16, an
#      odd length) and the bart-base bfloat16 training row at batch 256 with it;
#   7. training step, float32, the same grid as 1;
#   8. steps/s of the real training loop (tiny config) without and with host-to-device prefetching.
# Every run has a time cap, and runs that would start after --budget-s (default 420 s) are skipped and
# listed, so the suite ends in time; a run that fails (e.g. out of memory) is recorded with its error and
# the rest go on. Exit code: 2 without an accelerator (unless --smoke), 1 when a run failed, else 0.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif command -v python >/dev/null; then PY=python; else PY=python3; fi

SMOKE=0
OUT=""
BUDGET=420
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --out-dir=*) OUT="${arg#*=}" ;;
    --budget-s=*) BUDGET="${arg#*=}" ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_suite.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $SMOKE == 1 ]]; then
  # The smoke run checks the suite's plumbing, not speed: CPU, and XLA without its slow optimisation passes.
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
fi
export TOKENIZERS_PARALLELISM=false

if ! BACKEND="$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)"; then
  echo "device_suite.sh: error: '$PY -c \"import jax\"' failed; activate the environment with jax installed." >&2
  exit 2
fi
if [[ $SMOKE == 0 && "$BACKEND" == "cpu" ]]; then
  echo "device_suite.sh: error: no accelerator: jax.default_backend() is 'cpu'. This suite measures GPU/TPU" \
       "throughput; install jax with CUDA (pip install -U \"jax[cuda12]\") or run it where a GPU is visible" \
       "(check JAX_PLATFORMS and CUDA_VISIBLE_DEVICES). 'bash benchmarks/device_suite.sh --smoke' runs tiny" \
       "sizes on CPU to check the suite itself." >&2
  exit 2
fi

DEVICE="$("$PY" -c 'import jax, re; print(re.sub(r"[^A-Za-z0-9]+", "_", jax.devices()[0].device_kind).strip("_"))')"
[[ $SMOKE == 1 ]] && DEVICE="${DEVICE}_smoke"
OUT="${OUT:-$REPO/benchmarks/results/$DEVICE}"
mkdir -p "$OUT/logs"
LENGTHS=()
if [[ -f "$REPO/../shared/data/ptb/test.txt" ]]; then LENGTHS=("--lengths-from=$REPO/../shared/data/ptb/test.txt"); fi

"$PY" - "$OUT/environment.json" "$SMOKE" <<'EOF'
import datetime, json, os, platform, subprocess, sys
import jax
devices = jax.devices()
env = {"date": datetime.date.today().isoformat(), "backend": jax.default_backend(),
       "device_kind": devices[0].device_kind, "device_count": len(devices), "jax": jax.__version__,
       "host": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
       "smoke": sys.argv[2] == "1"}
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=2)
EOF

FAILED=0
# run NAME CAP_SECONDS COMMAND...: runs COMMAND (its last stdout line is one JSON object) into $OUT/NAME.json;
# on failure or when the budget is spent, NAME.json records why instead.
run() {
  local name="$1" cap="$2"; shift 2
  local left=$(( BUDGET - SECONDS ))
  if (( left < 15 )); then
    printf '{"skipped": "time budget of %s s spent before this run"}\n' "$BUDGET" > "$OUT/$name.json"
    echo "[$(printf '%4d' $SECONDS)s] skip $name (budget)"
    return
  fi
  (( cap > left )) && cap=$left
  echo "[$(printf '%4d' $SECONDS)s] $name: $*"
  timeout --kill-after=10 "$cap" "$@" > "$OUT/logs/$name.out" 2> "$OUT/logs/$name.err"
  local rc=$?
  "$PY" - "$OUT" "$name" "$rc" "$cap" <<'EOF' || FAILED=$((FAILED + 1))
import json, sys
out, name, rc, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lines = open(f"{out}/logs/{name}.out").read().strip().splitlines()
err = open(f"{out}/logs/{name}.err").read().strip().splitlines()
result = None
if rc == 0 and lines:
    try:
        result = json.loads(lines[-1])
    except ValueError:
        result = None
if result is None:
    why = f"timed out after {cap} s" if rc in (124, 137) else f"exit code {rc}"
    last = next((l for l in reversed(err) if l.strip()), "")
    result = {"error": f"{why}: {last[-300:]}", "exit_code": rc, "stderr_tail": err[-30:]}
with open(f"{out}/{name}.json", "w") as f:
    json.dump(result, f, indent=2)
if "error" in result:
    print(f"       {name} FAILED: {result['error']}", file=sys.stderr)
    sys.exit(1)
EOF
}

TT=(benchmarks/train_throughput.py --json --num-buckets=3 --max-length=128 "${LENGTHS[@]}")
train_grid() {  # train_grid DTYPE
  local dtype="$1" arch batch steps
  if [[ $SMOKE == 1 ]]; then
    run "train_tiny_${dtype}_b8" 60 "$PY" benchmarks/train_throughput.py --json --arch=tiny --batch=8 --steps=4 \
        --num-buckets=1 --max-length=32 --dtype="$dtype"
    return
  fi
  for arch in t5-small bart-base; do
    for batch in 64 256 1024; do
      case $batch in 64) steps=30 ;; 256) steps=12 ;; *) steps=6 ;; esac
      run "train_${arch}_${dtype}_b${batch}" 150 "$PY" "${TT[@]}" --arch="$arch" --batch="$batch" \
          --steps="$steps" --dtype="$dtype"
    done
  done
}

# 1. training, bfloat16
train_grid bfloat16

# 2. PyTorch + transformers, bfloat16 autocast
if [[ $SMOKE == 1 ]]; then
  run torch_tiny-t5_b4 60 "$PY" benchmarks/torch_baseline.py --json --arch=tiny-t5 --batch=4 --steps=2 --warmup=1 \
      --amp=bfloat16 --threads=1
elif "$PY" -c 'import sys, torch, transformers; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  for arch in t5-small bart-base; do
    for batch in 64 256; do
      run "torch_${arch}_b${batch}" 120 "$PY" benchmarks/torch_baseline.py --json --arch="$arch" --batch="$batch" \
          --steps=10 --warmup=3 --device=cuda --amp=bfloat16 "${LENGTHS[@]}"
    done
  done
else
  echo '{"skipped": "torch with CUDA (and transformers) not importable here"}' > "$OUT/torch_all.json"
  echo "[$(printf '%4d' $SECONDS)s] skip torch (no CUDA torch)"
fi

# 3. cross-entropy with the LM head
if [[ $SMOKE == 1 ]]; then
  run xent_tiny 30 "$PY" benchmarks/cross_entropy.py --json --batch=2 --length=8 --d-model=32 --vocab=1000 \
      --chunks=256 --repeats=2
else
  run xent_bart-base_bfloat16_b256 90 "$PY" benchmarks/cross_entropy.py --json --batch=256 --length=40 \
      --d-model=768 --vocab=50265 --dtype=bfloat16 --chunks=4096,8192,16384 --repeats=20
fi

# 4. importance-weighted evaluation, K = 500
if [[ $SMOKE == 1 ]]; then
  run eval_tiny_k4 60 "$PY" benchmarks/eval_throughput.py --json --arch=tiny --examples=8 --batch=8 --iw-samples=4 \
      --num-buckets=1 --max-length=32
else
  for dtype in bfloat16 float32; do
    run "eval_t5-small_${dtype}_k500" 150 "$PY" benchmarks/eval_throughput.py --json --arch=t5-small \
        --examples=512 --batch=64 --iw-samples=500 --num-buckets=4 --dtype="$dtype" "${LENGTHS[@]}"
  done
fi

# 5. second start with the persistent compilation cache
if [[ $SMOKE == 0 ]]; then
  run second_start_tiny 150 "$PY" benchmarks/second_start.py --json --steps=10
fi

# 6. the step's fast paths
if [[ $SMOKE == 1 ]]; then
  run attn_tiny_float32 60 "$PY" benchmarks/attention.py --json --arch=tiny --batch=2 --length=7 --repeats=2
  run train_tiny_float32_b8_fast 60 "$PY" benchmarks/train_throughput.py --json --arch=tiny --batch=8 --steps=4 \
      --num-buckets=1 --max-length=32 --attention=explicit --vocab-chunk=64 --remat
else
  if "$PY" -c 'import sys; from flax_textvae.models.attention import cudnn_available as ok; sys.exit(0 if ok() else 1)'
  then
    for arch in t5-small bart-base; do
      run "attn_${arch}_bfloat16" 90 "$PY" benchmarks/attention.py --json --arch="$arch" --batch=64 --length=33 \
          --dtype=bfloat16 --repeats=20
    done
    run train_bart-base_bfloat16_b256_cudnn 150 "$PY" "${TT[@]}" --arch=bart-base --batch=256 --steps=12 \
        --dtype=bfloat16 --attention=cudnn
  else
    echo '{"skipped": "cuDNN attention needs a CUDA GPU of compute capability 8.0 or newer"}' > "$OUT/attn_cudnn.json"
  fi
  run train_bart-base_bfloat16_b256_explicit 150 "$PY" "${TT[@]}" --arch=bart-base --batch=256 --steps=12 \
      --dtype=bfloat16 --attention=explicit
  run train_bart-base_bfloat16_b256_chunked 150 "$PY" "${TT[@]}" --arch=bart-base --batch=256 --steps=12 \
      --dtype=bfloat16 --vocab-chunk=8192
  run train_bart-base_bfloat16_b1024_remat 150 "$PY" "${TT[@]}" --arch=bart-base --batch=1024 --steps=6 \
      --dtype=bfloat16 --remat
  run eval_t5-small_bfloat16_k500_explicit 150 "$PY" benchmarks/eval_throughput.py --json --arch=t5-small \
      --examples=512 --batch=64 --iw-samples=500 --num-buckets=4 --dtype=bfloat16 --attention=explicit \
      "${LENGTHS[@]}"
fi

if [[ $SMOKE == 0 ]]; then
  # 7. training, float32
  train_grid float32
  # 8. the training loop with and without prefetching
  run prefetch_tiny 150 "$PY" benchmarks/prefetch_loop.py --json --steps=400 --depths=0,2 --repeats=1
fi

echo
echo "Results in $OUT (logs in $OUT/logs), after $SECONDS s:"
echo
"$PY" benchmarks/device_report.py "$OUT"
REPORT_RC=$?
if (( FAILED > 0 || REPORT_RC != 0 )); then
  echo "device_suite.sh: some runs failed (listed above under 'Not measured'); their JSON files hold the error" \
       "and $OUT/logs the full output." >&2
  exit 1
fi
exit 0
