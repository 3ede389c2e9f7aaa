#!/usr/bin/env bash
# Host-path measurements in one GPU call (run from the repo root on the GPU machine): installs the package,
# then the host cost of single calls (host_overhead.py --ops), host-clock marks of synchronised fwd+bwd steps
# (--marks) at HOST_TOKENS, and a T=16384 fwd+bwd timeline with the SM clock and power sampled every 20 ms by
# nvidia-smi meanwhile (is a sustained loop clocked lower than the profiled step?). Output: $OUT/host.txt.
#   HOST_TOKENS="2048 4096"   HOST_SKIP_INSTALL=1 (the package is installed already)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PATH="/usr/local/cuda/bin:$PATH"
PY="${PYTHON:-python3}"
out="$OUT/host.txt"
t0=$(date +%s)
if [ "${HOST_SKIP_INSTALL:-0}" != 1 ]; then
  $PY -m pip install --no-build-isolation --no-deps -q . >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
fi
echo "installed ($(( $(date +%s) - t0 )) s) on $(nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | head -1); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" | tee "$out"
$PY scripts/host_overhead.py --ops 2>&1 | tee -a "$out"
$PY scripts/host_overhead.py --fwdbwd --marks ${HOST_TOKENS:-2048 4096} 2>&1 | tee -a "$out"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader,nounits -lms 20 >"$OUT/smi.csv" 2>/dev/null &
smi=$!
$PY scripts/host_overhead.py --fwdbwd 16384 2>&1 | tee -a "$out"
kill $smi 2>/dev/null
$PY - "$OUT/smi.csv" <<'PY' 2>&1 | tee -a "$out"
import sys, statistics
rows = [l.split(", ") for l in open(sys.argv[1]) if l.count(",") >= 4]
busy = [r for r in rows if float(r[3]) > 300]  # samples while the GPU works (power above 300 W)
for name, col in (("SM clock MHz", 1), ("memory clock MHz", 2), ("power W", 3), ("temperature C", 4)):
    v = sorted(float(r[col]) for r in busy)
    if v:
        print(f"  {name} over {len(v)} busy samples: min {v[0]:.0f}, median {statistics.median(v):.0f}, max {v[-1]:.0f}")
PY
