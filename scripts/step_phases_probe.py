"""Where a training step's time goes, phase by phase of Avalanche's loop, for naive and modnet (issue 15).

    OMP_NUM_THREADS=1 python scripts/step_phases_probe.py [--rounds 6] [--loops naive modnet "modnet (compiled)"]

Builds the bench's Split-MNIST MLP loops (784-400-400, batch 128, 8192 synthetic samples, ``modnet.jobs.bench``)
in this process, trains each one untimed epoch (compiles, warm-up), then runs ``--rounds`` epochs of every loop
in turn, each strategy phase (``_before_forward``, ``forward``, ``backward``, ``_before_update``,
``optimizer_step``, ...) timed on this thread's CPU clock. Prints each loop's median step cost, its ratio to the
first loop's, and the median microseconds per step of every phase over 15 us ("other": the loop itself and
the batch loader). Where ``scripts/step_floor_probe.py`` writes the step out by hand, this times the strategy
as ``modnet cl`` runs it: the difference between the two is what Avalanche's loop and the plugins' callbacks
cost. A probe: it wraps the strategy's methods on the instance.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

PHASES = ("_unpack_minibatch", "_before_training_iteration", "_make_empty_loss", "_before_forward", "forward",
          "_after_forward", "criterion", "_before_backward", "backward", "_after_backward", "_before_update",
          "optimizer_step", "_after_update", "_after_training_iteration")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--loops", nargs="+", default=["naive", "modnet", "modnet (compiled)"])
    args = parser.parse_args(argv)

    from modnet.jobs import bench

    unknown = [name for name in args.loops if name not in bench.RATIO_LOOPS or name.startswith("plain")]
    if unknown:
        parser.error(f"--loops: {unknown} are not Avalanche loops of the bench; choose among "
                     f"{[n for n in bench.RATIO_LOOPS if not n.startswith('plain') and 'second task' not in n]}")
    from modnet.runner.cpu import prepare_cpu

    prepare_cpu()
    import torch
    from avalanche.core import SupervisedPlugin

    torch.set_num_threads(1)
    dev, batch, n = torch.device("cpu"), 128, 8192
    opts = {"threads": 1, "channels_last": False, "mlp_shapes": {"mlp": {"in_dim": 784, "hidden": 400, "n_layers": 2}}}
    torch.manual_seed(0)
    x, y = bench._data("mlp", n, 10, dev, options=opts)

    class EpochClock(SupervisedPlugin):
        def __init__(self, spent):
            super().__init__()
            self.spent, self.start, self.epoch = spent, 0, 0

        def before_training_epoch(self, strategy, **kw):
            self.spent.clear()
            self.start = time.thread_time_ns()

        def after_training_epoch(self, strategy, **kw):
            self.epoch = time.thread_time_ns() - self.start

    loops = {}
    for name in args.loops:
        kind, overrides = bench.RATIO_LOOPS[name]
        strategy, exp, _ = bench._build_avalanche(kind, "mlp", x, y, batch, 1, dev, opts, overrides=overrides)
        strategy.train(exp)  # untimed: compiles, warms the caches
        spent = collections.Counter()
        for phase in PHASES:
            method = getattr(strategy, phase)

            def timed(*a, _method=method, _phase=phase, _spent=spent, **kw):
                t = time.thread_time_ns()
                out = _method(*a, **kw)
                _spent[_phase] += time.thread_time_ns() - t
                return out

            setattr(strategy, phase, timed)
        clock = EpochClock(spent)
        strategy.plugins.append(clock)
        loops[name] = (strategy, exp, clock, [])
    for r in range(args.rounds):
        for strategy, exp, clock, rounds in loops.values():
            strategy.train(exp)
            rounds.append((clock.epoch, dict(clock.spent)))
        print(f"[round {r + 1}/{args.rounds}]", flush=True)
    steps, first = n // batch, None
    for name, (_, _, _, rounds) in loops.items():
        step = statistics.median(e for e, _ in rounds) / steps / 1e3
        phases = {p: statistics.median(s.get(p, 0) for _, s in rounds) / steps / 1e3 for p in PHASES}
        first = first or step
        shown = " ".join(f"{p.strip('_')}={us:.0f}" for p, us in phases.items() if us > 15)
        print(f"{name}: {step:.0f} us a step ({step / first:.3f}x {args.loops[0]}); {shown} "
              f"other={step - sum(phases.values()):.0f}")


if __name__ == "__main__":
    main()
