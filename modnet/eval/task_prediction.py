"""Class-incremental accuracy split into its two factors (Kim et al., NeurIPS 2022): for a masked network
that answers an unlabelled input by first picking a task,

    P(class right) = P(task right) x P(class right | task right)

``task_prediction`` measures both on the test stream after the last experience: the share of test inputs of
experience t whose predicted task (``infer_task``'s second output) is t, and the within-task accuracy when
the true task is given (the task's own masked head). A class-incremental modnet run reports them in
results.json (``task_prediction``), so a weak predictor and a weak sub-network can be told apart.
"""
from __future__ import annotations

import torch

from scenarios.tensors import dataset_batches


@torch.no_grad()
def task_prediction(model, test_stream, device, batch_size: int = 512) -> dict:
    """{"task_accuracy": overall share of inputs routed to their own task, "task_accuracy_per_experience",
    "within_task_accuracy": accuracy with the task given, "within_task_accuracy_per_experience"} over the
    experiences the model was trained on."""
    was_training = model.training
    model.eval()
    try:
        n = model.trained
        task_hits, within_hits, counts = [], [], []
        for t, exp in enumerate(list(test_stream)[:n]):
            ds = exp.dataset
            hits_t = hits_w = 0
            idx = getattr(model, f"class_index_{t}")
            for x, y in dataset_batches(ds, batch_size):
                x, y = x.to(device), y.to(device)
                chosen = model.infer_task(x)[1]
                hits_t += int((chosen == t).sum())
                hits_w += int((idx[model.task_logits(x, t).argmax(1)] == y).sum())
            task_hits.append(hits_t)
            within_hits.append(hits_w)
            counts.append(len(ds))
    finally:
        model.train(was_training)
    total = max(sum(counts), 1)
    return {"task_accuracy": sum(task_hits) / total,
            "task_accuracy_per_experience": [h / max(c, 1) for h, c in zip(task_hits, counts)],
            "within_task_accuracy": sum(within_hits) / total,
            "within_task_accuracy_per_experience": [h / max(c, 1) for h, c in zip(within_hits, counts)]}
