"""Shared TorchScript helpers of GATE's trained heads (weights/heads/*.py).

Conventions every head template follows (the native trainer, src/train.cc, relies on them):
- every parameter and buffer is a top-level attribute, so the trainer can replace it with a tensor of the
  shape the run needs (`configure` returns those shapes, `init_rule` says how to fill each one);
- `loss(data: List[Tensor], idx: Tensor, noise: Tensor) -> Tensor`: the training loss of one mini-batch;
  `data` is the run's constant data, `idx` the batch's item indices, `noise` uniform [0, 1) samples of
  `noise_shape(batch)` drawn from the run's seeded generator (dropout masks come from it, so a run is
  reproducible and a Python reference can replay it exactly);
- `after_step(step: int, loss: float, u: Tensor)` (u: 4 uniforms from the same generator) updates
  per-step state such as the sparsity coefficient's random walk.
"""
from typing import List, Tuple

import torch
from torch import Tensor, nn


def walk(step: int, loss: float, u: Tensor, s: float, s_last: float, record: float, check_loss: float,
         period: int, delta: float, decay: float, accept: float) -> Tuple[float, float, float, float]:
    """One step of the sparsity coefficient's random walk (docs/method.md §Amalgamation and heads).

    Every `period` steps: the record decays (×decay); the improvement of the loss since the last check is
    compared with it; when it beats the record (which then becomes the improvement), or at random with
    probability `accept` (u[0] < accept), the current s is kept as the new base s_last; then a candidate
    s = max(0, s_last + choice{-delta, 0, +delta}) is drawn (u[1] picks the choice). Returns the new
    (s, s_last, record, check_loss); check_loss < 0 means "no check yet".
    """
    if step % period != 0:
        return s, s_last, record, check_loss
    record = record * decay
    improvement = 0.0
    if check_loss >= 0.0:
        improvement = check_loss - loss
    beat = improvement > record
    if beat:
        record = improvement
    if beat or float(u[0].item()) < accept:
        s_last = s
    k = int(float(u[1].item()) * 3.0)
    if k > 2:
        k = 2
    s = s_last + float(k - 1) * delta
    if s < 0.0:
        s = 0.0
    return s, s_last, record, loss


def regularised(loss: Tensor, p: Tensor, s: float) -> Tensor:
    """GATE's sparsity-regularised loss: loss - s·loss.detach()·P/P.detach() (value loss·(1-s))."""
    if s == 0.0:
        return loss
    return loss - s * loss.detach() * p / p.detach()


def dropout(x: Tensor, u: Tensor, p: float) -> Tensor:
    """Dropout with a given uniform draw u (same shape as x): keeps x/(1-p) where u >= p."""
    return x * (u >= p).to(x.dtype) * (1.0 / (1.0 - p))


def bn(h: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, training: bool) -> Tensor:
    """BatchNorm over dim 1 of h [M, N, A] per member (w, b, rm, rv [M, A], possibly strided views).

    Training: batch statistics (biased variance), running stats updated in place with momentum 0.1
    (unbiased variance), as nn.BatchNorm1d; eval: running stats. eps 1e-5.
    """
    if training:
        n = h.size(1)
        mean = h.mean(1)
        var = h.var(1, unbiased=False)
        rm.mul_(0.9).add_(mean.detach() * 0.1)
        rv.mul_(0.9).add_(var.detach() * (0.1 * n / max(n - 1, 1)))
        y = (h - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + 1e-5)
    else:
        y = (h - rm.unsqueeze(1)) * torch.rsqrt(rv.unsqueeze(1) + 1e-5)
    return y * w.unsqueeze(1) + b.unsqueeze(1)


def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per-member linear layer: x [M, N, in], w [M, out, in], b [M, out] -> [M, N, out].

    One member (training) is a plain addmm, as nn.Linear: CPU bmm of one batch was ~2x slower."""
    if x.size(0) == 1:
        return torch.addmm(b[0], x[0], w[0].t()).unsqueeze(0)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def bilinear_pixels(feats: Tensor, img: Tensor, y: Tensor, x: Tensor, out_h: int, out_w: int) -> Tensor:
    """Feature vectors at output pixels (y, x) of images `img`, as F.interpolate(mode='bilinear',
    align_corners=False) to (out_h, out_w) would give them, without upsampling whole maps.

    feats: [I, h, w, D] (channels last); img, y, x: int64 [B]. Returns [B, D].
    """
    h = feats.size(1)
    w = feats.size(2)
    sy = ((y.to(torch.float32) + 0.5) * (float(h) / float(out_h)) - 0.5).clamp(min=0.0)
    sx = ((x.to(torch.float32) + 0.5) * (float(w) / float(out_w)) - 0.5).clamp(min=0.0)
    y0 = sy.floor().to(torch.int64)
    x0 = sx.floor().to(torch.int64)
    ly = (sy - y0.to(torch.float32)).unsqueeze(1)
    lx = (sx - x0.to(torch.float32)).unsqueeze(1)
    y1 = (y0 + 1).clamp(max=h - 1)
    x1 = (x0 + 1).clamp(max=w - 1)
    d = feats.size(3)
    flat = feats.reshape(-1, d)
    base = img * (h * w)
    # one gather of the 4 corners and one weighted sum (few large element-wise passes: each one is an
    # OpenMP region, and the 12-op form cost more per step than the classifier's matrix products)
    corners = torch.stack([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1], 1)
    v = flat.index_select(0, corners.reshape(-1)).reshape(-1, 4, d)
    wts = torch.cat([(1.0 - ly) * (1.0 - lx), (1.0 - ly) * lx, ly * (1.0 - lx), ly * lx], 1)  # [B, 4]
    return torch.bmm(wts.unsqueeze(1), v).squeeze(1)


def source_sha256(paths: List[str]) -> str:
    import hashlib
    h = hashlib.sha256()
    for p in paths:
        with open(p, 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


class HeadBase(nn.Module):
    """What every head shares: the recorded feature names and the sparsity coefficient's random walk."""
    feature_names: List[str]

    def __init__(self):
        super().__init__()
        self.feature_names = []
        self.s = 0.0
        self.s_last = 0.0
        self.record = 0.0
        self.check_loss = -1.0
        self.s_period = 5
        self.s_delta = 1e-5
        self.s_decay = 0.9
        self.s_accept = 0.05
        self.dropout_p = 0.5

    @torch.jit.export
    def after_step(self, step: int, loss: float, u: Tensor) -> None:
        self.s, self.s_last, self.record, self.check_loss = walk(
            step, loss, u, self.s, self.s_last, self.record, self.check_loss, self.s_period, self.s_delta,
            self.s_decay, self.s_accept)

    @torch.jit.export
    def set_feature_names(self, names: List[str]) -> None:
        """Records which feature-file tensors make the input, in input order (read back at inference)."""
        self.feature_names = names
