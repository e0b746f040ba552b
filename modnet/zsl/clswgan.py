"""``clswgan``: f-CLSWGAN (Xian et al., CVPR 2018; ``modnet.methods.clswgan.FCLSWGAN``), the feature-generating
baseline: a conditional WGAN generates features of the unseen classes from their knowledge, a softmax
classifier learns seen (real) and unseen (generated) classes together. On ``clswgan.features`` (null: the same
features as ESZSL and ALE, ``baseline_features``); at CPU sizes on large training sets (``large_train.clswgan``) on
the modular network's penultimate features, its fine-tuned-feature variant (configs/gzsl.yaml says why).

Hyper-parameters (configs/gzsl.yaml ``clswgan``), the paper's defaults beside each: generator and critic width
4096, gradient-penalty weight 10, classification-loss weight 0.01, 5 critic steps, batch 64, Adam lr and epochs
per data set (AWA 1e-5 / 30, CUB 1e-4 / 56), generated features per unseen class (AWA 1800, CUB 300).
"""
from __future__ import annotations

from modnet.zsl.registry import register_zsl_method

NAME = "clswgan"


@register_zsl_method(NAME)
def score(cfg, net, params):
    import torch

    from modnet.methods.clswgan import FCLSWGAN
    from modnet.zsl.seen_network import baseline_feature_kind

    c = cfg.clswgan
    kind = baseline_feature_kind(cfg, c.get("features"))
    f_train, f_test_seen, f_test_unseen = net.baseline_inputs(kind, cfg.baseline_normalize)
    model = FCLSWGAN(hidden=c.hidden, critic_hidden=c.critic_hidden, lr=c.lr, beta1=c.beta1, gp_lambda=c.gp_lambda,
                     cls_weight=c.cls_weight, critic_iter=c.critic_iter, batch_size=c.batch_size, epochs=c.epochs,
                     syn_num=c.syn_num, classifier_lr=c.classifier_lr, classifier_epochs=c.classifier_epochs,
                     pretrain_epochs=c.pretrain_epochs, seed=net.seed)
    # its own CPU threads (clswgan.threads; the gzsl job resolves null to torch's default): its 4096-wide
    # products gain from every core where the job's small networks run fastest on one
    threads, job_threads = c.get("threads"), torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        model.fit(f_train, net.split("train")[1], net.data.attributes.to(net.device), net.data.seen_classes,
                  net.data.unseen_classes)
        return model.scores(f_test_seen), model.scores(f_test_unseen)
    finally:
        torch.set_num_threads(job_threads)
