"""Feature handoff (docs/method.md §Attention, §Packaging): attention aggregation, feature_resize, packaging,
the per-image split to CPU float32, and small batch helpers (rows, cat, repeat_batch).
"""
from typing import Dict, List

import torch
import torch.nn.functional as F


def aggregate_attention(maps: List[torch.Tensor], latent: int, min_q: int, max_q: int) -> torch.Tensor:
    """Per map (B×heads×nq×nk) the head mean, kept when min_q ≤ nq ≤ max_q; maps of equal nq
    (first-seen order) averaged, reshaped to B×nk×h×w, nearest-resized to latent×latent, concatenated."""
    order: List[int] = []
    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, int] = {}
    for mp in maps:
        if mp.dim() != 4:
            raise ValueError('ops.aggregate_attention: maps must be B×heads×nq×nk, got ' + str(mp.shape))
        nq = mp.size(2)
        if nq < min_q or nq > max_q:
            continue
        hm = mp.mean(dim=1)
        if nq in sums:
            sums[nq] = sums[nq] + hm
            counts[nq] = counts[nq] + 1
        else:
            order.append(nq)
            sums[nq] = hm
            counts[nq] = 1
    if len(order) == 0:
        raise ValueError('ops.aggregate_attention: no attention map with min_q ≤ nq ≤ max_q')
    outs: List[torch.Tensor] = []
    for nq in order:
        avg = sums[nq] / counts[nq]
        B = avg.size(0)
        nk = avg.size(2)
        h = int(round(nq ** 0.5))
        if h * h != nq:
            raise ValueError('ops.aggregate_attention: nq is not a square: ' + str(nq))
        g = avg.permute(0, 2, 1).reshape(B, nk, h, h)
        if h != latent:
            g = nearest(g, latent)
        outs.append(g)
    return torch.cat(outs, dim=1)


def nearest(x: torch.Tensor, S: int) -> torch.Tensor:
    # F.interpolate(x, size=[S, S], mode='nearest'); CPU half/bfloat16 (no kernel in torch 1.13) by the same
    # index rule: src = min(floor(dst * (float32) in/out), in - 1)
    if x.device.type != 'cpu' or (x.dtype != torch.float16 and x.dtype != torch.bfloat16):
        return F.interpolate(x, size=[S, S], mode='nearest')
    H = x.size(-2)
    W = x.size(-1)
    iy = torch.floor(torch.arange(S, dtype=torch.float32) * torch.tensor(float(H) / float(S), dtype=torch.float32))
    ix = torch.floor(torch.arange(S, dtype=torch.float32) * torch.tensor(float(W) / float(S), dtype=torch.float32))
    iy = iy.to(torch.long).clamp(max=H - 1)
    ix = ix.to(torch.long).clamp(max=W - 1)
    return x.index_select(-2, iy).index_select(-1, ix)


def feature_resize(x: torch.Tensor, r: int) -> torch.Tensor:
    """FeatureStore feature_resize: adaptive_avg_pool2d over the last two dims to (H//r, W//r)."""
    if r <= 1:
        return x
    return F.adaptive_avg_pool2d(x, [x.size(-2) // r, x.size(-1) // r])


def package(feats: List[torch.Tensor]) -> torch.Tensor:
    """Packaging (the reference's --aggregate_output): F.interpolate(v, S) (nearest) to the largest last-dim size S, concatenated
    on channels in the given order."""
    if len(feats) == 0:
        raise ValueError('ops.package: no features')
    # per-image C×h×w tensors (recipe amalgamation) are packaged like a batch of one
    single = feats[0].dim() == 3
    S = 0
    for f in feats:
        S = max(S, f.size(-1))
    outs: List[torch.Tensor] = []
    for f in feats:
        if (f.dim() == 3) != single:
            raise ValueError('ops.package: mixed C×h×w and B×C×h×w tensors')
        if single:
            f = f.unsqueeze(0)
        if f.size(-1) != S or f.size(-2) != S:
            f = nearest(f, S)
        outs.append(f)
    out = torch.cat(outs, dim=1)
    return out.squeeze(0) if single else out


def split_to_cpu(d: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """Per image i: {key: d[key][i] as a C×h×w float32 contiguous CPU tensor (own storage)}, key order kept."""
    B = -1
    cpu: Dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if B < 0:
            B = v.size(0)
        elif v.size(0) != B:
            raise ValueError('ops.split_to_cpu: batch sizes differ (' + k + ')')
        cpu[k] = v.detach().to(device=torch.device('cpu'), dtype=torch.float32)
    out: List[Dict[str, torch.Tensor]] = []
    for i in range(max(B, 0)):
        di: Dict[str, torch.Tensor] = {}
        for k, v in cpu.items():
            di[k] = v[i].clone(memory_format=torch.contiguous_format)
        out.append(di)
    return out


def rows(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    if start < 0 or n < 0 or start + n > x.size(0):
        raise ValueError('ops.rows: rows ' + str(start) + '..' + str(start + n) + ' out of range for ' + str(x.size(0)))
    return x.narrow(0, start, n).contiguous()


def cat(xs: List[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(xs, dim=dim)


def repeat_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    reps: List[int] = [n]
    for _ in range(x.dim() - 1):
        reps.append(1)
    return x.repeat(reps)
