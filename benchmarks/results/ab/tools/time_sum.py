import json, sys, statistics as st
R={}
for line in open(sys.argv[1]):
    v, ds, js = line.split(' ', 2)
    for cell, d in json.loads(js).items():
        R.setdefault((ds, cell), {}).setdefault(v, []).append(d)
rat=[]
print('| data | width/batch | grad ms old/new (min) | attack ms old/new (min over runs) | attack new/old | att/grad old | att/grad new | per-pair ratios |')
print('|---|---|---|---|---:|---:|---:|---|')
for (ds, cell), d in R.items():
    ao=min(x['att_min'] for x in d['old']); an=min(x['att_min'] for x in d['new'])
    go=min(x['grad_min'] for x in d['old']); gn=min(x['grad_min'] for x in d['new'])
    pp=[b['att_min']/a['att_min'] for a,b in zip(d['old'],d['new'])]
    rat.append(an/ao)
    print(f'| {ds} | {cell} | {go:.1f}/{gn:.1f} | {ao:.1f}/{an:.1f} | {an/ao:.2f} | {ao/go:.1f} | {an/gn:.1f} | {" ".join(f"{p:.2f}" for p in pp)} |')
print('geo-mean', round(st.geometric_mean(rat),3))
