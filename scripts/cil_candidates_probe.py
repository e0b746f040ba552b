"""Task-prediction candidates computed by the network itself, on one trained class-incremental modnet
(issue 12). Prints task-prediction accuracy and class-incremental accuracy (predicted task's head) per
candidate.

    python scripts/cil_candidates_probe.py OUTPUT_DIR SEED

A probe, not a method: every statistic is fitted on each task's own training data only (what a method
could fit right after training that task, since HAT freezes the task's masked units), and scored on the test
stream. ``--only`` picks sections: input (the input-space QDA reference), head, feat (gated layers, tied,
pre-activations), eg (Expert Gate decoders, linear and MLP), ungated, cv (out-of-fold calibration), xf
(transforms of the ReLU outputs), union, pca, more (ungated layer 0 + decoder + layer 1 + the CSI heads of a
method=ood run, tied covariances, soft posteriors).

Split-MNIST-1D task prediction, seeds 0 / 1 / 2 (issue 12; gauss-trained nets of `modnet cl benchmark=mnist1d
scenario=class`, unless said): input QDA 0.618 / 0.608 / 0.587; gated layer-0 Gaussians 0.531 / 0.497 / 0.459;
ungated 0.597 / 0.524 / 0.557; Expert Gate decoder alone 0.463 / 0.412 / 0.453, MLP decoder 0.475 (seed 0);
ungated + 0.3 decoder 0.628 / 0.539 / 0.586; heads' max softmax / energy 0.15-0.27; PCA, GMM, second layer,
unit unions, out-of-fold calibration: no gain. On CSI-trained nets (method=ood, 3 transforms): ungated + 0.3
decoder + 1.0 CSI energy 0.632 / 0.592 / 0.598, with a tied covariance (0.03) 0.623 / 0.591 / 0.634.
"""
from __future__ import annotations

import argparse
import math

import torch
from torch.nn import functional as F


def gauss_fit(f, y, lam, tied=False):
    """per-class means, Cholesky factors of shrunk covariances (class-wise or tied)."""
    d = f.shape[1]
    mus, chols = [], []
    classes = y.unique()
    pooled = sum(torch.cov((f[y == c] - f[y == c].mean(0)).T) * ((y == c).sum() - 1) for c in classes) / (len(y) - len(classes))
    for c in classes:
        fc = f[y == c]
        mu = fc.mean(0)
        cov = pooled if tied else torch.cov(fc.T)
        cov = (1 - lam) * cov + lam * torch.diagonal(cov).mean().clamp_min(1e-8) * torch.eye(d, dtype=cov.dtype)
        mus.append(mu)
        chols.append(torch.linalg.cholesky(cov))
    return mus, chols


def gauss_ll(q, mus, chols):
    out = []
    for mu, chol in zip(mus, chols):
        z = torch.linalg.solve_triangular(chol, (q - mu).T, upper=False)
        out.append(-0.5 * (z ** 2).sum(0) - torch.log(torch.diagonal(chol)).sum() - 0.5 * q.shape[1] * math.log(2 * math.pi))
    return torch.stack(out).logsumexp(0)


def main() -> None:
    from omegaconf import OmegaConf

    from modnet.nets.record import load_network
    from scenarios import build_benchmark

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("seed", type=int)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg = OmegaConf.load(f"{args.run}/config.yaml")
    info = build_benchmark(cfg.benchmark, cfg.scenario, args.seed, device=None)
    net = load_network(f"{args.run}/checkpoints/modnet_seed{args.seed}_final.pt", cfg)
    net.eval()

    def tensors(ds):
        xs, ys = zip(*[(ds[i][0], ds[i][1]) for i in range(len(ds))])
        return torch.stack([torch.as_tensor(x) for x in xs]).float(), torch.tensor([int(y) for y in ys])

    train = [tensors(e.dataset) for e in info.benchmark.train_stream]
    test = [tensors(e.dataset) for e in info.benchmark.test_stream]
    T = len(train)
    x_test = torch.cat([x for x, _ in test])
    y_test = torch.cat([y for _, y in test])
    truth = torch.cat([torch.full((len(y),), t) for t, (_, y) in enumerate(test)])
    with torch.no_grad():
        # within-task class prediction of every head on every test input
        head_pred = torch.stack([getattr(net, f"class_index_{t}")[net.task_logits(x_test, t).argmax(1)] for t in range(T)], 1)
        head_logits = [net.task_logits(x_test, t) for t in range(T)]
        head_logits_tr = [net.task_logits(x, t) for t, (x, _) in enumerate(train)]
        units_te = [[u.double() for u in net.task_units(x_test, t)] for t in range(T)]
        units_tr = [[u.double() for u in net.task_units(x, t)] for t, (x, _) in enumerate(train)]
        # pre-activations of the first layer under the task's mask (linear in x)
        pre_te = [F.linear(x_test, net.masked[0].weight, net.masked[0].bias).double() for t in range(T)]
        pre_tr = [F.linear(x, net.masked[0].weight, net.masked[0].bias).double() for x, _ in train]
    within = (head_pred[torch.arange(len(truth)), truth] == y_test).float().mean().item()

    rows: dict[str, tuple[float, float]] = {}
    zs: dict[str, torch.Tensor] = {}

    def report(name, s_test, s_train=None, standardise=True, variants=True):
        """s_test: list over tasks of test scores (higher = more likely that task); s_train: own-train scores."""
        s = torch.stack(s_test, 1).double()
        if variants and standardise and s_train is not None:
            report(name + " [raw]", s_test, None, False, False)
            m = torch.stack([v.mean() for v in s_train]).double()
            report(name + " [mean]", [s[:, t] - m[t] for t in range(len(s_test))], None, False, False)
            med = torch.stack([v.quantile(0.1) for v in s_train]).double()
            report(name + " [q10]", [s[:, t] - med[t] for t in range(len(s_test))], None, False, False)
        if standardise and s_train is not None:
            m = torch.stack([v.mean() for v in s_train]).double()
            sd = torch.stack([v.std() for v in s_train]).double()
            s = (s - m) / sd
        zs[name] = s
        chosen = s.argmax(1)
        tp = (chosen == truth).float().mean().item()
        cil = (head_pred[torch.arange(len(truth)), chosen] == y_test).float().mean().item()
        rows[name] = (tp, cil)

    only = args.only.split(",") if args.only else None

    def want(tag):
        return only is None or any(o in tag for o in only)

    # reference: input-space QDA (gauss), raw likelihood (not standardised)
    if want("input"):
        g = [gauss_fit(x.double(), y, 0.05) for x, y in train]
        report("ref: input QDA (gauss, 0.05)", [gauss_ll(x_test.double(), *g[t]) for t in range(T)], standardise=False)
    # heads
    if want("head"):
        report("head maxlogp z", [F.log_softmax(l, 1).max(1).values for l in head_logits],
               [F.log_softmax(l, 1).max(1).values for l in head_logits_tr])
        report("head energy z", [l.logsumexp(1) for l in head_logits], [l.logsumexp(1) for l in head_logits_tr])
        report("head energy raw", [l.logsumexp(1) for l in head_logits], standardise=False)
    # feature Gaussians, layers / concat / shrinkage / tied
    if want("feat"):
        for layer in ("0", "1", "cat", "pre0"):
            for lam in (0.003, 0.03, 0.3):
                for tied in (False, True):
                    s_te, s_tr = [], []
                    for t, (x, y) in enumerate(train):
                        if layer == "cat":
                            f, q = torch.cat(units_tr[t], 1), torch.cat(units_te[t], 1)
                        elif layer == "pre0":
                            m = units_tr[t][0].std(0) > 1e-6  # task's active units
                            f, q = pre_tr[t], pre_te[t]
                            f, q = f[:, m], q[:, m]
                        else:
                            f, q = units_tr[t][int(layer)], units_te[t][int(layer)]
                        act = f.std(0) > 1e-6
                        f, q = f[:, act], q[:, act]
                        mus, chols = gauss_fit(f, y, lam, tied)
                        s_te.append(gauss_ll(q, mus, chols))
                        s_tr.append(gauss_ll(f, mus, chols))
                    report(f"feat L{layer} lam {lam} {'tied' if tied else 'qda'}", s_te, s_tr)
    # first layer under the task's HAT mask only (no module gates): ReLU outputs, and pre-activations in
    # their rank-k principal subspace
    if want("ungated"):
        with torch.no_grad():
            hm = [net.masks(t)[0].double() for t in range(T)]
        with torch.no_grad():
            hm1 = [net.masks(t)[1].double() for t in range(T)]
            l1 = lambda x, t: F.linear((F.relu(F.linear(x, net.masked[0].weight, net.masked[0].bias)) * hm[t].float()),  # noqa: E731
                                       net.masked[1].weight, net.masked[1].bias).relu().double() * hm1[t]
            l1_tr = [l1(x, t) for t, (x, _) in enumerate(train)]
            l1_te = [l1(x_test, t) for t in range(T)]
        for kind in ("relu", "relu-tied", "L1", "cat") + (("pre",) if "pre" in args.only else ()):
            for lam in ((0.003, 0.01, 0.03) if kind == "relu" else (0.01,)):
                s_te, s_tr = [], []
                for t, (x, y) in enumerate(train):
                    on = hm[t] > 0.5
                    f, q = pre_tr[t][:, on], pre_te[t][:, on]
                    if kind in ("L1", "cat"):
                        f, q = (l1_tr[t], l1_te[t]) if kind == "L1" else (torch.cat([f.clamp_min(0), l1_tr[t]], 1), torch.cat([q.clamp_min(0), l1_te[t]], 1))
                        act = f.std(0) > 1e-6
                        f, q = f[:, act], q[:, act]
                    elif kind.startswith("relu"):
                        f, q = f.clamp_min(0), q.clamp_min(0)
                        act = f.std(0) > 1e-6
                        f, q = f[:, act], q[:, act]
                    else:
                        mu = f.mean(0)
                        Vh = torch.linalg.svd(f - mu, full_matrices=False)[2]
                        P = Vh[:min(40, Vh.shape[0])].T
                        f, q = (f - mu) @ P, (q - mu) @ P
                    mus, chols = gauss_fit(f, y, lam, kind.endswith("tied"))
                    s_te.append(gauss_ll(q, mus, chols))
                    s_tr.append(gauss_ll(f, mus, chols))
                report(f"ungated L0 {kind} lam {lam} (units {int(on.sum())})", s_te, s_tr)
    # calibration on out-of-fold scores of the task's own training data (k-fold inside the task)
    if want("cv"):
        with torch.no_grad():
            hm = [net.masks(t)[0].double() for t in range(T)]
        for kind in ("ungated", "gated"):
            for lam in (0.003, 0.01, 0.03, 0.1):
                s_te, s_tr, s_tr_in = [], [], []
                for t, (x, y) in enumerate(train):
                    if kind == "ungated":
                        on = hm[t] > 0.5
                        f, q = pre_tr[t][:, on].clamp_min(0), pre_te[t][:, on].clamp_min(0)
                    else:
                        f, q = units_tr[t][0], units_te[t][0]
                    act = f.std(0) > 1e-6
                    f, q = f[:, act], q[:, act]
                    mus, chols = gauss_fit(f, y, lam)
                    s_te.append(gauss_ll(q, mus, chols))
                    s_tr_in.append(gauss_ll(f, mus, chols))
                    g = torch.Generator().manual_seed(t)
                    fold = torch.randperm(len(f), generator=g) % 5
                    oof = torch.empty(len(f), dtype=torch.float64)
                    for k in range(5):
                        tr, ho = fold != k, fold == k
                        m2, c2 = gauss_fit(f[tr], y[tr], lam)
                        oof[ho] = gauss_ll(f[ho], m2, c2)
                    s_tr.append(oof)
                report(f"cv {kind} L0 lam {lam} oof-calibrated", s_te, s_tr, variants=False)
                report(f"cv {kind} L0 lam {lam} in-sample", s_te, s_tr_in, variants=False)
                m = [v.mean() for v in s_tr]
                report(f"cv {kind} L0 lam {lam} oof-mean-only", [a - b for a, b in zip(s_te, m)], standardise=False, variants=False)
    # ungated first-layer units: transforms of the ReLU outputs, and combined with an Expert-Gate decoder
    if want("xf"):
        with torch.no_grad():
            hm = [net.masks(t)[0].double() for t in range(T)]
        feats = {}
        for tf in ("relu", "sqrt", "log1p", "softplus"):
            s_te, s_tr = [], []
            for t, (x, y) in enumerate(train):
                on = hm[t] > 0.5
                a, b = pre_tr[t][:, on], pre_te[t][:, on]
                fn = {"relu": lambda v: v.clamp_min(0), "sqrt": lambda v: v.clamp_min(0).sqrt(),
                      "log1p": lambda v: v.clamp_min(0).log1p(), "softplus": lambda v: F.softplus(v, beta=4)}[tf]
                f, q = fn(a), fn(b)
                act = f.std(0) > 1e-6
                f, q = f[:, act], q[:, act]
                mus, chols = gauss_fit(f, y, 0.01)
                s_te.append(gauss_ll(q, mus, chols))
                s_tr.append(gauss_ll(f, mus, chols))
            report(f"xf ungated L0 {tf} lam 0.01", s_te, s_tr, variants=False)
        # Expert Gate on the ungated units (linear ridge decoder)
        s_te, s_tr = [], []
        for t, (x, y) in enumerate(train):
            on = hm[t] > 0.5
            f, q = pre_tr[t][:, on].clamp_min(0), pre_te[t][:, on].clamp_min(0)
            mu_f, mu_x = f.mean(0), x.double().mean(0)
            A = f - mu_f
            W = torch.linalg.solve(A.T @ A + 1e-3 * len(f) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ (x.double() - mu_x))
            s_tr.append(-(((f - mu_f) @ W + mu_x - x.double()) ** 2).sum(1))
            s_te.append(-(((q - mu_f) @ W + mu_x - x_test.double()) ** 2).sum(1))
        report("xf EG linear ungated L0", s_te, s_tr, variants=False)
        for extra in ("xf EG linear ungated L0", "head energy z", "head maxlogp z"):
            if extra not in zs:
                continue
            for w in (0.3, 1.0):
                sc = zs["xf ungated L0 relu lam 0.01"] + w * zs[extra]
                chosen = sc.argmax(1)
                rows[f"xf combo ungated relu + {w} x [{extra}]"] = ((chosen == truth).float().mean().item(),
                    (head_pred[torch.arange(len(truth)), chosen] == y_test).float().mean().item())
    # ungated first layer + decoder variants: residual Gaussian, ridge, weights, the ungated second layer, GMM
    if want("more"):
        with torch.no_grad():
            hm = [net.masks(t)[0].double() for t in range(T)]
            hm1 = [net.masks(t)[1].double() for t in range(T)]
        H_tr, H_te, L1_tr, L1_te = [], [], [], []
        for t in range(T):
            on = hm[t] > 0.5
            f, q = pre_tr[t][:, on].clamp_min(0), pre_te[t][:, on].clamp_min(0)
            act = f.std(0) > 1e-6
            H_tr.append(f[:, act]); H_te.append(q[:, act])
            with torch.no_grad():
                l1 = lambda h0: F.linear((h0 * hm[t]).float(), net.masked[1].weight, net.masked[1].bias).double().relu() * hm1[t]  # noqa: E731
                a, b = l1(pre_tr[t].clamp_min(0)), l1(pre_te[t].clamp_min(0))
            act1 = a.std(0) > 1e-6
            L1_tr.append(a[:, act1]); L1_te.append(b[:, act1])

        def gauss_scores(Ftr, Fte, lam, comps=1, tied=False):
            s_te, s_tr = [], []
            for t, (x, y) in enumerate(train):
                f, q = Ftr[t], Fte[t]
                if comps == 1:
                    mus, chols = gauss_fit(f, y, lam, tied)
                else:  # k-means sub-clusters per class
                    lab = torch.zeros(len(f), dtype=torch.long)
                    for c in y.unique():
                        idx = (y == c).nonzero().squeeze(1)
                        fc = f[idx]
                        cent = fc[torch.randperm(len(fc), generator=torch.Generator().manual_seed(0))[:comps]]
                        for _ in range(20):
                            a = torch.cdist(fc, cent).argmin(1)
                            cent = torch.stack([fc[a == k].mean(0) if (a == k).sum() > 0 else cent[k] for k in range(comps)])
                        lab[idx] = int(c) * comps + a
                    mus, chols = gauss_fit(f, lab, lam)
                s_te.append(gauss_ll(q, mus, chols)); s_tr.append(gauss_ll(f, mus, chols))
            return s_te, s_tr

        def decoder_scores(Ftr, Fte, ridge, resid=False):
            s_te, s_tr = [], []
            for t, (x, y) in enumerate(train):
                f, q = Ftr[t], Fte[t]
                mu_f, mu_x = f.mean(0), x.double().mean(0)
                A = f - mu_f
                W = torch.linalg.solve(A.T @ A + ridge * len(f) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ (x.double() - mu_x))
                r_tr = x.double() - (A @ W + mu_x)
                r_te = x_test.double() - ((q - mu_f) @ W + mu_x)
                if resid:
                    cov = torch.cov(r_tr.T)
                    cov = 0.95 * cov + 0.05 * torch.diagonal(cov).mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
                    ch = torch.linalg.cholesky(cov)
                    s_tr.append(-(torch.linalg.solve_triangular(ch, r_tr.T, upper=False) ** 2).sum(0))
                    s_te.append(-(torch.linalg.solve_triangular(ch, r_te.T, upper=False) ** 2).sum(0))
                else:
                    s_tr.append(-(r_tr ** 2).sum(1)); s_te.append(-(r_te ** 2).sum(1))
            return s_te, s_tr

        report("more G0", *gauss_scores(H_tr, H_te, 0.01), variants=False)
        report("more G0 gmm2", *gauss_scores(H_tr, H_te, 0.01, 2), variants=False)
        report("more G0 tied", *gauss_scores(H_tr, H_te, 0.01, tied=True), variants=False)
        report("more G0 tied 0.03", *gauss_scores(H_tr, H_te, 0.03, tied=True), variants=False)
        report("more G1", *gauss_scores(L1_tr, L1_te, 0.01), variants=False)
        for ridge in (1e-4, 1e-3, 1e-2):
            report(f"more D0 ridge {ridge}", *decoder_scores(H_tr, H_te, ridge), variants=False)
        report("more D0 resid", *decoder_scores(H_tr, H_te, 1e-3, True), variants=False)
        report("more D1", *decoder_scores(L1_tr, L1_te, 1e-3), variants=False)
        combos = {"G0+.3D0": [("more G0", 1), ("more D0 ridge 0.001", .3)],
                  "G0+.5D0": [("more G0", 1), ("more D0 ridge 0.001", .5)],
                  "G0+.2D0": [("more G0", 1), ("more D0 ridge 0.001", .2)],
                  "G0+.3D0(1e-4)": [("more G0", 1), ("more D0 ridge 0.0001", .3)],
                  "G0+.3D0(1e-2)": [("more G0", 1), ("more D0 ridge 0.01", .3)],
                  "G0+.3Dresid": [("more G0", 1), ("more D0 resid", .3)],
                  "G0+.5Dresid": [("more G0", 1), ("more D0 resid", .5)],
                  "G0+1Dresid": [("more G0", 1), ("more D0 resid", 1)],
                  "G0+.3D0+.3G1": [("more G0", 1), ("more D0 ridge 0.001", .3), ("more G1", .3)],
                  "G0+.3D0+.3D1": [("more G0", 1), ("more D0 ridge 0.001", .3), ("more D1", .3)],
                  "gmm2+.3D0": [("more G0 gmm2", 1), ("more D0 ridge 0.001", .3)]}
        # soft task posterior: class score log softmax(beta z)_t + log p(c | x, t) over every task's classes
        logp_heads = torch.stack([F.log_softmax(l.double(), 1) for l in head_logits], 1)  # B x T x n
        zc = zs["more G0"] + 0.3 * zs["more D0 ridge 0.001"]
        for beta in (0.5, 1.0, 2.0, 4.0):
            post = torch.log_softmax(beta * zc, 1).unsqueeze(2) + logp_heads
            flat = post.flatten(1).argmax(1)
            t_hat, c_hat = flat // post.shape[2], flat % post.shape[2]
            cls = torch.stack([getattr(net, f"class_index_{t}") for t in range(T)])[t_hat, c_hat]
            rows[f"more soft G0+.3D0 beta {beta}"] = ((t_hat == truth).float().mean().item(), (cls == y_test).float().mean().item())
        if net.task_ood is not None:  # the run trained CSI heads: their energy score, standardised on own data
            ood = net.task_ood
            ood.score = "energy"
            with torch.no_grad():
                report("more OOD energy", [ood.raw_score(ood.blocks(net, x_test, t)) for t in range(T)],
                       [ood.raw_score(ood.blocks(net, x, t)) for t, (x, _) in enumerate(train)], variants=False)
                ood.score = "maxlogit"
                report("more OOD maxlogit", [ood.raw_score(ood.blocks(net, x_test, t)) for t in range(T)],
                       [ood.raw_score(ood.blocks(net, x, t)) for t, (x, _) in enumerate(train)], variants=False)
            for w in (0.3, 0.5, 1.0):
                combos[f"G0+.3D0+{w}OOD"] = [("more G0", 1), ("more D0 ridge 0.001", .3), ("more OOD energy", w)]
                combos[f"G0+.3D0+.3G1+{w}OOD"] = [("more G0", 1), ("more D0 ridge 0.001", .3), ("more G1", .3),
                                                  ("more OOD energy", w)]
                combos[f"G0+{w}OOD"] = [("more G0", 1), ("more OOD energy", w)]
            combos["G0tied+.3D0+1OOD"] = [("more G0 tied", 1), ("more D0 ridge 0.001", .3), ("more OOD energy", 1)]
            combos["G0tied+1OOD"] = [("more G0 tied", 1), ("more OOD energy", 1)]
            combos["G0tied.03+.3D0+1OOD"] = [("more G0 tied 0.03", 1), ("more D0 ridge 0.001", .3), ("more OOD energy", 1)]
            combos["G0+1OOD"] = [("more G0", 1), ("more OOD energy", 1)]
            combos["G0+.3D0+.5G1"] = [("more G0", 1), ("more D0 ridge 0.001", .3), ("more G1", .5)]
            combos["G0+.3D0+1G1"] = [("more G0", 1), ("more D0 ridge 0.001", .3), ("more G1", 1)]
        for name, parts in combos.items():
            sc = sum(w * zs[n] for n, w in parts)
            chosen = sc.argmax(1)
            rows[f"more combo {name}"] = ((chosen == truth).float().mean().item(),
                                          (head_pred[torch.arange(len(truth)), chosen] == y_test).float().mean().item())
    # the units frozen once task t is trained (union of the masks of tasks 0..t), and pre-activation halves
    if want("union"):
        with torch.no_grad():
            hm = [net.masks(t)[0].double() for t in range(T)]
        for kind in ("union", "halves", "union-halves"):
            for lam in (0.01, 0.03):
                s_te, s_tr = [], []
                n_units = []
                for t, (x, y) in enumerate(train):
                    on = (torch.stack(hm[:t + 1]).amax(0) if kind.startswith("union") else hm[t]) > 0.5
                    a, b = pre_tr[t][:, on], pre_te[t][:, on]
                    if kind.endswith("halves"):
                        f, q = torch.cat([a.clamp_min(0), (-a).clamp_min(0)], 1), torch.cat([b.clamp_min(0), (-b).clamp_min(0)], 1)
                    else:
                        f, q = a.clamp_min(0), b.clamp_min(0)
                    act = f.std(0) > 1e-6
                    f, q = f[:, act], q[:, act]
                    n_units.append(f.shape[1])
                    mus, chols = gauss_fit(f, y, lam)
                    s_te.append(gauss_ll(q, mus, chols)); s_tr.append(gauss_ll(f, mus, chols))
                report(f"{kind} L0 lam {lam} units {n_units}", s_te, s_tr, variants=False)
    # per-task PCA of the task's masked features, QDA in the first k components (+ PPCA residual term)
    if want("pca"):
        for layer in ("0", "cat"):
            for k in (10, 20, 40, 60):
                for lam in (0.01, 0.1):
                    for resid in (False, True):
                        s_te, s_tr = [], []
                        for t, (x, y) in enumerate(train):
                            f = torch.cat(units_tr[t], 1) if layer == "cat" else units_tr[t][0]
                            q = torch.cat(units_te[t], 1) if layer == "cat" else units_te[t][0]
                            act = f.std(0) > 1e-6
                            f, q = f[:, act], q[:, act]
                            mu = f.mean(0)
                            U, S, Vh = torch.linalg.svd(f - mu, full_matrices=False)
                            kk = min(k, Vh.shape[0])
                            P = Vh[:kk].T
                            pf, pq = (f - mu) @ P, (q - mu) @ P
                            mus, chols = gauss_fit(pf, y, lam)
                            a, b = gauss_ll(pq, mus, chols), gauss_ll(pf, mus, chols)
                            if resid:
                                rf = ((f - mu) - pf @ P.T).pow(2).sum(1)
                                rq = ((q - mu) - pq @ P.T).pow(2).sum(1)
                                sig2 = rf.mean() / max(f.shape[1] - kk, 1)
                                a, b = a - 0.5 * rq / sig2, b - 0.5 * rf / sig2
                            s_te.append(a)
                            s_tr.append(b)
                        report(f"pca L{layer} k {k} lam {lam}{' +resid' if resid else ''}", s_te, s_tr)
    # Expert Gate inside the network: a per-task decoder from the task's masked layer back to the input
    if want("eg"):
        for layer in (0, 1):
            for ridge in (1e-3, 1e-1, 10.0):
                s_te, s_tr = [], []
                for t, (x, y) in enumerate(train):
                    f, q = units_tr[t][layer], units_te[t][layer]
                    act = f.std(0) > 1e-6
                    f, q = f[:, act], q[:, act]
                    mu_f, mu_x = f.mean(0), x.double().mean(0)
                    A = (f - mu_f)
                    W = torch.linalg.solve(A.T @ A + ridge * len(f) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ (x.double() - mu_x))
                    rec = lambda h: (h - mu_f) @ W + mu_x  # noqa: E731
                    e_tr = ((rec(f) - x.double()) ** 2).sum(1)
                    e_te = ((rec(q) - x_test.double()) ** 2).sum(1)
                    s_te.append(-e_te)
                    s_tr.append(-e_tr)
                report(f"EG linear L{layer} ridge {ridge} z", s_te, s_tr)
                report(f"EG linear L{layer} ridge {ridge} raw", s_te, standardise=False)
                # relative error: e / mean train error (Expert Gate's softmax over errors is monotone in e)
                report(f"EG linear L{layer} ridge {ridge} rel", [s / -e.mean() for s, e in zip(s_te, s_tr)], standardise=False)
        # MLP decoder, trained by Adam on the task's training data
        for layer in (0, 1):
            for hid, epochs in ((128, 300),):
                s_te, s_tr = [], []
                for t, (x, y) in enumerate(train):
                    torch.manual_seed(t)
                    f, q = units_tr[t][layer].float(), units_te[t][layer].float()
                    dec = torch.nn.Sequential(torch.nn.Linear(f.shape[1], hid), torch.nn.ReLU(), torch.nn.Linear(hid, x.shape[1]))
                    opt = torch.optim.Adam(dec.parameters(), 1e-3, weight_decay=1e-4)
                    for ep in range(epochs):
                        perm = torch.randperm(len(f))
                        for i in range(0, len(f), 64):
                            b = perm[i:i + 64]
                            loss = ((dec(f[b]) - x[b]) ** 2).sum(1).mean()
                            opt.zero_grad()
                            loss.backward()
                            opt.step()
                    with torch.no_grad():
                        s_te.append(-((dec(q) - x_test) ** 2).sum(1))
                        s_tr.append(-((dec(f) - x) ** 2).sum(1))
                report(f"EG mlp{hid} L{layer} z", s_te, s_tr)
                report(f"EG mlp{hid} L{layer} raw", s_te, standardise=False)
    # combinations of standardised scores
    names = list(zs)
    best_feat = max((n for n in names if n.startswith(("feat", "pca"))), key=lambda n: rows[n][0], default=None)
    best_eg = max((n for n in names if n.startswith("EG") and n.endswith(" z")), key=lambda n: rows[n][0], default=None)
    for a, b in ((best_feat, "head energy z"), (best_feat, best_eg), (best_eg, "head energy z"),
                 (best_feat, "head maxlogp z")):
        if a in zs and b in zs:
            s = zs[a] + zs[b]
            chosen = s.argmax(1)
            rows[f"combo [{a}] + [{b}]"] = ((chosen == truth).float().mean().item(),
                                           (head_pred[torch.arange(len(truth)), chosen] == y_test).float().mean().item())
    print(f"seed {args.seed} within-task {within:.3f}")
    for name, (tp, cil) in rows.items():
        print(f"{name:70s} task {tp:.3f}  cil {cil:.3f}")


if __name__ == "__main__":
    main()
