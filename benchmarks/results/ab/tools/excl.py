import json, statistics as st, glob, sys
D='/work/main/benchmarks/results/ab/'
def load(v):
    fs=[D+f'exclusivity_{v}.json']+sorted(glob.glob(D+f'exclusivity_{v}_r*.json'))
    return [json.load(open(f))['rows'] for f in fs]
O,N=load('old'),load('new')
print('runs',len(O),len(N))
cells=sorted({(r['dataset'],r['width'],r['batch_size']) for r in O[0]}, key=lambda k:(k[0],k[1],k[2]))
print('| data | width | batch | recovered old/new | certified old/new | exact old/new | false old/new | grad ms old/new | attack ms old/new | attack new/old | attack/grad old | attack/grad new | per-run attack ratios |')
print('|---|---:|---:|---|---|---|---|---|---|---:|---:|---:|---|')
allr=[]
for c in cells:
    def g(runs): return [[r for r in rows if (r['dataset'],r['width'],r['batch_size'])==c] for rows in runs]
    go,gn=g(O),g(N)
    n=sum(r['batch_size'] for r in go[0])
    def frac(gr,k): return f"{100*sum(r[k] for r in gr[0])/n:.0f}%"
    # consistency across runs
    for k in ('recovered','certified','exact','false_certificates'):
        assert len({sum(r[k] for r in x) for x in go+gn}) in (1,2)
    def med(gr,k): return st.median(r[k] for x in gr for r in x)
    ao,an=med(go,'attack_ms'),med(gn,'attack_ms'); gro,grn=med(go,'gradient_ms'),med(gn,'gradient_ms')
    pr=[st.median(r['attack_ms'] for r in b)/st.median(r['attack_ms'] for r in a) for a,b in zip(go,gn)]
    allr.append(an/ao)
    print(f"| {c[0]} | {c[1]} | {c[2]} | {frac(go,'recovered')}/{frac(gn,'recovered')} | {sum(r['certified'] for r in go[0])}/{sum(r['certified'] for r in gn[0])} | {frac(go,'exact')}/{frac(gn,'exact')} | {sum(r['false_certificates'] for x in go for r in x)}/{sum(r['false_certificates'] for x in gn for r in x)} | {gro:.1f}/{grn:.1f} | {ao:.1f}/{an:.1f} | {an/ao:.2f} | {ao/gro:.1f} | {an/grn:.1f} | {' '.join(f'{p:.2f}' for p in pr)} |")
print('geo-mean attack ratio', st.geometric_mean(allr))
# check values identical across all runs
for k in ('certifiable','recovered','exact','certified','false_certificates'):
    vals={tuple(r[k] for r in rows) for rows in O+N}
    print(k,'identical across all old/new runs' if len(vals)==1 else 'DIFFER')
print()
print('min-over-runs (robust to load): cell, grad min old/new, attack min old/new, ratio')
mins=[]
for c in cells:
    def m(runs,k): return min(r[k] for rows in runs for r in rows if (r['dataset'],r['width'],r['batch_size'])==c)
    ao,an=m(O,'attack_ms'),m(N,'attack_ms')
    mins.append(an/ao)
    print(c, f"{m(O,'gradient_ms'):.1f}/{m(N,'gradient_ms'):.1f}", f"{ao:.1f}/{an:.1f}", f"{an/ao:.2f}")
print('geo-mean min ratio', st.geometric_mean(mins))
