"""Per-GEMM table (time µs, L2 %, tensor pipe %) of each variant in the ncu_summary.txt of scripts/gpu_ab.sh,
in moe_example's launch order: python3 scripts/ncu_table.py ncu_summary.txt
(The router's backward GEMMs, rdW and rdX, run right after dA since session 12; older trees ran them last, so
their rows come out under other names there.)"""
import re
import sys

txt=open(sys.argv[1]).read()
names=['router','GEMM1','GEMM2','dA','rdW','rdX','dW2','dW1','dX','router_i','GEMM1inf','GEMM2inf']
for block in txt.split('== ncu ')[1:]:
    name=block.split('\n')[0]; rows=[]; cur=None
    for line in block.split('\n'):
        m=re.search(r'gemm_sm90_kernel<([^>]*)>',line)
        if m: cur=[]; rows.append(cur); continue
        m=re.search(r'gpu__time_duration.sum (\w+) ([\d.]+)',line)
        if m and cur is not None: cur.append(float(m.group(2))*(1000 if m.group(1)=='ms' else 1))
        m=re.search(r'(lts__|hmma)\S* % ([\d.]+)',line)
        if m and cur is not None: cur.append(float(m.group(2)))
    print('%-14s'%name + ' '.join('%s=%.0f(L2 %.0f,TC %.0f)'%(n,*(r+[0,0,0])[:3]) for n,r in zip(names,rows)))
