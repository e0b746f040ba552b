"""Same-process A/B of inductor options on the bench's compiled modnet step (issue 15).

    OMP_NUM_THREADS=1 python scripts/inductor_option_ab.py '{"cpp_wrapper": false}' [--rounds 12]
    OMP_NUM_THREADS=1 python scripts/inductor_option_ab.py '{}'   # A/A: how far apart two equal loops read

Builds two of the bench's Split-MNIST MLP modnet strategies (784-400-400, batch 128, 8192 synthetic samples,
``modnet.jobs.bench``) in this process, both ``train.compile``: A through ``inductor`` as ``modnet cl`` compiles it,
B through a backend registered here that runs inductor with the given options patched over A's (on the CPU the
one-graph step's A is built with ``cpp_wrapper``; see ``strategies.template.compiled_training_step``). Each trains
one untimed epoch (compiles), then ``--rounds`` epochs of A and B in turn, each on this thread's CPU clock. Prints
each side's median step and the median over rounds of B's epoch / A's epoch in the same round: paired, so the
machine's drift between rounds (5-10% here) cancels. The A/A run is the reference for the spread. A probe: the
backend is registered for this process only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("options", help="inductor options for B, as JSON (torch._inductor.config keys)")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    try:
        patch = json.loads(args.options)
    except json.JSONDecodeError as e:
        parser.error(f"options: not JSON ({e}); e.g. '{{\"cpp_wrapper\": false}}'")
    if not isinstance(patch, dict):
        parser.error("options: a JSON object of inductor config keys, e.g. '{\"cpp_wrapper\": false}'")

    from modnet.runner.cpu import prepare_cpu

    prepare_cpu()
    import torch
    import torch._dynamo
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    from modnet.jobs import bench

    base = {"cpp_wrapper": True}  # what A's one-graph step is built with on the CPU

    @torch._dynamo.register_backend(name="inductor_b")
    def inductor_b(gm, example_inputs, **kw):
        with inductor_config.patch({**base, **patch}):
            return compile_fx(gm, example_inputs, **kw)

    torch.set_num_threads(1)
    dev, batch, n = torch.device("cpu"), 128, 8192
    opts = {"threads": 1, "channels_last": False, "mlp_shapes": {"mlp": {"in_dim": 784, "hidden": 400, "n_layers": 2}}}
    torch.manual_seed(0)
    x, y = bench._data("mlp", n, 10, dev, options=opts)

    sides = {}
    for name, backend in (("A", "inductor"), ("B", "inductor_b")):
        strategy, exp, _ = bench._build_avalanche("modnet", "mlp", x, y, batch, 1, dev, opts,
                                                  overrides=(f"train.compile={backend}",))
        clock = bench._EpochTimer(dev, clock=time.thread_time)  # this thread's CPU seconds per epoch
        strategy.plugins.append(clock)
        t0 = time.perf_counter()
        strategy.train(exp)  # untimed: compiles, warms the caches
        print(f"{name}: first epoch (compile included) {time.perf_counter() - t0:.1f} s", flush=True)
        sides[name] = (strategy, exp, clock, [])
    steps = n // batch
    for r in range(args.rounds):
        for strategy, exp, clock, epochs in sides.values():
            strategy.train(exp)
            epochs.append(clock.times[-1] / steps * 1e6)
        print(f"[round {r + 1}/{args.rounds}]", flush=True)
    a, b = sides["A"][3], sides["B"][3]
    paired = [q / p for p, q in zip(a, b)]
    print(f"A {statistics.median(a):.0f} us a step, B {statistics.median(b):.0f} us; B / A per round: median "
          f"{statistics.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]")


if __name__ == "__main__":
    main()
