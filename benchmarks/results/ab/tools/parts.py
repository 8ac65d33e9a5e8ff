import time, torch, fedleak, statistics as st, json
torch.set_num_threads(1)
d = fedleak.load_dataset('digits')
m = fedleak.make_mlp(d.input_shape, [256], d.num_classes, seed=0)
x, y = d.batch(6, seed=3)
u = fedleak.compute_gradient_update(m, x, y)
def T(f, n=30):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return round(1e3 * min(ts), 2)
rec = fedleak.reconstruct(m, u)
out = dict(reconstruct=T(lambda: fedleak.reconstruct(m, u)), analyze=T(lambda: fedleak.analyze_exclusivity(m, x, y)),
           match=T(lambda: fedleak.metrics.match(rec, x, y, data_range=d.value_range)))
try:
    from fedleak.nets import as_network
    out['as_network'] = T(lambda: as_network(m, inputs=x))
except ImportError: pass
print(json.dumps(out))
