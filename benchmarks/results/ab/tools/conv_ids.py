# which originals are certified+recovered, natural and fished (same calls as bench_conv.cell), for lfw M in argv
import sys, json, numpy as np, torch, fedleak
from fedleak.models.convnet import make_convnet
out = {}
for M in map(int, sys.argv[1:]):
    data = fedleak.load_dataset('lfw'); x, y = data.batch(M, seed=0)
    model = make_convnet(data.input_shape, data.num_classes, kernel=3, pool=None, seed=0, channels=(6, 32), padding=1, fc_widths=(1024,))
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    s = fedleak.metrics.match(rec, x, y)
    cert_orig = sorted(int(i) for i in np.nonzero(s.certified & (s.matched >= 0))[0]) if hasattr(s, 'certified') else None
    out[M] = dict(certified_originals=cert_orig, recovered=sorted(int(i) for i in np.nonzero(s.recovered)[0]),
                  max_err=[float(e) for e in np.asarray(s.max_abs_error)[s.recovered]],
                  error_bounds=[float(b) for b in getattr(rec, 'error_bounds', [])] if hasattr(rec, 'error_bounds') else None)
print(json.dumps(out))
