"""Training losses. The loss is the model's negative log-likelihood of the right next tokens,
label-smoothed (Vaswani et al. 2017, section 5.4), summed over real (non-padding) positions; the
training loop divides by the token count of the whole optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .data import Seq2SeqBatch


class SmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of logits (N, V) against targets (N,): the target
    distribution puts 1 - eps on the right token and eps / V on every token (Szegedy et al.
    2016), as F.cross_entropy(..., label_smoothing=eps, reduction="sum") computes it.

    Written out because the gradient has a closed form, softmax(logits) - target distribution,
    which takes fewer passes over the (N, V) logits than autograd through log_softmax:
    1.5x faster or more, forward + backward, on this project's CPU (bench/loss_speed.py).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, eps: float) -> Tensor:
        log_probs = logits.log_softmax(dim=-1)  # (N, V)
        right = log_probs.gather(1, target[:, None]).sum()
        # -sum_j q_j log p_j, with q = (1 - eps) on the right token + eps / V on every token
        loss = -(1 - eps) * right - eps / logits.shape[-1] * log_probs.sum()
        ctx.save_for_backward(log_probs, target)
        ctx.eps = eps
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        log_probs, target = ctx.saved_tensors
        eps = ctx.eps
        grad = log_probs.exp().sub_(eps / log_probs.shape[-1])  # p - eps / V
        right = grad.new_full((len(target), 1), -(1 - eps))
        grad.scatter_add_(1, target[:, None], right)  # and - (1 - eps) on the right token
        if grad_out.item() != 1.0:  # the usual case, loss.backward(), skips a pass
            grad.mul_(grad_out)
        return grad, None, None


def smoothed_cross_entropy(logits: Tensor, target: Tensor, eps: float) -> Tensor:
    """Summed label-smoothed cross-entropy; see SmoothedCrossEntropy."""
    return SmoothedCrossEntropy.apply(logits, target, eps)


def seq2seq_loss(model: nn.Module, batch: Seq2SeqBatch, label_smoothing: float) -> Tensor:
    """Summed label-smoothed cross-entropy of an encoder-decoder over the batch's real target
    tokens (padding, the config's pad_id, excluded).

    The vocabulary projection (the biggest matmul) runs on real tokens only, not on padding.
    """
    memory, mask = model.encode(batch.src)
    h = model.decoder(batch.tgt_in, memory, mask)  # (B, T, D)
    keep = batch.tgt_out != model.config.pad_id
    logits = model.lm_head(h[keep])  # (N, V), N real target tokens
    return smoothed_cross_entropy(logits.float(), batch.tgt_out[keep], label_smoothing)
