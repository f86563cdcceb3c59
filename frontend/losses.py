"""Training losses, written in the DSL's functional ops so they trace into the graph
and `grad` differentiates them like the model."""

from __future__ import annotations

from . import tensor as F

IGNORE_INDEX = -100   # labels equal to it add nothing to the loss (PyTorch's default)


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0):
    """Mean negative log-likelihood of integer `labels` [...] under `logits` [..., classes],
    over the labels that are not `ignore_index` (0 when every label is ignored)."""
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    logp = F.log_softmax(logits, -1)
    hot = F.equal(F.unsqueeze(labels, labels.ndim), F.arange(logits.shape[-1]))
    picked = F.sum(F.where(hot, logp, 0.0), -1)                     # log p(label)
    keep = F.cast(F.logical_not(F.equal(labels, ignore_index)), logits.dtype)
    count = F.maximum(F.sum(keep), 1.0)
    return -(F.sum(picked * keep) / count)


def soft_cross_entropy(logits, target_logits, temperature: float = 1.0):
    """Mean over positions of -sum p_target log p, both at `temperature`, times
    temperature^2 (Hinton et al.'s distillation loss, so its gradient's scale does not
    shrink as the temperature grows)."""
    p = F.softmax(target_logits * (1.0 / temperature), -1)
    logp = F.log_softmax(logits * (1.0 / temperature), -1)
    return -F.mean(F.sum(p * logp, -1)) * (temperature * temperature)


def mse_loss(pred, target):
    d = pred - target
    return F.mean(d * d)


def contrastive_loss(a, b, logit_scale):
    """CLIP's symmetric loss: row i of `a` [n, d] matches row i of `b` (both normalised
    here); `logit_scale` multiplies the cosine similarities."""
    def unit(x):
        return x * F.rsqrt(F.sum(x * x, -1, keepdims=True) + 1e-12)
    sims = (unit(a) @ F.transpose(unit(b), 0, 1)) * logit_scale
    labels = F.arange(sims.shape[0])
    return (cross_entropy(sims, labels) + cross_entropy(F.transpose(sims, 0, 1), labels)) * 0.5
