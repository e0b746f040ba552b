"""``modnet explain``: Grad-CAM maps and textual explanations of classes and functional modules (NIWT step 4).

Flow (configs/explain.yaml):
1. GZSL data as images (default: scikit-learn's 8x8 digits with seven-segment attributes, ``scenarios.zsl``);
   a small CNN is trained on the seen classes (torch).
2. NIWT (``modnet.methods.niwt``) on a conv layer one block before the classifier's input: the knowledge -> importance
   map and the unseen classes' output weights, giving a network that scores every class.
3. Class importance of that network for every class (seen and unseen) on its test images
   (``modnet.methods.niwt.class_importance``); the layer's channels are grouped into functional modules by clustering
   their importance profiles (rows of importance^T) with SynC (``modnet.methods.sync``; scikit-learn's agglomerative
   clustering when asked for, or when SynC finds fewer than ``modules.min_modules``).
4. Grad-CAM overlays (``modnet.explain.gradcam``) of every class on one of its test images, of every module on the
   test image that activates it most, and one grid per class with all modules; ``explanations.md`` naming,
   per class and per module, the attributes through NIWT's inverse map importance -> knowledge.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from modnet.config import ConfigError, check_choice, resolve_device
from modnet.jobs.gzsl import fit_classifier
from modnet.explain.gradcam import (BACKENDS, ClassGradCAM, ModuleGradCAM, explain_in_words, module_attributes, save_overlay,
                            save_overlay_grid, write_explanations_md)

CLUSTERINGS = ("sync", "agglomerative")


class SmallCNN(nn.Module):
    """conv3x3-ReLU x len(channels) at full resolution (the last ReLU is the explained layer), maxpool 2,
    a hidden fc layer (the penultimate features) and the linear classifier NIWT extends."""

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int, channels=(16, 32), hidden: int = 64):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU()]
            c = ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.MaxPool2d(2) if min(h, w) >= 2 else nn.Identity()
        pooled = c * (h // 2) * (w // 2) if min(h, w) >= 2 else c * h * w
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(pooled, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, n_classes)

    @property
    def explained_layer(self) -> nn.Module:
        return self.features[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.fc(self.pool(self.features(x))))


def _check_config(cfg: DictConfig) -> None:
    check_choice("modules.method", cfg.modules.method, CLUSTERINGS)
    check_choice("explain.backend", cfg.explain.backend, BACKENDS)
    if cfg.explain.top_k < 1:
        raise ConfigError(f"config explain.top_k must be >= 1, got {cfg.explain.top_k}")
    if not cfg.model.channels:
        raise ConfigError("config model.channels must name at least one conv layer, e.g. [16, 32]")


def _load_images(cfg: DictConfig):
    from scenarios.zsl import load_zsl_from_config

    data = load_zsl_from_config(cfg.benchmark, seed=cfg.seed, images=True)
    if data.x_train.dim() != 4:
        raise ValueError(f"Grad-CAM needs images [n, c, h, w]; {data.name} gives feature vectors of shape "
                         f"{tuple(data.x_train.shape)}. Use benchmark=digits, or benchmark=npz with images.")
    return data


def find_modules(importance: Tensor, cfg: DictConfig) -> tuple[dict[str, list[int]], str]:
    """Functional modules of the layer: clusters of its units' importance profiles (importance^T, [N x C]).

    Profiles are L2-normalised when ``modules.normalize`` (modules = units that matter for the same classes,
    whatever their gradient scale). SynC outliers (-1) belong to no module. Returns (modules, method note).
    """
    profiles = importance.T.float()
    if cfg.modules.normalize:
        profiles = F.normalize(profiles, dim=1)
    method = cfg.modules.method
    labels = None
    note = ""
    if method == "sync":
        from modnet.methods.sync import SynC

        sync = SynC(eps=cfg.modules.eps, eps_rule=cfg.modules.eps_rule, k=cfg.modules.k)
        labels = torch.as_tensor(sync.fit_predict(profiles))
        note = f"SynC (eps={sync.eps_:.4g}, {int(sync.n_clusters_)} clusters, " \
               f"{int((labels < 0).sum())} outlier units). "
        if int(sync.n_clusters_) < cfg.modules.min_modules:
            # one module explains nothing about a division of labour: fall back to a fixed count
            note += f"Fewer than modules.min_modules={cfg.modules.min_modules}: "
            labels = None
    if labels is None:
        from sklearn.cluster import AgglomerativeClustering

        n_clusters = min(cfg.modules.n_clusters, profiles.shape[0])
        labels = torch.as_tensor(AgglomerativeClustering(n_clusters=n_clusters).fit_predict(profiles.cpu().numpy()))
        note += f"Agglomerative clustering (Ward, {n_clusters} clusters)."
    modules = {f"module{m}": torch.nonzero(labels == m).flatten().tolist() for m in sorted(set(labels.tolist()))
               if m >= 0}
    return modules, note.strip()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_explain(cfg: DictConfig) -> dict:
    from modnet.methods.gzsl import gzsl_evaluate, predict_scores
    from modnet.methods.niwt import NIWT, class_importance

    _check_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.perf_counter()

    data = _load_images(cfg)
    seen, unseen = data.seen_classes, data.unseen_classes
    class_names = data.class_names or [str(c) for c in range(data.n_classes)]
    attribute_names = data.attribute_names or [f"attribute{a}" for a in range(data.attributes.shape[1])]
    column_of = torch.full((data.n_classes,), -1, dtype=torch.long)
    column_of[torch.tensor(seen)] = torch.arange(len(seen))

    # 1. the seen-class network
    model = SmallCNN(tuple(data.input_shape), len(seen), tuple(cfg.model.channels), cfg.model.hidden).to(device)
    t = cfg.train
    fit_classifier(model, data.x_train.to(device), column_of[data.y_train].to(device), epochs=t.epochs,
                   batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, seed=cfg.seed)
    layer = model.explained_layer

    # 2. NIWT: knowledge -> importance map and unseen weights; the extended network scores all classes
    niwt = NIWT(model, layer, model.classifier, **OmegaConf.to_container(cfg.niwt, resolve=True), seed=cfg.seed)
    niwt.fit(data.x_train, data.y_train, data.attributes, seen, unseen)
    gzsl = niwt.gzsl_model().eval()
    gzsl_result = gzsl_evaluate(predict_scores(gzsl, data.x_test_seen), data.y_test_seen,
                                predict_scores(gzsl, data.x_test_unseen), data.y_test_unseen, seen, unseen)

    # 3. importance of every class on its test images, and the layer's functional modules
    x_test = torch.cat([data.x_test_seen, data.x_test_unseen])
    y_test = torch.cat([data.y_test_seen, data.y_test_unseen])
    importance = class_importance(gzsl, layer, x_test, y_test, data.n_classes)  # [C, N], column = class id
    modules, clustering_note = find_modules(importance, cfg)

    # 4a. textual explanations through NIWT's inverse map importance -> knowledge
    kind = {c: "seen" for c in seen} | {c: "unseen" for c in unseen}
    label = {c: f"{class_names[c]} ({kind[c]})" for c in seen + unseen}
    per_class = {label[c]: explain_in_words(importance[c], niwt.knowledge_map, attribute_names, cfg.explain.top_k)
                 for c in sorted(seen + unseen)}
    per_module = module_attributes(importance, modules, niwt.knowledge_map, attribute_names, cfg.explain.top_k,
                                   positive_only=cfg.explain.positive_only) if modules else {}

    # 4b. Grad-CAM overlays: each class on its first test image, each module on its most activating image
    class_cam = ClassGradCAM(gzsl, layer, backend=cfg.explain.backend)
    # classes without a test image (possible with a user's .npz) get a text explanation but no map
    examples = {c: x_test[y_test == c][0] for c in sorted(seen + unseen) if bool((y_test == c).any())}
    example_batch = torch.stack(list(examples.values()))
    class_maps = class_cam(example_batch, list(examples))
    size = tuple(cfg.explain.display_size) if cfg.explain.display_size else None
    class_images, module_images = {}, {}
    for i, c in enumerate(examples):
        name = f"class_{_slug(class_names[c])}.png"
        save_overlay(example_batch[i, 0] if example_batch.shape[1] == 1 else example_batch[i], class_maps[i],
                     out / name, size=size, alpha=cfg.explain.alpha, cmap=cfg.explain.cmap)
        class_images[label[c]] = name
    if modules:
        module_cam = ModuleGradCAM(gzsl, layer, modules, backend=cfg.explain.backend)
        with torch.no_grad():
            module_scores = torch.cat([module_cam.scores(x_test[i:i + 512].to(device))
                                       for i in range(0, x_test.shape[0], 512)])  # [n_test, M]
        best = x_test[module_scores.argmax(dim=0).cpu()]
        module_maps = module_cam(best, list(modules))
        for m, name in enumerate(modules):
            module_images[name] = f"{_slug(name)}.png"
            save_overlay(best[m, 0] if best.shape[1] == 1 else best[m], module_maps[m], out / module_images[name],
                         size=size, alpha=cfg.explain.alpha, cmap=cfg.explain.cmap)
        if cfg.explain.module_grids:
            for i, c in enumerate(examples):
                maps = module_cam(example_batch[i:i + 1].expand(len(modules), *example_batch.shape[1:]),
                                  list(modules))
                save_overlay_grid(example_batch[i, 0] if example_batch.shape[1] == 1 else example_batch[i],
                                  dict(zip(modules, maps)), out / f"modules_on_class_{_slug(class_names[c])}.png",
                                  ncols=cfg.explain.grid_columns, alpha=cfg.explain.alpha, cmap=cfg.explain.cmap,
                                  title=f"modules on a test image of class {label[c]}")

    notes = [f"{data.name}: {len(seen)} seen, {len(unseen)} unseen classes; GZSL U={gzsl_result.U:.3f} "
             f"S={gzsl_result.S:.3f} H={gzsl_result.H:.3f}.",
             f"Modules: {clustering_note}",
             "Class importance measured on each class's test images; unseen classes through their NIWT weights."]
    write_explanations_md(out / "explanations.md", per_class, per_module, module_units=modules,
                          class_images=class_images, module_images=module_images,
                          title=f"Explanations ({data.name})", notes=notes)
    results = {"benchmark": data.name, "device": str(device), "gzsl": gzsl_result.as_dict(),
               "seen_classes": seen, "unseen_classes": unseen, "modules": modules,
               "clustering": clustering_note, "per_class": per_class, "per_module": per_module,
               "seconds": time.perf_counter() - t0}
    (out / "explanations.json").write_text(json.dumps(results, indent=2))
    print(f"explanations written to {out}/explanations.md ({len(modules)} modules, "
          f"GZSL H={gzsl_result.H:.3f})")
    return results
