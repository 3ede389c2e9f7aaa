#!/usr/bin/env bash
# Where a kernel's warps wait: ncu PC sampling of one launch, the hottest SASS instructions by stall samples
# (with their stall reasons) and the warp-state summary. Expects build/gpu (scripts/gpu_check.sh or
# scripts/gpu_ab.sh built it).  STALL_KERNEL=regex (default: the sm90 GEMMs)  STALL_SKIP=n launches to skip.
# STALL_NAME_BASE=demangled matches the regex against the full demangled name, template arguments included (ncu's
# default, function, has none). ncu spells them with their types: STALL_NAME_BASE=demangled
# STALL_KERNEL='gemm_sm90_kernel<__nv_bfloat16, __nv_bfloat16, \(int\)256, \(fusedmoe::detail::cuda::GemmKind\)2'
# picks the 16-bit dW GEMMs (STALL_SKIP=0: the backward's first, dW2).
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
rep=build/stalls
rm -f "$rep.ncu-rep"
ncu --clock-control none --kernel-name-base "${STALL_NAME_BASE:-function}" -k "regex:${STALL_KERNEL:-gemm_sm90}" --launch-skip "${STALL_SKIP:-1}" --launch-count 1 \
  --section WarpStateStats --section SourceCounters --section SpeedOfLight -o "$rep" \
  ./build/gpu/moe_example --tokens "${STALL_TOKENS:-16384}" --repeats 1 >build/stalls.log 2>&1 || { tail -20 build/stalls.log; exit 1; }
ncu --import "$rep.ncu-rep" --page details --section WarpStateStats --section SpeedOfLight 2>&1 | grep -vE "^\s*$|----" | head -60
ncu --import "$rep.ncu-rep" --page source --csv --print-source sass >build/stalls_source.csv 2>build/stalls_source.err
python3 - <<'PY'
import csv, sys
try:
    rows = list(csv.reader(open("build/stalls_source.csv")))
except Exception as e:
    print("no source page:", e, open("build/stalls_source.err").read()[:500]); sys.exit(0)
hdr_i = next((i for i, r in enumerate(rows) if any("Stall Sampling" in c for c in r)), None)
if hdr_i is None:
    print("no stall columns; header:", rows[:2], open("build/stalls_source.err").read()[:500]); sys.exit(0)
hdr = rows[hdr_i]
col = next(i for i, c in enumerate(hdr) if "Warp Stall Sampling (All" in c)
src = next((i for i, c in enumerate(hdr) if c.strip() in ("Source", "# Source")), 1)
addr = next((i for i, c in enumerate(hdr) if "Address" in c), 0)
reasons = [i for i, c in enumerate(hdr) if c.startswith("stall_") or "smsp__pcsamp" in c]
data = []
for r in rows[hdr_i + 1:]:
    try: data.append((float(r[col] or 0), r))
    except (ValueError, IndexError): pass
total = sum(d[0] for d in data) or 1
print(f"stall samples: {total:.0f} over {len(data)} instructions; top 25:")
for v, r in sorted(data, key=lambda d: -d[0])[:25]:
    top = sorted(((float(r[i] or 0), hdr[i]) for i in reasons if (r[i] or "0").replace('.', '', 1).isdigit()), reverse=True)[:3]
    print(f"{100 * v / total:5.1f}%  {r[addr]:>6}  {r[src][:70]:70}  " + ", ".join(f"{n.split('_', 1)[-1][:22]}={x:.0f}" for x, n in top if x > 0))
PY
