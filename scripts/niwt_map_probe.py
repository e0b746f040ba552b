"""Leave-one-seen-class-out probe of NIWT step 2 (training data only): for each seen class c, predict its importance
from the other seen classes (adam map, its variants, centred ridge) and fit step 3 on images of the other classes;
prints the fitted row's own-class z on c's test images and cos(predicted, measured importance).
Run: PYTHONPATH=. python scripts/niwt_map_probe.py 0,1,2 progress=false [gzsl overrides]"""
import sys, torch, numpy as np
from torch.nn import functional as F
from modnet.config import compose
from modnet.jobs.gzsl import train_seen_network
from modnet.zsl.niwt import importance_layer
from modnet.methods.niwt import class_importance, KnowledgeToImportance, fit_unseen_weights, _classifier_inputs, RoutingMap
from scenarios.zsl import load_zsl_from_config
cfg = compose("gzsl", sys.argv[2:]); n = cfg.niwt
for seed in [int(s) for s in sys.argv[1].split(",")]:
    torch.manual_seed(seed)
    data = load_zsl_from_config(cfg.benchmark, seed=seed)
    net = train_seen_network(cfg, data, seed, torch.device("cpu"), False)
    seen = list(data.seen_classes); S = len(seen)
    x, y = net.split("train"); xs, ys = net.split("test_seen")
    row = torch.full((data.n_classes,), -1, dtype=torch.long); row[torch.tensor(seen)] = torch.arange(S)
    layer = importance_layer(net.model, n.layer)
    imp = class_importance(net.model, layer, x, row[y], S, 256, net.forward)
    K = data.attributes.float()
    f_tr = _classifier_inputs(net.model, net.head, x, 256, net.forward); f_te = _classifier_inputs(net.model, net.head, xs, 256, net.forward)
    out = {}
    for c in range(S):
        keep = [i for i in range(S) if i != c]; others = row[y] != c
        Kk = K[[seen[i] for i in keep]]; kc = K[seen[c]][None]; A = F.normalize(imp[keep], dim=1)
        preds = {}
        kmap = KnowledgeToImportance(K.shape[1], imp.shape[1]).fit(Kk, imp[keep], epochs=n.map_epochs, lr=n.map_lr, val_fraction=n.map_val_fraction, seed=seed)
        with torch.no_grad(): preds["map"] = kmap(kc)
        for kw, nm in ((dict(bias=False), "map_nobias"), (dict(init="random"), "map_random")):
            torch.manual_seed(seed)
            km = KnowledgeToImportance(K.shape[1], imp.shape[1], **kw).fit(Kk, imp[keep], epochs=n.map_epochs, lr=n.map_lr, val_fraction=n.map_val_fraction, seed=seed)
            with torch.no_grad(): preds[nm] = km(kc)
        rm = RoutingMap(ridge=0.01); rm.fit(Kk, A); preds["ridge0.01_nomean"] = (kc - rm.k_mean) @ rm.coef
        for r in (1e-6, 0.001, 0.01):
            rm = RoutingMap(ridge=r); rm.fit(Kk, A)
            preds[f"ridge{r}"] = rm.r_mean + (kc - rm.k_mean) @ rm.coef
        for T in ():
            s = F.cosine_similarity(kc, Kk, dim=1); wts = torch.softmax(s / T, 0)
            preds[f"sim{T}"] = (wts[:, None] * A).sum(0, keepdim=True)

        for name, a in preds.items():
            w = fit_unseen_weights(net.model, layer, net.head, x[others], a, lr=n.lr, lam=n.lam, batch_size=n.batch_size,
                   patience=n.patience, min_improvement=n.min_improvement, max_iterations=n.max_iterations,
                   forward_fn=net.forward, seed=seed, seen_columns=keep).weight[0]
            s_tr = f_tr[others] @ w; s_te = f_te[row[ys] == c] @ w
            z = float((s_te.mean() - s_tr.mean()) / s_tr.std())
            out.setdefault(name, []).append((z, float(F.cosine_similarity(a[0], imp[c], dim=0))))
    print(f"seed {seed}: " + " | ".join(f"{k} z {np.mean([v[0] for v in vals]):.2f} cos_a {np.mean([v[1] for v in vals]):.2f}" for k, vals in out.items()), flush=True)
