"""The seen / unseen novelty gate (modnet/methods/novelty.py): Mahalanobis distances by hand, a planted
unseen cluster found, a perfect gate giving Socher et al.'s two-expert figures, and `modnet gzsl`'s columns."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modnet.cli import main
from modnet.methods.gzsl import gzsl_evaluate, per_class_accuracy
from modnet.methods.novelty import SeenNoveltyGate, gated_scores


def test_novelty_is_the_smallest_mahalanobis_distance_under_the_pooled_covariance():
    """shrinkage 0: nu(x) = min_c (x - mu_c)' S^-1 (x - mu_c), S the unbiased pooled within-class covariance,
    computed here with numpy from the definition."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) @ np.array([[2.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.7]])
    y = np.repeat([4, 7], 20)
    x[y == 7] += 3.0
    gate = SeenNoveltyGate(shrinkage=0.0).fit(torch.tensor(x), torch.tensor(y), [4, 7])
    mus = np.stack([x[y == c].mean(0) for c in (4, 7)])
    resid = x - mus[(y == 7).astype(int)]
    prec = np.linalg.inv(resid.T @ resid / (40 - 2))
    q = rng.normal(size=(5, 3)) * 3
    expected = np.min([np.einsum("bi,ij,bj->b", q - m, prec, q - m) for m in mus], axis=0)
    np.testing.assert_allclose(gate.novelty(torch.tensor(q)).numpy(), expected, rtol=1e-9)
    # the threshold is the quantile of the training images' own novelty
    train = np.min([np.einsum("bi,ij,bj->b", x - m, prec, x - m) for m in mus], axis=0)
    assert gate.threshold(0.9) == pytest.approx(float(np.quantile(train, 0.9)))


def test_a_planted_unseen_cluster_is_called_unseen_and_seen_test_points_at_the_quantile_rate():
    """Three seen classes as anisotropic Gaussians with one covariance; the unseen class sits off their span
    along a low-variance direction. At q = 0.95, fresh seen points are called unseen about 5% of the time and
    unseen points nearly always."""
    g = torch.Generator().manual_seed(1)
    d = 8
    mix = torch.randn(d, d, generator=g) * torch.linspace(0.2, 2.0, d)
    means = torch.randn(3, d, generator=g) * 4

    def draw(mu, n):
        return mu + torch.randn(n, d, generator=g) @ mix.T

    x = torch.cat([draw(means[c], 300) for c in range(3)])
    y = torch.arange(3).repeat_interleave(300)
    gate = SeenNoveltyGate(shrinkage=0.01).fit(x, y, [0, 1, 2])
    seen_test = torch.cat([draw(means[c], 300) for c in range(3)])
    unseen = draw(means[0] + 4 * torch.linalg.svd(mix).U[:, -1] * 3, 300)
    seen_rate = gate.is_unseen(gate.novelty(seen_test), 0.95).float().mean().item()
    unseen_rate = gate.is_unseen(gate.novelty(unseen), 0.95).float().mean().item()
    assert 0.02 <= seen_rate <= 0.10
    assert unseen_rate >= 0.95


def test_a_perfect_gate_gives_the_zsl_accuracy_as_u_and_the_seen_only_accuracy_as_s():
    """Socher et al.'s two experts: with every test image sent to its own side, U is the method's accuracy
    among unseen classes (the ZSL accuracy) and S its accuracy among seen classes, whatever the scales."""
    g = torch.Generator().manual_seed(0)
    seen, unseen = [0, 1, 2], [3, 4]
    ys, yu = torch.tensor([0, 1, 2] * 10), torch.tensor([3, 4] * 10)
    ss = torch.randn(30, 5, generator=g)
    su = torch.randn(20, 5, generator=g)
    su[:, seen] += 10.0  # badly scaled: uncalibrated, the seen classes take every unseen image
    assert gzsl_evaluate(ss, ys, su, yu, seen, unseen).U == 0.0
    r = gzsl_evaluate(gated_scores(ss, torch.zeros(30, dtype=torch.bool), seen, unseen), ys,
                      gated_scores(su, torch.ones(20, dtype=torch.bool), seen, unseen), yu, seen, unseen)
    zsl = float(per_class_accuracy(su[:, unseen].argmax(1) + 3, yu, unseen))
    s_only = float(per_class_accuracy(ss[:, seen].argmax(1), ys, seen))
    assert r.U == pytest.approx(zsl) and r.S == pytest.approx(s_only)


def test_gzsl_reports_gated_columns_with_a_quantile_chosen_on_validation(tmp_path, capsys):
    assert main(["gzsl", "methods=[eszsl]", "progress=false", f"output_dir={tmp_path}", "train.epochs=5",
                 "gate.quantiles=[0.5,0.9]"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    g = res["methods"]["eszsl"]["gated"]
    assert g["quantile"] in (0.5, 0.9) and 0 <= g["U"] <= 1 and 0 <= g["S"] <= 1
    assert res["per_seed"]["0"]["eszsl"]["gated"]["layer"] in (0, -1)  # chosen with q on validation
    assert 0 <= g["seen_called_unseen"] <= 1 and 0 <= g["unseen_called_unseen"] <= 1
    assert "H (gated)" in capsys.readouterr().out
    assert main(["gzsl", "gate.quantile=1.5", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "gate.quantile=1.5 must be a number in (0, 1], or null" in capsys.readouterr().err
    assert main(["gzsl", "model.arch=mlp", "gate.layer=5", f"output_dir={tmp_path / 'y'}"]) == 2
    assert "gate layer 5 but the network has 2 masked layers" in capsys.readouterr().err


def test_the_gated_zsl_accuracy_is_the_methods_own_whatever_the_gate_says():
    """The ZSL accuracy (test-unseen among the unseen classes alone) does not involve the gate. It was computed on
    the gated scores, where an unseen image sent to the seen side has no unseen class left (all -inf): its argmax
    fell on the first class and the figure equalled gated U. Here the gate sends every unseen image to the seen
    side: gated U is 0, the ZSL accuracy the hand-computed restricted one."""
    from modnet.jobs.gzsl import _evaluate_gated
    from modnet.methods.gzsl import per_class_accuracy

    g = torch.Generator().manual_seed(1)
    seen, unseen = [0, 1, 2], [3, 4]
    ys, yu = torch.tensor([0, 1, 2] * 10), torch.tensor([3, 4] * 10)
    ss, su = torch.randn(30, 5, generator=g), torch.randn(20, 5, generator=g)
    su[torch.arange(20), yu] += 3.0  # the method mostly right among the unseen classes
    data = SimpleNamespace(seen_classes=seen, unseen_classes=unseen, y_test_seen=ys, y_test_unseen=yu)
    r = _evaluate_gated((ss, su), data, [torch.zeros(30, dtype=torch.bool), torch.zeros(20, dtype=torch.bool)])
    zsl = float(per_class_accuracy(su[:, unseen].argmax(1) + 3, yu, unseen))
    assert r.U == 0.0 and zsl > 0.8 and r.zsl_accuracy == pytest.approx(zsl)


def test_the_gate_setting_is_the_best_h_among_those_that_keep_the_seen_share_else_the_one_that_keeps_most():
    import numpy as np

    from modnet.jobs.gzsl import choose_gate_setting

    h = np.array([0.70, 0.65, 0.60, 0.40])
    kept = np.array([0.80, 0.91, 0.95, 0.99])
    assert choose_gate_setting(h, kept, None) == 0        # no bar: the best H
    assert choose_gate_setting(h, kept, 0.9) == 1         # best H of settings 1..3
    assert choose_gate_setting(h, kept, 0.97) == 3        # only setting 3 keeps 97%
    assert choose_gate_setting(h, kept * 0.5, 0.9) == 3   # none keeps 90%: the one that keeps most


@pytest.mark.parametrize("terminal", [False, True])
def test_gzsl_logs_one_line_per_network_and_method(tmp_path, capsys, monkeypatch, terminal):
    """In a log (progress=false), and on a terminal with progress bars (it printed nothing there for minutes):
    a line for each validation split's network and the test network, and for each method on it, in order; the
    test network's line carries the seen accuracy results.json records."""
    if terminal:
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["gzsl", "methods=[eszsl,ale]", f"progress={str(terminal).lower()}", f"output_dir={tmp_path}",
                 "train.epochs=5"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[gzsl seed 0, ")]
    stages = [f"validation split {k}/3" for k in (1, 2, 3)] + ["test"]  # digits: 3 splits of 2 pseudo-unseen
    expected = [(stage, what) for stage in stages for what in ("network trained", "eszsl scored", "ale scored")]
    assert [(ln.split(", ", 1)[1].split("]")[0], ln.split("] ")[1].split(" on ")[0].split(" (")[0].split(",")[0])
            for ln in lines] == expected
    assert f"seen accuracy {res['network_seen_accuracy'][0]:.3f}" in lines[-3]
    assert all(ln.endswith(" s)") for ln in lines)
