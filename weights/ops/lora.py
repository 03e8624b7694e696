"""LoRA merging (docs/method.md §LoRA): W + Σ s·up@down in float64, rounded once.
"""
from typing import List

import torch


def lora_merge(w: torch.Tensor, ups: List[torch.Tensor], downs: List[torch.Tensor],
               scales: List[float]) -> torch.Tensor:
    """W + Σ s·reshape(up.reshape(out, r) @ down.reshape(r, -1), W.shape), in float64, rounded once to
    w.dtype (the caller folds alpha/rank into s). ΔW may differ from W.shape only in trailing 1×1 dims."""
    if len(ups) != len(downs) or len(ups) != len(scales):
        raise ValueError('ops.lora_merge: ups, downs and scales must have the same length')
    acc = w.to(torch.float64)
    for i in range(len(ups)):
        up = ups[i].to(device=w.device, dtype=torch.float64)
        down = downs[i].to(device=w.device, dtype=torch.float64)
        r = down.size(0)
        if up.dim() < 2 or up.size(1) != r or up.numel() != up.size(0) * r:
            raise ValueError('ops.lora_merge: up ' + str(up.shape) + ' does not fit down ' + str(down.shape))
        delta = torch.mm(up.reshape(up.size(0), r), down.reshape(r, -1))
        if delta.numel() != w.numel():
            raise ValueError('ops.lora_merge: delta ' + str(delta.shape) + ' does not fit weight ' + str(w.shape))
        acc = acc + scales[i] * delta.reshape(w.shape)
    return acc.to(w.dtype)
