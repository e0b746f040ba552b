"""Task-prediction accuracy of several predictors on one trained class-incremental modnet (issue 12).

    python scripts/task_prediction_probe.py OUTPUT_DIR SEED [--shrinkage 0.003] [--layer 0]

reads ``OUTPUT_DIR/config.yaml`` and ``OUTPUT_DIR/checkpoints/modnet_seed<SEED>_final.pt`` of a finished
``modnet cl scenario=class`` run and prints, on the test stream, the share of inputs routed to their own task by

* the run's own predictor (``task_inference.method``),
* the heads' max softmax (``heads``),
* feature Gaussians, from the network itself: for task t, one Gaussian per class over the units of masked layer
  ``--layer`` that are active on t's training data, under t's mask (HAT keeps them from drifting), shrunk
  towards tr(Sigma)/d I; log p(x | t) = logsumexp_c log N(h_t(x); mu_tc, Sigma_tc), standardised by its mean and
  std on t's own training data (features of different tasks live in different spaces),
* when the run trained OOD heads (``task_inference.method=ood``): their energy score standardised the same
  way, and the sum of the two standardised scores.

A probe, not a method: it reads the training data again (a method may not) and keeps full covariances over
~100-150 units per class (5-11k floats each, more than the input-space Gaussians on 40- or 64-d inputs).
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    from omegaconf import OmegaConf

    from modnet.nets.record import load_network
    from scenarios import build_benchmark

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("seed", type=int)
    ap.add_argument("--shrinkage", type=float, default=0.003)
    ap.add_argument("--layer", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = OmegaConf.load(f"{args.run}/config.yaml")
    info = build_benchmark(cfg.benchmark, cfg.scenario, args.seed, device=None)
    net = load_network(f"{args.run}/checkpoints/modnet_seed{args.seed}_final.pt", cfg)

    def tensors(ds):
        xs, ys = zip(*[(ds[i][0], ds[i][1]) for i in range(len(ds))])
        return torch.stack([torch.as_tensor(x) for x in xs]).float(), torch.tensor([int(y) for y in ys])

    train = [tensors(e.dataset) for e in info.benchmark.train_stream]
    test = [tensors(e.dataset) for e in info.benchmark.test_stream]
    n_tasks = len(train)
    x_test = torch.cat([x for x, _ in test])
    truth = torch.cat([torch.full((len(y),), t) for t, (_, y) in enumerate(test)])
    acc = lambda scores: (scores.argmax(1) == truth).float().mean().item()  # noqa: E731
    lam = args.shrinkage
    with torch.no_grad():
        rows = {"run's own predictor": (net.infer_task(x_test)[1] == truth).float().mean().item(),
                "heads max softmax": acc(torch.stack([torch.log_softmax(net.task_logits(x_test, t), 1).max(1).values
                                                      for t in range(n_tasks)], 1))}
        z_feat, z_ood = [], []
        for t, (x, y) in enumerate(train):
            f = net.task_units(x, t)[args.layer].double()
            active = f.std(0) > 1e-6
            f, ft = f[:, active], net.task_units(x_test, t)[args.layer].double()[:, active]
            d = f.shape[1]
            ll_test, ll_train = [], []
            for c in y.unique():
                fc = f[y == c]
                mu, cov = fc.mean(0), torch.cov(fc.T)
                cov = (1 - lam) * cov + lam * torch.diagonal(cov).mean() * torch.eye(d, dtype=cov.dtype)
                chol = torch.linalg.cholesky(cov)
                logdet = torch.log(torch.diagonal(chol)).sum()
                for q, out in ((ft, ll_test), (f, ll_train)):
                    z = torch.linalg.solve_triangular(chol, (q - mu).T, upper=False)
                    out.append(-0.5 * (z ** 2).sum(0) - logdet)
            s, s_train = torch.stack(ll_test).logsumexp(0), torch.stack(ll_train).logsumexp(0)
            z_feat.append((s - s_train.mean()) / s_train.std())
            if net.task_ood is not None:
                ood = net.task_ood
                ood.score = "energy"
                o, o_train = ood.raw_score(ood.blocks(net, x_test, t)), ood.raw_score(ood.blocks(net, x, t))
                z_ood.append((o - o_train.mean()) / o_train.std())
        rows[f"feature Gaussians (layer {args.layer}, shrinkage {lam})"] = acc(torch.stack(z_feat, 1))
        if z_ood:
            rows["OOD heads, energy, standardised"] = acc(torch.stack(z_ood, 1))
            rows["feature Gaussians + OOD heads"] = acc(torch.stack(z_feat, 1) + torch.stack(z_ood, 1))
    for name, value in rows.items():
        print(f"{name:45s} {value:.3f}")


if __name__ == "__main__":
    main()
