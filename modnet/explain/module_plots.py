"""Pictures of the functional modules of a trained ``HATNet``: module maps, cluster sizes, gate usage.

matplotlib draws; scikit-learn's PCA projects the semantic vectors to 2-D. Written into the results folder
by ``modnet cl`` for the ``modnet`` strategy when module gates are on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def plot_module_maps(net, out_dir: Path) -> list[Path]:
    """Per task: every masked layer's units in 2-D (PCA of their semantic vectors), coloured by module,
    hollow where the task's HAT mask is off; beside it the module sizes."""
    from matplotlib import colormaps
    from sklearn.decomposition import PCA

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(net.trained):
        gate = net.gate.task_gate(t)
        if gate is None:
            continue
        masks = net.masks(t, net.smax)
        n_layers = gate.n_layers
        fig = _figure(4.2 * n_layers, 7)
        for i, mask in enumerate(masks):
            n_modules, ids = gate.n_modules[i], gate.module_ids(i).cpu().tolist()  # persistent ids, as elsewhere
            S = getattr(gate, f"semantic_{i}").detach().cpu().numpy()
            xy = PCA(2, random_state=0).fit_transform(S) if S.shape[1] > 2 else S
            lab = gate.assignment(i).cpu().numpy()
            on = (mask.detach().cpu().numpy() > 0.5)
            ax = fig.add_subplot(2, n_layers, i + 1)
            colours = colormaps["tab10" if n_modules <= 10 else "tab20"]
            for m in range(n_modules):
                pick = on & (lab == m)
                ax.scatter(xy[pick, 0], xy[pick, 1], color=colours(m % colours.N), s=14, label=f"module {ids[m]}")
            ax.scatter(xy[~on, 0], xy[~on, 1], facecolors="none", edgecolors="0.6", s=14, linewidths=0.6,
                       label="off in task mask")
            ax.legend(fontsize=6, loc="best", markerscale=0.8)
            ax.set_title(f"layer {i}: {n_modules} modules, {on.sum()} units on")
            ax.set_xlabel("semantic PC 1")
            ax.set_ylabel("semantic PC 2")
            ax.set_xticks([])
            ax.set_yticks([])
            ax2 = fig.add_subplot(2, n_layers, n_layers + i + 1)
            sizes = np.bincount(lab, minlength=n_modules)
            active = np.bincount(lab[on], minlength=n_modules)
            ax2.bar(range(n_modules), sizes, color="0.8", label="units")
            ax2.bar(range(n_modules), active, color="C0", label="units in task mask")
            ax2.set_xticks(range(n_modules), [str(g) for g in ids])
            ax2.set_xlabel("module (persistent id)")
            ax2.set_ylabel("units")
            ax2.set_ylim(0, max(1, sizes.max()) * 1.35)  # headroom: the legend sits above the bars, not on them
            ax2.legend(fontsize=7, loc="upper right")
        fig.suptitle(f"task {t}: functional modules (SynC over semantic vectors, PCA)")
        fig.tight_layout()
        path = out_dir / f"module_map_task{t}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


@torch.no_grad()
def gate_usage(net, xs: list[torch.Tensor]) -> list[np.ndarray]:
    """usage[layer][t, g] = share of task t's test inputs for which module g (its persistent id, as results.json's
    ``module_ids`` and explain's names) of task t's gate is on; NaN where task t's gate has no module g. (Columns
    were the gate's own module order, which names other modules in each task.)"""
    was = net.training
    net.eval()
    usage: list[list[dict[int, float]]] = []
    for t, x in enumerate(xs[: net.trained]):
        gate = net.gate.task_gate(t)
        if gate is None:
            continue
        for i in range(gate.n_layers):
            if len(usage) <= i:
                usage.append([])
            share = gate.layer_module_gates(x.flatten(1), i).mean(0).cpu().numpy()
            usage[i].append(dict(zip(gate.module_ids(i).cpu().tolist(), share.tolist())))
    net.train(was)
    out = []
    for layer in usage:
        table = np.full((len(layer), max(max(u) for u in layer) + 1), np.nan)
        for t, u in enumerate(layer):
            table[t, list(u)] = list(u.values())
        out.append(table)
    return out


def plot_gate_usage(usage: list[np.ndarray], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(3.6 * len(usage), 3.2)
    for i, u in enumerate(usage):
        ax = fig.add_subplot(1, len(usage), i + 1)
        im = ax.imshow(u, vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_xlabel("module id (blank: not in its gate)")
        for axis in (ax.xaxis, ax.yaxis):  # whole module ids and task numbers only
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("task")
        ax.set_title(f"layer {i}: share of inputs gated on")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_module_report(net, test_stream, out_dir: Path, samples: int = 256) -> dict:
    """Module maps, cluster sizes and gate usage of a trained gated ``HATNet`` into ``out_dir``."""
    out_dir = Path(out_dir)
    device = next(net.parameters()).device
    xs = []
    for exp in test_stream:
        ds = exp.dataset
        xs.append(torch.stack([ds[i][0] for i in range(min(samples, len(ds)))]).to(device))
    maps = plot_module_maps(net, out_dir)
    usage = gate_usage(net, xs)
    plot_gate_usage(usage, out_dir / "gate_usage.png")
    sizes = {}
    for t in range(net.trained):
        gate = net.gate.task_gate(t)
        if gate is not None:
            sizes[f"task{t}"] = [np.bincount(gate.assignment(i).cpu().numpy()).tolist() for i in range(gate.n_layers)]
    return {"module_maps": [p.name for p in maps], "module_sizes": sizes,
            "gate_usage": [u.tolist() for u in usage]}
