"""What modnet's training step costs with no framework around it, against a plain PyTorch step (issue 15).

    OMP_NUM_THREADS=1 python scripts/step_floor_probe.py [--rounds 6] [--compile] [--without PART ...]
                                                         [--loop "modnet (HAT only)"] [--count] [--ops 40]
                                                         [--arch cnn] [--channels-last] [--batch 64 --samples 2048]

Builds the bench's Split-MNIST MLP (784-400-400, batch 128, 8192 synthetic samples, ``modnet.jobs.bench``) as
``modnet bench`` does, trains one epoch of modnet's default through Avalanche, then times, one epoch each in
turn on this thread's CPU clock, a hand-written loop of the same step (the transform heads' row replacement,
the forward under HAT's training condition, cross-entropy on the identity rows + HAT's capacity regulariser +
the transform heads' loss, backward, HAT's gradient clipping, SGD, the embeddings' clamp; no Avalanche, no
plugin calls) and the bench's plain loop. Prints the median per-round ratio: the floor the method's own ops set,
which no change to the runner can go under.

``--without``: drop parts of the step (``replace``: the row replacement; ``heads``: the transform heads' loss;
``clip``; ``clamp``), e.g. all four for HAT + gates alone. ``--loop``: the network of one of the bench's modnet
loops (``LOOPS``, the networks of ``modnet.jobs.bench.RATIO_LOOPS``; default "modnet"); one without transform
heads has no replacement and no heads' loss. ``--compile``: the forward and the loss through
``torch.compile`` (inductor, static shapes, HAT's slope s as a 0-d tensor so that it compiles once); its
compile seconds are printed (the first epoch). ``--arch cnn``: the bench's small CNN on 3 x 32 x 32 inputs
instead (``--channels-last``: both networks and the inputs in channels_last, as the bench's ``channels_last=auto``
on the CPU). ``--count``: instead of timing, one step of each counted
(``torch.utils.flop_counter``'s floating-point operations, and the aten ops dispatched). ``--ops N``: instead of
timing epochs, 40 steps of each under a dispatch mode that times every aten op it dispatches (wall clock around the
op alone), then the N costliest (op, input shapes) of each step, per step: where a step's time goes op by op (the
mode's own overhead is not in the figures, but each op runs on the caches the step leaves it). Its last line: the time a
step spends in the matrix products modnet's step has and plain's has not (``MATRIX_PRODUCTS`` of other shapes), the
floor a perfect fusion of every other op of the method would reach. ``--batch`` /
``--samples``: the bench's CNN runs 64 / 2048 (configs/bench.yaml), this probe 128 / 8192 by default. A probe: it
reaches into the strategy's training condition.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

PARTS = ("replace", "heads", "clip", "clamp")
# the bench's modnet loops whose step this loop writes out (the sync regulariser's loss is a plugin's: not here)
# aten ops that are matrix products (GEMMs): the arithmetic a fused kernel keeps
MATRIX_PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "dot")
LOOPS = ("modnet", "modnet (no transform heads)", "modnet (HAT + gates)", "modnet (HAT only)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--without", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--loop", default="modnet", choices=LOOPS)
    parser.add_argument("--count", action="store_true")
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--ops", type=int, default=0, metavar="N")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.samples < 2 * args.batch:
        parser.error(f"--samples ({args.samples}) must hold at least two batches of --batch ({args.batch})")

    from modnet.runner.cpu import prepare_cpu

    prepare_cpu()
    import torch
    from avalanche.core import SupervisedPlugin
    from torch.nn import functional as F

    from modnet.jobs import bench
    from modnet.nets.hat import clip_grad_norm
    from modnet.nets.models import ForwardTrace

    torch.set_num_threads(1)
    n, batch, dev = args.samples, args.batch, torch.device("cpu")
    opts = {"threads": 1, "channels_last": args.channels_last, "mlp_shapes": {"mlp": {"in_dim": 784, "hidden": 400, "n_layers": 2}}}
    torch.manual_seed(0)
    x, y = bench._data(args.arch, n, 10, dev, options=opts)
    plain, plain_opt, xp = bench._plain_setup(args.arch, x, opts, dev, args.channels_last)
    _, overrides = bench.RATIO_LOOPS[args.loop]
    strategy, exp, _ = bench._build_avalanche("modnet", args.arch, x, y, batch, 1, dev, opts, overrides=overrides)
    x = xp  # the plain loop's inputs: channels_last where asked, as the strategy's batches are

    kept = {}

    class KeepCondition(SupervisedPlugin):  # HAT's training settings, which the plugin clears after the experience
        def after_training_epoch(self, strategy, **kw):
            kept["hat"], kept["task"] = strategy.train_condition.hat, strategy.train_condition.task

    strategy.plugins.append(KeepCondition())
    strategy.train(exp)
    model, cond, opt = strategy.model, strategy.train_condition, strategy.optimizer
    cond.hat, cond.task = kept["hat"], kept["task"]
    task = cond.task
    model.train()
    ood = model.task_ood
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = [layer.task_embedding.weight for layer in model.masked]
    clipgrad, thres_emb, smax = 10000.0, 6.0, model.smax

    def loss_of(xb, yb, s, y_local):
        cond.s, cond.trace = s, ForwardTrace()
        xr = xb if "replace" in args.without or ood is None else ood.replace_rows(xb)
        out = model(xr, task, condition=cond)
        rows = slice(None) if ood is None else ood.identity_rows
        loss = F.cross_entropy(out[rows], yb[rows]) + cond.trace.capacity
        if "heads" in args.without or ood is None:
            return loss
        trace = cond.trace
        own = dataclasses.replace(cond, record=False, extra=None, trace=ForwardTrace())
        return loss + ood.loss(model, xr, y_local, task, own, feature=trace.feature,
                               copy_features=trace.extra_feature)

    loss_fn = loss_of
    if args.compile:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        loss_fn = torch.compile(loss_of, dynamic=False)
    perm = torch.randperm(n)

    def slope(i: int):
        s = 1 / smax + (smax - 1 / smax) * (i // batch) / (n // batch - 1)
        return torch.tensor(s) if args.compile else s

    def modnet_step(i: int) -> None:
        idx = perm[i:i + batch]
        yb = y[idx]  # the heads' labels outside: their lookup table's cache breaks a compiled graph
        loss = loss_fn(x[idx], yb, slope(i), model.local_labels(task, yb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if "clip" not in args.without:
            clip_grad_norm([p.grad for p in params if p.grad is not None], clipgrad)
        opt.step()
        if "clamp" not in args.without:
            with torch.no_grad():
                torch._foreach_clamp_min_(embeddings, -thres_emb)
                torch._foreach_clamp_max_(embeddings, thres_emb)

    def plain_step(i: int) -> None:
        idx = perm[i:i + batch]
        loss = F.cross_entropy(plain(xp[idx]), y[idx])
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def epoch(step) -> float:
        t = time.thread_time()
        for i in range(0, n, batch):
            step(i)
        return time.thread_time() - t

    if args.count:
        count_one_step({"modnet": modnet_step, "plain": plain_step})
        return
    if args.ops:
        time_ops({"modnet": modnet_step, "plain": plain_step}, batch, args.ops)
        return
    t0 = time.perf_counter()
    epoch(modnet_step)
    print(f"first epoch (warm-up{', compile' if args.compile else ''}): {time.perf_counter() - t0:.1f} s", flush=True)
    epoch(plain_step)
    ratios, plain_s = [], []
    for r in range(args.rounds):
        m, p = epoch(modnet_step), epoch(plain_step)
        ratios.append(m / p)
        plain_s.append(p)
        print(f"[round {r + 1}/{args.rounds}] modnet / plain {m / p:.3f}", flush=True)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"modnet step without a framework / plain step: {statistics.median(ratios):.3f}x "
          f"[{q[0]:.3f}, {q[2]:.3f}] (plain step {statistics.median(plain_s) / (n // batch) * 1e3:.2f} ms; "
          f"{args.arch}{' channels_last' if args.channels_last else ''}, {args.loop}, without: {', '.join(args.without) or 'nothing'}; {'compiled' if args.compile else 'eager'})")


def time_ops(steps, batch: int, top: int, n_steps: int = 40) -> None:
    """Each step's aten ops timed one by one (``--ops``): 10 untimed steps, then ``n_steps`` under the mode; per
    step, the ops' total and the ``top`` costliest (op, shapes of its first three tensor inputs)."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    spent, calls = collections.defaultdict(float), collections.Counter()
    # step -> {(op, shapes): time a step} of its matrix products: what no fusion of the elementwise ops removes
    products = {}

    class TimeOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            key = (str(func), tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:3])
            spent[key] += time.perf_counter() - t
            calls[key] += 1
            return out

    for name, step in steps.items():
        for i in range(0, 10 * batch, batch):
            step(i)
        spent.clear()
        calls.clear()
        with TimeOps():
            for i in range(0, n_steps * batch, batch):
                step(i)
        total = sum(spent.values()) / n_steps
        products[name] = {key: s / n_steps for key, s in spent.items() if key[0].split(".")[1] in MATRIX_PRODUCTS}
        print(f"{name} step: {sum(calls.values()) / n_steps:.0f} aten ops, {total * 1e6:.0f} us in them a step, "
              f"{sum(products[name].values()) * 1e6:.0f} us of them in matrix products ({', '.join(MATRIX_PRODUCTS)})",
              flush=True)
        for key, spent_s in sorted(spent.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {spent_s / n_steps * 1e6:9.1f} us  {calls[key] / n_steps:4.0f}x  {key[0]} {key[1]}")
        if name == "plain" and "modnet" in products:
            # a fusion of every elementwise op of the method into the products' epilogues would still pay the
            # method's own products (the gate's query and keys, the transform heads' joint head): its lower bound.
            # Counted over the (op, shapes) the two steps do not share: the layers' own products, the same in
            # both, are timed apart and their difference would be the machine's noise
            mine, plains = products["modnet"], products["plain"]
            extra = sum(s for k, s in mine.items() if k not in plains) - \
                sum(s for k, s in plains.items() if k not in mine)
            print(f"the method's extra matrix products alone: {extra * 1e6:.0f} us a step, "
                  f"{(total + extra) / total:.3f}x the plain step's ops: the least any fusion of the rest reaches")


def count_one_step(steps) -> None:
    """One step of each, after the strategy's training epoch: its floating-point operations and the aten ops it dispatches
    (views and in-place ops included; what the eager step pays a call for)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class CountOps(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    for name, step in steps.items():
        with FlopCounterMode(display=False) as flops:
            step(0)
        with CountOps() as ops:
            step(0)
        print(f"{name} step: {flops.get_total_flops() / 1e9:.3f} GFLOP, {ops.n} aten ops dispatched", flush=True)


if __name__ == "__main__":
    main()
