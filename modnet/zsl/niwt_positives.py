"""``niwt_positives``: NIWT whose unseen rows score their classes' predicted mean features as the seen rows score
their own class means (``niwt.scale=positives``; ``modnet.methods.niwt.match_seen_scale``), beside ``niwt`` in
one table.

The two differ in one number per unseen row, its bias: ``niwt`` (``scale=seen_budget``) matches how the rows score
images of other classes, then lifts every unseen row by one shift that spends a stated share of the seen training
images (``niwt.seen_budget``); this one lifts each row to the level the trained rows reach on their own classes,
at the mean feature its class should have (a ridge map from the seen classes' knowledge to their mean features),
with no bound on what the seen classes lose. Stop 23, H uncalibrated / calibrated / gated (niwt at
scale=negatives beside it): digits 3 seeds .508 / .460 / .623 (.000 / .605 / .698) at S .752 (.948); planted
shapes npz 3 seeds .846 / .850 / .912 (.510 / .871 / .944) at S .946 (1.000); planted AWA2 seed 0 .756 / .731 /
.811 (.441 / .760 / .793), U .671. Stop 24, digits: niwt at seen_budget 0.075 .463 / .601 / .698 at S .884.
Same config block ``niwt`` and the same layer choice; it extends a copy of the seen-class network.
"""
from __future__ import annotations

from modnet.zsl import niwt
from modnet.zsl.registry import register_zsl_method

NAME = "niwt_positives"


@register_zsl_method(NAME, candidates=niwt.candidates)
def score(cfg, net, params):
    from omegaconf import OmegaConf

    return niwt.score(OmegaConf.merge(cfg, {"niwt": {"scale": "positives"}}), net.seen_copy(), params)
