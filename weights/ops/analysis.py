"""Analysis helpers: PCA to RGB (docs/method.md §Visualisation), the Laplacian map of the GATE score
(§GATE score) and nearest-neighbour correspondence (§Correspondence).
"""
import torch
import torch.nn.functional as F


def pca_rgb(x: torch.Tensor) -> torch.Tensor:
    """C×H×W → H×W×3 uint8. Mean-centred PCA with 3 components (sklearn sign convention: svd_flip,
    u-based), per-component min–max to [0, 1] over the image, ×255, truncated to uint8. float64 maths:
    exact (Gram eigendecomposition) when min(H·W, C) ≤ 2048, else a deterministic block power iteration
    (sklearn itself uses randomized SVD at these sizes)."""
    if x.dim() != 3:
        raise ValueError('ops.pca_rgb: expected C×H×W, got ' + str(x.shape))
    C = x.size(0)
    H = x.size(1)
    W = x.size(2)
    X = x.reshape(C, H * W).t().to(torch.float64)         # N×C
    X = X - X.mean(dim=0, keepdim=True)
    N = H * W
    k = min(3, min(N, C))
    if min(N, C) <= 2048:
        # exact: eigenvectors of the smaller Gram matrix
        if C <= N:
            evals, V = torch.linalg.eigh(X.t().mm(X))       # ascending
            T = X.mm(V[:, C - k:].flip(1))                 # = U·S
        else:
            evals, U = torch.linalg.eigh(X.mm(X.t()))
            T = U[:, N - k:].flip(1) * evals[N - k:].flip(0).clamp_min(0.0).sqrt().unsqueeze(0)
    else:
        # deterministic block power iteration (pseudo-random start from an index hash), Rayleigh–Ritz
        p = k + 13
        idx = torch.arange(C * p, dtype=torch.float64, device=X.device)
        G = torch.frac(torch.sin(idx * 12.9898 + 78.233) * 43758.5453) - 0.5
        Q, R0 = torch.linalg.qr(X.t().mm(X.mm(G.reshape(C, p))))
        for it in range(16):
            Q, R0 = torch.linalg.qr(X.t().mm(X.mm(Q)))
        U, S, Vh = torch.linalg.svd(X.mm(Q), full_matrices=False)
        T = U[:, :k] * S[:k].unsqueeze(0)
    # svd_flip(u_based_decision=True): the largest-|u| entry of each component is made positive
    am = T.abs().argmax(dim=0)
    signs = torch.sign(T.gather(0, am.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    T = T * signs.unsqueeze(0)                              # N×k transformed
    if k < 3:
        T = torch.cat([T, torch.zeros(N, 3 - k, dtype=torch.float64, device=X.device)], dim=1)
    mn = T.min(dim=0, keepdim=True)[0]
    mx = T.max(dim=0, keepdim=True)[0]
    rng = mx - mn
    scaled = torch.where(rng > 0, (T - mn) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(T))
    return (scaled * 255).to(torch.uint8).reshape(H, W, 3)


def pad_replicate(x: torch.Tensor) -> torch.Tensor:
    # replicate-pad the last two dims by 1 (any dtype)
    x = torch.cat([x[..., :1, :], x, x[..., -1:, :]], dim=-2)
    return torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)


def laplacian_map(x: torch.Tensor) -> torch.Tensor:
    """m(F) of the GATE score: per-channel 4-neighbour Laplacian [[0,1,0],[1,-4,1],[0,1,0]] with replicate padding,
    L2 norm over channels → H×W float32."""
    if x.dim() != 3:
        raise ValueError('ops.laplacian_map: expected C×H×W, got ' + str(x.shape))
    f = x.to(torch.float32)
    H = f.size(1)
    W = f.size(2)
    p = pad_replicate(f)
    lap = p[:, 0:H, 1:W + 1] + p[:, 2:H + 2, 1:W + 1] + p[:, 1:H + 1, 0:W] + p[:, 1:H + 1, 2:W + 2] - 4 * f
    return (lap * lap).sum(dim=0).sqrt()


def correspondence(f1: torch.Tensor, f2: torch.Tensor, src_yx: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest neighbour: both maps bilinearly upsampled to size×size (align_corners False); source
    index = size·round(clip(y, 0, size-1)) + round(clip(x, 0, size-1)) (half to even); cosine similarity
    against every target pixel; hard argmax → N×2 float32 (y, x), in the size×size space of src_yx.
    Channels are processed in chunks so memory stays bounded (no C×size² tensor)."""
    if f1.dim() != 3 or f2.dim() != 3 or f1.size(0) != f2.size(0):
        raise ValueError('ops.correspondence: f1, f2 must be C×h×w with equal C')
    if src_yx.dim() != 2 or src_yx.size(1) != 2:
        raise ValueError('ops.correspondence: src_yx must be N×2')
    dev = f2.device
    C = f1.size(0)
    S = size
    pts = src_yx.to(device=dev, dtype=torch.float32)
    yy = torch.round(torch.clamp(pts[:, 0], 0.0, float(S - 1))).to(torch.long)
    xx = torch.round(torch.clamp(pts[:, 1], 0.0, float(S - 1))).to(torch.long)
    src_idx = yy * S + xx
    N = src_idx.size(0)
    chunk = max(1, min(C, (1 << 24) // max(1, S * S)))
    # pass 1: source descriptors (N×C) and target squared norms (S²)
    desc = torch.zeros(N, C, dtype=torch.float32, device=dev)
    norm2 = torch.zeros(S * S, dtype=torch.float32, device=dev)
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        u1 = F.interpolate(f1[c0:c1].to(device=dev, dtype=torch.float32).unsqueeze(0), size=[S, S],
                           mode='bilinear', align_corners=False)[0].reshape(c1 - c0, S * S)
        desc[:, c0:c1] = u1.index_select(1, src_idx).t()
        u2 = F.interpolate(f2[c0:c1].to(torch.float32).unsqueeze(0), size=[S, S], mode='bilinear',
                           align_corners=False)[0].reshape(c1 - c0, S * S)
        norm2 = norm2 + (u2 * u2).sum(dim=0)
    desc = desc / (desc * desc).sum(dim=1, keepdim=True).sqrt()
    tnorm = norm2.sqrt()
    out = torch.zeros(N, 2, dtype=torch.float32, device=dev)
    kchunk = 256
    for k0 in range(0, N, kchunk):
        k1 = min(N, k0 + kchunk)
        sim = torch.zeros(k1 - k0, S * S, dtype=torch.float32, device=dev)
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            u2 = F.interpolate(f2[c0:c1].to(torch.float32).unsqueeze(0), size=[S, S], mode='bilinear',
                               align_corners=False)[0].reshape(c1 - c0, S * S)
            sim = sim + desc[k0:k1, c0:c1].mm(u2)
        best = (sim / tnorm.unsqueeze(0)).argmax(dim=1)
        out[k0:k1, 0] = torch.div(best, S, rounding_mode='floor').to(torch.float32)
        out[k0:k1, 1] = (best % S).to(torch.float32)
    return out
