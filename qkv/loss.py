"""Training losses. The loss is the model's negative log-likelihood of the right next tokens,
label-smoothed (Vaswani et al. 2017, section 5.4), summed over real (non-padding) positions; the
training loop divides by the token count of the whole optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
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


# Scores per chunk in LinearCrossEntropy: 2^20 fp32 values (4 MB, 131 rows of an 8k vocabulary)
# stay in a core's L2 cache on the CPU it was tuned on (bench/loss_speed.py sweeps the size), and
# still make a matrix product large enough to run at speed; a character vocabulary takes a whole
# batch in one chunk, so small vocabularies pay no per-chunk overhead.
CHUNK_SCORES = 1 << 20
# In 16-bit matmuls on the CPU, rows are padded to a multiple of this (see LinearCrossEntropy).
ROW_QUANTUM = 128


class LinearCrossEntropy(torch.autograd.Function):
    """The vocabulary projection and the summed label-smoothed cross-entropy in one, a chunk of
    rows at a time: loss = SmoothedCrossEntropy(h W^T + b, target, eps).

    The plain route stores the (N, V) logits, their fp32 copy and their log-probabilities, and
    makes another pass for the softmax in the backward pass: several arrays of N x V floats
    (55 MB each for a 2,048-token batch and 8k words), each written once and read once, so the
    step waits on memory rather than arithmetic. Here each chunk's logits are made, turned into
    log-probabilities, summed into the loss and turned into their gradient p - q while they are
    still in cache; only that gradient (in the matmuls' precision) is kept, and the two products
    of the backward pass (dL/dh = G W, dL/dW = G^T h) run right away, when gradients are wanted,
    so backward() only scales them. The matmuls run in the autocast dtype where autocast is on
    (bf16 training), the softmax and loss always in fp32, as autocast runs the plain route.
    """

    @staticmethod
    def forward(ctx: Any, h, weight, bias, target, eps: float, grads: bool):  # type: ignore[override]
        device = h.device.type
        on = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if on else h.dtype
        with torch.autocast(device, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            n, v = h.shape[0], weight.shape[0]
            rows = max(1, CHUNK_SCORES // v)
            if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
                # oneDNN compiles a kernel for each new shape of a 16-bit matmul, and n differs
                # in every batch: zero rows up to a multiple of ROW_QUANTUM, and chunks of a
                # multiple of it, keep the shapes to a few (bench/loss_speed.py --new-rows).
                # The zero rows add nothing to the loss or the gradients.
                rows = max(ROW_QUANTUM, rows // ROW_QUANTUM * ROW_QUANTUM)
                hc = F.pad(hc, (0, 0, 0, -n % ROW_QUANTUM))
            g = torch.empty(len(hc), v, dtype=dtype, device=h.device) if grads else None
            loss = torch.zeros((), device=h.device)
            for i in range(0, n, rows):
                t = target[i : i + rows]
                scores = F.linear(hc[i : i + rows], wc, bc)[: len(t)]  # (real rows, V)
                loss += chunk_loss(scores, t, eps, None if g is None else g[i : i + len(t)])
            if g is not None:
                g[n:] = 0  # the padding's rows, if any
                need = ctx.needs_input_grad
                ctx.grads = (
                    (g @ wc)[:n].to(h.dtype) if need[0] else None,
                    (g.t() @ hc).to(weight.dtype) if need[1] else None,
                    g.sum(0, dtype=torch.float32).to(bias.dtype)
                    if bias is not None and need[2]
                    else None,
                )
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        grads = ctx.__dict__.pop("grads", None)  # made in forward, handed over once
        if grads is None:
            raise RuntimeError("linear_cross_entropy: backward through the same loss twice")
        if grad_out.item() != 1.0:  # the usual case, loss.backward(), skips a pass
            grads = tuple(None if x is None else x * grad_out for x in grads)
        return (*grads, None, None, None)


def chunk_loss(scores: Tensor, target: Tensor, eps: float, grad: Tensor | None) -> Tensor | float:
    """The summed label-smoothed cross-entropy of scores (rows, V) against target (rows,) and,
    into `grad` (rows, V) where given, its gradient p - q: qkv's C++ kernel where it applies
    (qkv/native.py: two reads of each row and one write, while it is in cache), else PyTorch's
    ops (`torch_chunk_loss`)."""
    got = native.smoothed_cross_entropy_rows(scores, target, eps, grad)
    return got if got is not None else torch_chunk_loss(scores, target, eps, grad)


def torch_chunk_loss(scores: Tensor, target: Tensor, eps: float, grad: Tensor | None) -> Tensor:
    """chunk_loss by PyTorch's ops, the softmax and loss in fp32."""
    t, v = target[:, None], scores.shape[1]
    in_grad = grad is not None and grad.dtype == torch.float32 == scores.dtype
    if in_grad:  # fp32: the gradient is made where it is kept, not copied there
        log_probs = torch.log_softmax(scores, -1, out=grad)
    else:
        log_probs = scores.float().log_softmax(-1)
    # -sum_j q_j log p_j, q = (1 - eps) on the right token + eps / V on every token
    loss = -((1 - eps) * log_probs.gather(1, t).sum() + eps / v * log_probs.sum())
    if grad is not None:  # p - q, as SmoothedCrossEntropy.backward
        p = log_probs.exp_().sub_(eps / v)
        p.scatter_add_(1, t, p.new_full(t.shape, -(1 - eps)))
        if not in_grad:
            grad.copy_(p)
    return loss


def linear_cross_entropy(
    h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, eps: float
) -> Tensor:
    """Summed label-smoothed cross-entropy of the scores F.linear(h, weight, bias) (N, V) against
    target (N,), computed chunk by chunk without storing the scores (LinearCrossEntropy); equal
    to smoothed_cross_entropy(F.linear(h, weight, bias).float(), target, eps) up to rounding."""
    grads = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, weight, bias)
    )
    return LinearCrossEntropy.apply(h, weight, bias, target, eps, grads)


def seq2seq_loss(model: nn.Module, batch: Seq2SeqBatch, label_smoothing: float) -> Tensor:
    """Summed label-smoothed cross-entropy of an encoder-decoder over the batch's real target
    tokens (padding, the config's pad_id, excluded).

    The vocabulary projection (the biggest matmul) runs on real tokens only, not on padding,
    fused with the loss (linear_cross_entropy).
    """
    memory, mask = model.encode(batch.src)
    h = model.decoder(batch.tgt_in, memory, mask)  # (B, T, D)
    keep = batch.tgt_out != model.config.pad_id
    head = model.lm_head
    return linear_cross_entropy(
        h[keep], head.weight, head.bias, batch.tgt_out[keep], label_smoothing
    )
