#!/usr/bin/env bash
# Relay's device check: one command on one CUDA GPU, under 8 minutes (bench/device/README.md).
#
#   here:   bash bench/device/wheels.sh          # once: the wheels the device image lacks -> .whl/
#   device: run(command="bash bench/device/check.sh", carry=[".whl"], timeout_s=560)
#
# Stages, each under its own timeout (later ones are cut first when time runs short):
#   env -> install the carried wheels -> import smoke -> tests/test_gpu.py -> single-GPU checks
#   (bench/device/checks.py: kernels and their fp32 LSE, kernel timings at 720p SP shapes,
#   CUDA fp32/bf16 vs CPU fp32 parity for T2V/I2V/TI2V, the NCCL world-1 path) -> relay bench
#   gpu at 480p -> at 720p (a full-size A14B expert, random bf16 weights).
# Results in $OUT (at most 8 files come back): summary.txt env.txt run.log checks.json
#   bench_gpu_480p.json bench_gpu_720p.json logs.tgz
set -u
START=$(date +%s)
BUDGET=${BUDGET:-465}                      # seconds for everything; the tool's limit is 600
REPO=$(pwd)
: "${OUT:=/tmp/relay-device-out}"
WORK=$(mktemp -d /tmp/relay-device.XXXX)
WHEELS=${WHEELS:-$REPO/.whl}
PY=${PY:-python3}                          # the image's python3 holds the CUDA torch
GC_DEVICE=${GC_DEVICE:-cuda}               # cpu: dry run of this script's plumbing on a CPU box
BENCH_480_ARGS=${BENCH_480_ARGS:---sizes 480p}
BENCH_720_ARGS=${BENCH_720_ARGS:---sizes 720p}
BENCH_EXTRA=${BENCH_EXTRA:-}               # e.g. --compile (adds minutes: not in the 8-minute plan)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 RELAY_DEBUG=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error XDIT_LOGGING_LEVEL=WARNING NCCL_DEBUG=WARN \
       RELAY_CACHE=$WORK/relay-cache HF_HOME=$WORK/hf MPLCONFIGDIR=$WORK/mpl
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME TIMEOUT CMD...   (runs CMD with a timeout, logs to $WORK/NAME.log)
  local name=$1 limit=$2; shift 2
  local avail; avail=$(left)
  if (( avail < 20 )); then note "SKIP $name (budget spent at $(elapsed)s)"; return 99; fi
  (( limit > avail )) && limit=$avail
  echo "===== $name (limit ${limit}s, t=$(elapsed)s)"
  local t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > >(tee "$WORK/$name.log") 2>&1
  local rc=$?
  local verdict=PASS; (( rc != 0 )) && verdict="FAIL(rc=$rc)"; (( rc == 124 || rc == 137 )) && verdict="TIMEOUT(${limit}s)"
  note "$verdict $name $(( $(date +%s) - t0 ))s"
  return $rc
}
finish() {
  [[ -n "${DMON_PID:-}" ]] && kill "$DMON_PID" 2>/dev/null
  cp "$WORK"/*.log "$WORK"/*.xml "$WORK"/*.json "$WORK/logs/" 2>/dev/null
  "$PY" - "$OUT" >> "$SUMMARY" 2>&1 <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
c = out / "checks.json"
if c.exists():
    d = json.loads(c.read_text())
    print("checks:", ", ".join(f"{k}={v.get('status')}" for k, v in d.items()))
    for k, v in d.items():
        if v.get("status") in ("fail", "flag"):
            print(f"  {k}: " + json.dumps({a: b for a, b in v.items() if a not in ('traceback', 'errors')}, default=str)[:900])
    for k in ("kernels_at_sp_shapes", "parity", "nccl_world1"):
        if k in d and d[k].get("status") not in ("fail", "flag"):
            print(f"  {k}: " + json.dumps({a: b for a, b in d[k].items() if a not in ('traceback', 'errors')}, default=str)[:900])
for b in sorted(out.glob("bench_gpu_*.json")):
    d = json.loads(b.read_text())
    s = d["summary"]
    print(f"{b.name}: peak {s['matmul_peak_tflops']:.0f} TFLOP/s, weights {s['weights_gib']:.1f} GiB, versions {d['versions']}")
    for r in s["rows"]:
        if "error" in r:
            print(f"  {r['size']} {r['backend']}: not run: {r['error']}")
        else:
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
            print(f"  {r['size']} {r['backend']}: {r['median_s']:.3f} s/fwd, {r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}, "
                  f"peak {peak} GiB, first {r['first_call_s']:.1f}s, ops {r['attention_ops']}")
PY
  note "total $(elapsed)s"
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  echo "===== summary"; cat "$SUMMARY"; ls -la "$OUT"
}
trap finish EXIT
mkdir -p "$WORK/logs"

# ---- 0. environment -------------------------------------------------------------------------
{
  echo "# $(date -u)  repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  "$PY" -c "import torch,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'cudnn', torch.backends.cudnn.version(), 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|diffusers|transformers|xfuser|yunchang|flash|accelerate|safetensors|tokenizers|huggingface|sentencepiece|regex|numpy|ray|grpcio|protobuf|av|imageio|ftfy|pytest|einops|pyyaml|peft) "
  df -h /tmp /dev/shm; free -g; nproc
} > "$OUT/env.txt" 2>&1
note "env: $(grep -m1 -o 'torch [^ ]*' "$OUT/env.txt") | $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"

# ---- 1. carried wheels ----------------------------------------------------------------------
do_install() {
  local target=$WORK/site
  rm -rf "$target"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$WHEELS"/*.whl || return 1
  if ! PYTHONPATH=$target "$PY" -c "import transformers, diffusers" ; then
    echo "carried transformers/regex do not import with this image: falling back to the image's transformers"
    rm -rf "$target"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
      $(ls "$WHEELS"/*.whl | grep -v -E '/(transformers|regex)-') || return 1
  fi
}
export -f do_install; export WHEELS PY WORK
stage install 90 bash -c do_install || note "install failed: the GPU path cannot even import"
# The repository is the relay package (pyproject: package-dir relay = "."): a link names it.
mkdir -p "$WORK/ns" && ln -s "$REPO" "$WORK/ns/relay"
export PYTHONPATH=$WORK/site:$WORK/ns${PYTHONPATH:+:$PYTHONPATH}

do_smoke() {
  "$PY" - <<'PY'
import importlib.metadata as m, torch
for n in ("diffusers", "transformers", "xfuser", "yunchang", "regex"):
    try: print(n, m.version(n))
    except Exception as e: print(n, "missing", e)
from relay.parallel import kernels, xdit
x = xdit.load()
print("xfuser attention base:", x.LongContextAttention.__mro__[1])
where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("kernels:", {str(d): kernels.choose(where, d, 128).name for d in (torch.bfloat16, torch.float32)})
import relay.cli.main, relay.bench.gpu, relay.engine, relay.parallel.fsdp, relay.parallel.sequence  # noqa: F401
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
}
export -f do_smoke; export PY
stage import_smoke 60 bash -c do_smoke

# ---- 2. the project's own GPU tests ---------------------------------------------------------
stage test_gpu 180 "$PY" -m pytest tests/test_gpu.py -o addopts= -m gpu -ra -p no:cacheprovider \
  --rootdir "$REPO" --junitxml="$WORK/pytest_gpu.xml" -q

# ---- 3. single-GPU checks -> checks.json ----------------------------------------------------
stage checks 220 "$PY" "$REPO/bench/device/checks.py" --device "$GC_DEVICE" --out "$OUT/checks.json"

# ---- 4/5. relay bench gpu at 480p and 720p (full-size A14B expert, random bf16 weights) ----
nvidia-smi dmon -s pucm -d 2 > "$WORK/dmon.log" 2>&1 &
DMON_PID=$!
stage bench_480p 130 "$PY" -m relay.cli bench gpu $BENCH_480_ARGS $BENCH_EXTRA --attention relay,native,_native_cudnn \
  --rounds 2 --json "$OUT/bench_gpu_480p.json"
if (( $(left) >= 150 )); then
  stage bench_720p 230 "$PY" -m relay.cli bench gpu $BENCH_720_ARGS --attention relay,native \
    --rounds 2 --json "$OUT/bench_gpu_720p.json"
elif (( $(left) >= 75 )); then   # late: the default kernel only, one timed forward
  stage bench_720p 150 "$PY" -m relay.cli bench gpu $BENCH_720_ARGS --attention relay \
    --rounds 1 --json "$OUT/bench_gpu_720p.json"
else
  note "SKIP bench_720p (only $(left)s left)"
fi
exit 0
