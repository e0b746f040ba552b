"""``strategies.update``: the optimiser's step with the plugins' gradient multipliers, norm clip and parameter
bounds (HAT's reference order: restrict the gradients, clip, step, clamp), eager and as one compiled function.

The reference is written out here with torch's own pieces: the multipliers by hand, ``torch.nn.utils.clip_grad_norm_``,
a ``torch.optim`` optimiser's step, ``clamp_``. The compiled path runs through ``aot_eager`` (dynamo's capture and
AOT autograd's graph, each op then run eagerly; no C++ build), so it matches the reference to float rounding."""
import pytest
import torch

from strategies.update import UpdateTerms, fusable_sgd, merge_terms, update_step


def _problem(seed: int = 0):
    """Three parameters with planted gradients: a weight (masked), a bias, an embedding (clamped at 0.5)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g)),
              torch.nn.Parameter(torch.randn(2, 4, generator=g))]
    grads = [torch.randn(p.shape, generator=g) * 5 for p in params]
    mask = (torch.rand(4, 3, generator=g) > 0.5).float()
    return params, grads, mask


def _reference(params, grads, mask, make_opt, clip, bound, steps=1):
    """The step written out with torch's pieces, ``steps`` times on the same gradients."""
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = make_opt(ps)
    for _ in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        ps[0].grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
        with torch.no_grad():
            ps[2].clamp_(-bound, bound)
    return [p.detach() for p in ps]


def _ours(params, grads, mask, make_opt, clip, bound, compiled, steps=1):
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = make_opt(ps)
    terms = merge_terms([UpdateTerms(grad_masks=[(ps[0], mask)], clip_norm=clip),
                         UpdateTerms(clamps=[([ps[2]], bound)])])
    for _ in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        update_step(opt, terms, compiled)
    return [p.detach() for p in ps]


OPTIMISERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd weight decay": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
    "sgd momentum nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "sgd maximize": lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True),
    "adam (eager path)": lambda ps: torch.optim.Adam(ps, lr=0.1),
}


@pytest.mark.parametrize("compiled", [None, "aot_eager"])
@pytest.mark.parametrize("name", list(OPTIMISERS))
@pytest.mark.parametrize("clip", [1.0, 1e4])  # the norm (~30) over the bound, and under it (HAT's 10000)
def test_the_update_is_the_step_written_out_with_torch_s_pieces(name, clip, compiled):
    torch._dynamo.reset()
    params, grads, mask = _problem()
    make_opt = OPTIMISERS[name]
    steps = 3  # momentum: its buffers carried from step to step
    want = _reference(params, grads, mask, make_opt, clip, 0.5, steps)
    got = _ours(params, grads, mask, make_opt, clip, 0.5, compiled, steps)
    for w, o, p in zip(want, got, params):
        torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)
        assert not torch.equal(o, p.detach())  # every parameter moved
    assert float(got[2].abs().max()) <= 0.5  # the bound held after the step


def test_the_multipliers_act_before_the_clip_and_a_parameter_without_gradient_stays():
    """HAT's order: a masked-out gradient does not count in the norm the clip scales by; a parameter without a
    gradient (the gates' settle epochs drop theirs) keeps its value though weight decay is on, and its
    multiplier is skipped, eager and compiled."""
    for compiled in (None, "aot_eager"):
        torch._dynamo.reset()
        w = torch.nn.Parameter(torch.zeros(2))
        frozen = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([w, frozen], lr=1.0, weight_decay=0.1)
        w.grad = torch.tensor([3.0, 400.0])  # the second entry masked out: the norm clipped is 3, not ~400
        terms = UpdateTerms(grad_masks=[(w, torch.tensor([1.0, 0.0])), (frozen, torch.zeros(3))], clip_norm=1.5)
        update_step(opt, terms, compiled)
        torch.testing.assert_close(w.detach(), torch.tensor([-1.5, 0.0]), rtol=1e-5, atol=1e-6)
        assert torch.equal(frozen.detach(), torch.ones(3)) and frozen.grad is None


def test_the_compiled_update_compiles_each_learning_rate_once():
    """A schedule's rates (train.lr_patience) repeat from task to task: each distinct rate is one graph, a rate seen
    before none (torch's SGD takes it as a constant; see ``compiled_sgd_update``), and each step uses its own rate.
    Through ``aot_eager``: dynamo's own ``eager`` backend does not specialise the rate where AOT autograd and
    inductor do."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from strategies.update import sgd_update

    torch._dynamo.reset()
    params, grads, mask = _problem()
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.SGD(ps, lr=0.1)
    terms = UpdateTerms(grad_masks=[(ps[0], mask)], clip_norm=1e4, clamps=[([ps[2]], 6.0)])
    for lr in (0.1, 0.05, 0.1, 0.05, 0.1):
        opt.param_groups[0]["lr"] = lr
        before = [p.detach().clone() for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        update_step(opt, terms, "aot_eager")
        torch.testing.assert_close(ps[1].detach(), before[1] - lr * grads[1])  # the rate each step used
    assert len(_debug_get_cache_entry_list(sgd_update.__code__)) == 2


def test_what_the_fused_path_takes():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert fusable_sgd(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert not fusable_sgd(torch.optim.Adam(p, lr=0.1))
    assert not fusable_sgd(torch.optim.SGD([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1))
    assert not fusable_sgd(torch.optim.SGD(p, lr=torch.tensor(0.1)))
    assert merge_terms([UpdateTerms(clip_norm=5.0), UpdateTerms(clip_norm=2.0), UpdateTerms()]).clip_norm == 2.0


@pytest.mark.parametrize("compiled", [None, "aot_eager"])
def test_the_clip_holds_the_step_on_exploding_gradients(compiled):
    """Where clipping matters, gradients far over the bound (here ~1e6 x it): the step is the clipped one to the
    rounding of the clipped step itself, not to the rounding of the unclipped one (an update that took the full
    step and moved back by lr (1 - factor) g would be off by ~eps lr |g|, here ~1e-2)."""
    torch._dynamo.reset()
    params, grads, mask = _problem()
    grads = [g * 1e6 for g in grads]
    make_opt = OPTIMISERS["sgd"]
    want = _reference(params, grads, mask, make_opt, 1.0, 0.5)
    got = _ours(params, grads, mask, make_opt, 1.0, 0.5, compiled)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)
