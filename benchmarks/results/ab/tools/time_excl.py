import sys, time, json, statistics as st
import torch, fedleak
torch.set_num_threads(2)
ds, reps = sys.argv[1], int(sys.argv[2])
data = fedleak.load_dataset(ds)
out = {}
for cell in sys.argv[3:]:
    w, m = map(int, cell.split('/'))
    model = fedleak.make_mlp(data.input_shape, [w], data.num_classes, seed=0)
    x, y = data.batch(m, seed=17 * m)
    upd = fedleak.compute_gradient_update(model, x, y)
    fedleak.reconstruct(model, upd)
    ga, aa = [], []
    for _ in range(reps):
        t = time.perf_counter(); fedleak.compute_gradient_update(model, x, y); ga.append(time.perf_counter() - t)
        t = time.perf_counter(); fedleak.reconstruct(model, upd); aa.append(time.perf_counter() - t)
    out[cell] = dict(grad_min=1e3*min(ga), grad_med=1e3*st.median(ga), att_min=1e3*min(aa), att_med=1e3*st.median(aa))
print(json.dumps(out))
