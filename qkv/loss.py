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


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the scores h @ weight.T (N, V) against targets (N,), computed in
    blocks of rows so that the (N, V) score matrix never exists whole.

    A block's scores stay in the CPU's cache from the matmul through the softmax; the backward
    recomputes them (one more matmul) rather than storing N x V floats. With a large vocabulary
    (or a large catalogue of items) and a small width, passes over that matrix, not the matmuls,
    dominate a training step (bench/loss_speed.py). The same idea as Liger's fused linear
    cross-entropy and Apple's Cut Cross-Entropy (Wijmans et al. 2024), in plain PyTorch.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, target: Tensor, block: int) -> Tensor:
        total = h.new_zeros((), dtype=torch.float)
        lses = []
        for i in range(0, len(h), block):
            scores = (h[i : i + block] @ weight.T).float()
            lse = scores.logsumexp(-1)
            right = scores.gather(1, target[i : i + block, None]).squeeze(1)
            total += (lse - right).sum()
            lses.append(lse)
        ctx.save_for_backward(h, weight, target, torch.cat(lses))
        ctx.block = block
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        h, weight, target, lse = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        for i in range(0, len(h), ctx.block):
            hb = h[i : i + ctx.block]
            # d loss / d scores = softmax(scores) - one_hot(target), scaled by grad_out
            g = (hb @ weight.T).float().sub_(lse[i : i + ctx.block, None]).exp_()
            g.scatter_add_(1, target[i : i + ctx.block, None], g.new_full((len(hb), 1), -1.0))
            g = g.mul_(grad_out).to(h.dtype)
            grad_h[i : i + ctx.block] = g @ weight
            grad_w.addmm_(g.T, hb)
        return grad_h, grad_w, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, block: int = 1024) -> Tensor:
    """Summed cross-entropy of h @ weight.T against target; see LinearCrossEntropy."""
    return LinearCrossEntropy.apply(h, weight, target, block)
