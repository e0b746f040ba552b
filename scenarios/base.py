"""Turn arrays into Avalanche benchmarks (Avalanche does the splitting, streams and task labels)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from scenarios import one_class_per_task

SCENARIOS = ("task", "class")


@dataclass
class BenchmarkInfo:
    """An Avalanche benchmark with what the models need to know about it."""

    name: str
    benchmark: object  # avalanche CLScenario
    scenario: str  # "task" or "class"
    input_shape: tuple[int, ...]
    n_classes: int
    task_classes: list[list[int]]  # per experience: the ids the model's head t predicts (local in task mode)
    global_task_classes: list[list[int]] = field(default_factory=list)  # original class ids per experience

    @property
    def n_experiences(self) -> int:
        return len(self.task_classes)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")


def split_benchmark(name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                    y_test: torch.Tensor, n_experiences: int, scenario: str, seed: int,
                    class_order: Sequence[int] | None = None,
                    experiences_key: str = "benchmark.n_experiences") -> BenchmarkInfo:
    """Split-X: the classes are divided into ``n_experiences`` groups (Avalanche ``nc_benchmark``).
    ``experiences_key``: the config key that set ``n_experiences``, named by the error when it does not fit."""
    from avalanche.benchmarks import nc_benchmark

    _check_scenario(scenario)
    classes = sorted(set(y_train.tolist()))
    if n_experiences < 1 or len(classes) % n_experiences:
        raise ValueError(f"{len(classes)} classes cannot be split evenly into {n_experiences} experiences; "
                         f"set {experiences_key} to a divisor of {len(classes)}")
    trivial = one_class_per_task(len(classes), n_experiences, scenario, experiences_key)
    if trivial:
        raise ValueError(trivial)
    untested = sorted(set(classes) - set(y_test.tolist()))
    if untested:  # nc_benchmark would stop with a bare KeyError on the first of them
        raise ValueError(f"{name}: classes {untested[:10]}{' ...' if len(untested) > 10 else ''} have training but "
                         "no test samples; give every class test samples (or drop its training samples).")
    task = scenario == "task"
    bm = nc_benchmark(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test),
                      n_experiences=n_experiences, task_labels=task, seed=seed,
                      fixed_class_order=list(class_order) if class_order is not None else None,
                      class_ids_from_zero_in_each_exp=task)
    original = [sorted(int(c) for c in s) for s in bm.original_classes_in_exp]
    local = [sorted(int(c) for c in e.classes_in_this_experience) for e in bm.train_stream]
    return BenchmarkInfo(name, bm, scenario, tuple(x_train.shape[1:]), len(classes), local, original)


def permuted_benchmark(name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                       y_test: torch.Tensor, n_experiences: int, scenario: str, seed: int) -> BenchmarkInfo:
    """Permuted-X: every experience shows all classes under its own fixed pixel permutation (the first
    experience keeps the identity), built with Avalanche ``benchmark_from_datasets``."""
    from avalanche.benchmarks import benchmark_from_datasets
    # task-aware: Avalanche's plugins read a dataset's task_set (LwF's post_adapt), which a bare
    # ClassificationDataset lacks
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset
    from avalanche.benchmarks.utils.data_attribute import ConstantSequence, DataAttribute

    _check_scenario(scenario)
    rng = np.random.default_rng(seed)
    d = int(np.prod(x_train.shape[1:]))
    train, test = [], []
    for t in range(n_experiences):
        perm = torch.arange(d) if t == 0 else torch.from_numpy(rng.permutation(d))
        for xs, ys, out in ((x_train, y_train, train), (x_test, y_test, test)):
            xp = xs.reshape(len(xs), d)[:, perm].reshape(xs.shape)
            task_label = t if scenario == "task" else 0
            out.append(TaskAwareSupervisedClassificationDataset([TensorDataset(xp, ys)], data_attributes=[
                DataAttribute(ys.tolist(), "targets"),
                DataAttribute(ConstantSequence(task_label, len(ys)), "targets_task_labels", use_in_getitem=True)]))
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    # benchmark_from_datasets gives bare streams; these decorators add the task labels and the
    # classes-per-experience that Avalanche's multi-task models and plugins read.
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train, test=test)))
    for stream in bm.streams.values():  # Avalanche leaves sets here; its multi-head classifier indexes with them
        for exp in stream:
            exp.classes_in_this_experience = sorted(exp.classes_in_this_experience)
    classes = sorted(set(y_train.tolist()))
    return BenchmarkInfo(name, bm, scenario, tuple(x_train.shape[1:]), len(classes),
                         [classes] * n_experiences, [classes] * n_experiences)
