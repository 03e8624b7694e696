"""The ControlNet's canny control image (docs/method.md §ControlNet): a port of OpenCV 4.6 `cv2.Canny`
(apertureSize 3, L1 gradient) that is integer-exact on uint8 RGB, device-agnostic, and the [0, 1] 3-channel image
the ControlNet is conditioned on.
"""
import math

import torch
import torch.nn.functional as F


def canny(u8: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(img, low, high) (apertureSize 3, L2gradient False) on B×H×W×C uint8 images (channels in
    the given order; C = 3 for RGB) → B×H×W uint8 0/255. Port of OpenCV 4.6 canny.cpp, exact (integer
    values held in float32, every product and comparison below is exact there):
    Sobel 3×3 with BORDER_REPLICATE; per pixel the first channel with the largest |dx|+|dy| (strict >);
    non-maximum suppression with OpenCV's fixed-point tan(22.5°)/tan(67.5°) tests and its strict/non-strict
    comparisons (magnitude outside the image = 0); thresholds m > floor(low) and m > floor(high) (swapped
    when low > high); hysteresis = 8-connectivity from strong pixels through weak ones."""
    if u8.dim() != 4:
        raise ValueError('ops.canny: expected B×H×W×C uint8, got ' + str(u8.shape))
    if u8.dtype != torch.uint8:
        raise ValueError('ops.canny: expected uint8 input')
    if low > high:
        tmp = low
        low = high
        high = tmp
    lo = float(math.floor(low))
    hi = float(math.floor(high))
    B = u8.size(0)
    H = u8.size(1)
    W = u8.size(2)
    C = u8.size(3)
    x = u8.permute(0, 3, 1, 2).to(torch.float32)          # B×C×H×W, integers 0..255
    p = F.pad(x, [1, 1, 1, 1], mode='replicate')
    # OpenCV Sobel kernels (correlation): dx = [-1 0 1; -2 0 2; -1 0 1], dy = its transpose (separable)
    vs = p[:, :, 0:H, :] + 2.0 * p[:, :, 1:H + 1, :] + p[:, :, 2:H + 2, :]     # B×C×H×(W+2)
    dxs = vs[:, :, :, 2:W + 2] - vs[:, :, :, 0:W]
    hs = p[:, :, :, 0:W] + 2.0 * p[:, :, :, 1:W + 1] + p[:, :, :, 2:W + 2]     # B×C×(H+2)×W
    dys = hs[:, :, 2:H + 2, :] - hs[:, :, 0:H, :]
    mags = dxs.abs() + dys.abs()
    # per pixel the channel with the largest magnitude; ties keep the earlier channel
    m = mags[:, 0]
    sel = torch.zeros([B, H, W], dtype=torch.long, device=u8.device)
    for c in range(1, C):
        better = mags[:, c] > m
        m = torch.where(better, mags[:, c], m)
        sel = torch.where(better, torch.full_like(sel, c), sel)
    if C > 1:
        dx = dxs.gather(1, sel.unsqueeze(1)).squeeze(1)
        dy = dys.gather(1, sel.unsqueeze(1)).squeeze(1)
    else:
        dx = dxs[:, 0]
        dy = dys[:, 0]
    # neighbours' magnitudes, 0 outside the image (OpenCV's zeroed ring-buffer borders)
    mp = F.pad(m.unsqueeze(1), [1, 1, 1, 1]).squeeze(1)
    ax = dx.abs()
    ay = dy.abs()
    # OpenCV: x = |dx|, y = |dy| << 15, TG22 = 13573 (tan 22.5° in Q15), tg67x = x*TG22 + (x << 16):
    #   horizontal: y < x*TG22;  vertical: y > tg67x ⟺ (|dy| - 2|dx|)·2^15 > |dx|·TG22
    t22 = ax * 13573.0
    horiz = ay * 32768.0 < t22
    vert = (~horiz) & ((ay - 2.0 * ax) * 32768.0 > t22)
    diag = (~horiz) & (~vert)
    keep_h = (m > mp[:, 1:H + 1, 0:W]) & (m >= mp[:, 1:H + 1, 2:W + 2])
    keep_v = (m > mp[:, 0:H, 1:W + 1]) & (m >= mp[:, 2:H + 2, 1:W + 1])
    same_sign = (dx < 0) == (dy < 0)                      # (xs ^ ys) >= 0 → s = 1
    keep_d = torch.where(same_sign, (m > mp[:, 0:H, 0:W]) & (m > mp[:, 2:H + 2, 2:W + 2]),
                         (m > mp[:, 0:H, 2:W + 2]) & (m > mp[:, 2:H + 2, 0:W]))
    nms = torch.where(horiz, keep_h, torch.where(vert, keep_v, keep_d))
    cand = nms & (m > lo)
    strong = cand & (m > hi)
    return hysteresis(strong, cand).to(torch.uint8) * 255


def hysteresis(strong: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    # 8-connected components of the candidate pixels (sparse: min-label propagation + pointer jumping),
    # keeping the components that contain a strong pixel — what OpenCV's stack-based tracing yields.
    B = cand.size(0)
    H = cand.size(1)
    W = cand.size(2)
    dev = cand.device
    flat = cand.reshape(-1)
    idx = torch.nonzero(flat).squeeze(1)
    K = idx.numel()
    out = torch.zeros([B * H * W], dtype=torch.uint8, device=dev)
    if K == 0:
        return out.reshape(B, H, W) > 0
    ar = torch.arange(K, dtype=torch.long, device=dev)
    inner = torch.full([B * H * W], -1, dtype=torch.long, device=dev)
    inner.index_copy_(0, idx, ar)
    ids = F.pad(inner.reshape(B, 1, H, W), [1, 1, 1, 1], value=-1.0).reshape(-1)   # −1 border
    Wp = W + 2
    b = torch.div(idx, H * W, rounding_mode='floor')
    rem = idx - b * (H * W)
    y = torch.div(rem, W, rounding_mode='floor')
    xx = rem - y * W
    base = b * ((H + 2) * Wp) + (y + 1) * Wp + (xx + 1)
    offs = torch.tensor([-Wp - 1, -Wp, -Wp + 1, -1, 1, Wp - 1, Wp, Wp + 1], dtype=torch.long, device=dev)
    nb = ids[base.unsqueeze(1) + offs.unsqueeze(0)]                                # K×8, −1 = none
    valid = nb >= 0
    eu = ar.unsqueeze(1).expand(K, 8)[valid]                 # both directions of every 8-neighbour edge
    ev = nb[valid]
    # hook-and-compress (Shiloach–Vishkin style): a parent always has a smaller id and only ever decreases,
    # so this stays a forest; concurrent hooks may land in any order (which root wins does not change the
    # partition). At the fixed point (all trees stars, no hook left) every edge joins nodes of one root.
    lab = ar
    while True:
        pu = lab[eu]
        pv = lab[ev]
        hook = pv < lab[pu]
        new = lab.index_put((pu[hook],), pv[hook])
        while True:
            nn = new[new]
            if bool(torch.equal(nn, new)):
                break
            new = nn
        if bool(torch.equal(new, lab)):
            break
        lab = new
    root_strong = torch.zeros([K], dtype=torch.uint8, device=dev)
    sidx = torch.nonzero(strong.reshape(-1)[idx]).squeeze(1)
    root_strong.index_fill_(0, lab[sidx], 1)
    keep = root_strong[lab] > 0
    out.index_fill_(0, idx[keep], 1)
    return out.reshape(B, H, W) > 0


def control_image(edges: torch.Tensor) -> torch.Tensor:
    """B×H×W uint8 edges → B×3×H×W float32 in [0, 1] (replicated to 3 channels, /255)."""
    if edges.dim() != 3:
        raise ValueError('ops.control_image: expected B×H×W uint8, got ' + str(edges.shape))
    x = edges.to(torch.float32) / 255.0
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
