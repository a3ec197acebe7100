"""The LM head and its loss in row chunks, in plain torch: the CPU training path of ``linear_cross_entropy``.

``cross_entropy(h @ W.T, targets)`` through autograd allocates the [N, V] logits, their log-softmax, a zero-filled
[N, V] gradient for the NLL and the log-softmax's [N, V] gradient: at vocab 8192 and 2048 tokens that is four
64 MiB tensors, written and read in passes that cost a third of a d128 model's step (measured with
torch.profiler). Here the forward pass of the loss also computes both gradients, a chunk of rows at a time, so
the [chunk, V] logits stay in cache and are turned into the softmax and then the gradient in place:

    logits = h_c W^T;  p = exp(logits - lse);  p[i, t_i] -= 1;  dh_c = p W;  dW += p^T h_c

The backward pass only scales the saved dh and dW by the incoming gradient / the number of counted tokens. The
matmuls are the three autograd would do, so the FLOPs are unchanged. fp32 only (the CPU training dtype): other
dtypes and autocast take the reference.
"""

import torch


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: about 16 MiB of fp32 logits (512 rows at vocab 8192), at least 128 rows so the matmuls stay
    efficient. Measured at vocab 8192, d 128 and 512 (fwd + bwd, 2048 rows): 128 to 2048 rows all beat the
    unchunked reference (0.7-0.9x of its time); 256-512 were fastest."""
    return max(128, min(1024, (1 << 22) // max(1, vocab)))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        n, rows = h.shape[0], chunk_rows(weight.shape[0])
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)[:, None]
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, n, rows):
            hc, tc, vc = h[s:s + rows], safe_targets[s:s + rows], valid[s:s + rows]
            logits = hc @ weight.T
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, tc).squeeze(1)
            total = total + torch.where(vc, lse - picked, 0.0).sum()
            if need_dh or need_dw:
                # softmax in place; an ignored row gets lse = inf, so its probabilities (and gradient) are 0.
                probs = logits.sub_(torch.where(vc, lse, torch.inf)[:, None]).exp_()
                probs.scatter_add_(1, tc, -vc[:, None].to(probs.dtype))
                if need_dh:
                    torch.mm(probs, weight, out=dh[s:s + rows])
                if need_dw:
                    dw.addmm_(probs.T, hc)
        count = valid.sum()
        ctx.save_for_backward(dh, dw, count)
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw, count = ctx.saved_tensors
        scale = grad / count
        return (None if dh is None else dh * scale), (None if dw is None else dw * scale), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of h @ weight.T over the targets that are not ``ignore_index`` (h [N, D] fp32,
    weight [V, D] fp32, targets [N]); the same value and gradients as the reference, to fp32 rounding."""
    return LinearCrossEntropy.apply(h, weight, targets, ignore_index)
