"""GATE's amalgamation network for correspondence (docs/method.md §Amalgamation and heads, `AggregationNetwork(3520, 154)`) as a
TorchScript template.

Input x [B, K·C + E, h, w]: K buckets of C channels, then E pass-through channels (the attention
feature). One assigner shared over buckets — Conv3×3(C→A, pad 1, no bias) → ReLU → BN2d(A) →
Dropout(0.5) → global average pool → Linear(A→C) — gives per image and bucket one logit per channel;
a per-channel softmax over the buckets weights their sum; the result is concatenated with the
pass-through channels, optionally followed by Conv3×3(C+E→C+E, no bias) (setting `conv`; `nn`: none).
Setting scalar_weights (the paper's Eq. 3–4 instead of the code's per-channel weights): Linear(A→1), one weight
per image and bucket, softmax over the buckets.
Training loss: symmetric CLIP-style cross-entropy between the keypoints of a pair (docs/method.md §Correspondence), with the
sparsity regulariser of docs/method.md §Amalgamation and heads. Parameter shapes are set at run time by `configure`.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from weights.heads import common
except ImportError:  # run as a script from weights/heads
    import common  # type: ignore


class Amalgamation(common.HeadBase):
    def __init__(self):
        super().__init__()
        self.kind = 'gate-amalgamation'
        self.buckets = 1
        self.channels = 1
        self.extra = 0
        self.assigner_hidden = 1
        self.output_conv = 0
        self.scalar_weights = 0
        self.grid: List[int] = [1, 1]
        self.temperature = 0.07
        z = torch.zeros(1)
        for name in ['conv_w', 'bn_w', 'bn_b', 'fc_w', 'fc_b', 'out_w']:
            self.register_parameter(name, nn.Parameter(z.clone()))
        self.register_buffer('bn_rm', z.clone())
        self.register_buffer('bn_rv', z.clone())

    @torch.jit.export
    def configure(self, cfg: Dict[str, List[int]]) -> Dict[str, List[int]]:
        """cfg: buckets [K], channels [C], extra [E], grid [h, w] (feature size); optional assigner_hidden [A]
        (128), output_conv [0|1], scalar_weights [0|1] (the paper's one weight per bucket; default 0: per channel)."""
        k = cfg['buckets'][0]
        c = cfg['channels'][0]
        e = cfg['extra'][0] if 'extra' in cfg else 0
        if k < 1 or c < 1 or e < 0:
            raise ValueError('configure: need >= 1 bucket of >= 1 channel and >= 0 extra channels')
        self.buckets = k
        self.channels = c
        self.extra = e
        self.assigner_hidden = cfg['assigner_hidden'][0] if 'assigner_hidden' in cfg else 128
        self.output_conv = cfg['output_conv'][0] if 'output_conv' in cfg else 0
        self.scalar_weights = cfg['scalar_weights'][0] if 'scalar_weights' in cfg else 0
        self.grid = cfg['grid']
        a = self.assigner_hidden
        d = c + e
        w = 1 if self.scalar_weights != 0 else c
        return {'conv_w': [a, c, 3, 3], 'bn_w': [a], 'bn_b': [a], 'fc_w': [w, a], 'fc_b': [w],
                'out_w': [d, d, 3, 3] if self.output_conv != 0 else [0], 'bn_rm': [a], 'bn_rv': [a]}

    @torch.jit.export
    def init_rule(self, name: str) -> Tuple[str, float]:
        """Conv/Linear weights N(0, 0.02), biases 0 (docs/method.md §Amalgamation and heads), BatchNorm weight 1, running var 1."""
        if name in ['conv_w', 'fc_w', 'out_w']:
            return 'normal', 0.02
        if name in ['bn_w', 'bn_rv']:
            return 'constant', 1.0
        return 'constant', 0.0

    @torch.jit.export
    def input_channels(self) -> int:
        return self.buckets * self.channels + self.extra

    @torch.jit.export
    def noise_shape(self, batch: int) -> List[int]:
        """Dropout draws of one pair (batch = 1 pair): [K, 2, A, h, w]."""
        return [self.buckets, 2 * batch, self.assigner_hidden, self.grid[0], self.grid[1]]

    def _fuse(self, x: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor]:
        b = x.size(0)
        k = self.buckets
        c = self.channels
        logits: List[Tensor] = []
        for j in range(k):
            h = torch.relu(F.conv2d(x[:, j * c:(j + 1) * c], self.conv_w, None, 1, 1))
            h = F.batch_norm(h, self.bn_rm, self.bn_rv, self.bn_w, self.bn_b, self.training, 0.1, 1e-5)
            if self.training and noise.numel() > 0:
                h = common.dropout(h, noise[j], self.dropout_p)
            logits.append(F.linear(h.mean([2, 3]), self.fc_w, self.fc_b))
        wts = torch.softmax(torch.stack(logits, 1), dim=1)  # [B, K, C] (scalar_weights: [B, K, 1])
        r = x[:, :k * c].reshape(b, k, c, x.size(2), x.size(3))
        fused = (wts.unsqueeze(3).unsqueeze(4) * r).sum(1)
        if self.extra > 0:
            fused = torch.cat([fused, x[:, k * c:]], 1)
        if self.output_conv != 0:
            fused = F.conv2d(fused, self.out_w, None, 1, 1)
        p = wts.pow(2).sum(1).sqrt().mean() if k > 1 else torch.ones([], dtype=x.dtype, device=x.device)
        return fused, p

    def forward(self, x: Tensor) -> Tensor:
        """Amalgamated features [B, C+E, h, w] of x [B, K·C+E, h, w]."""
        f, _ = self._fuse(x, torch.empty(0))
        return f

    @torch.jit.export
    def amalgamate(self, x: Tensor) -> Tensor:
        """Amalgamated feature [C+E, h, w] of one image's packed input [K·C+E, h, w]."""
        return self.forward(x.unsqueeze(0))[0]

    @torch.jit.export
    def loss(self, data: List[Tensor], idx: Tensor, noise: Tensor) -> Tensor:
        """Symmetric CLIP-style loss of one pair. data = [pairs int64 [P, 2] (image indices), keypoints
        int64 [P, Kmax, 2] (flat source / target positions on the h×w grid), counts int64 [P], then one
        feature tensor [K·C+E, h, w] per image]; idx: one pair index."""
        p = int(idx[0].item())
        a = int(data[0][p, 0].item())
        b = int(data[0][p, 1].item())
        x = torch.stack([data[3 + a], data[3 + b]], 0)
        n = int(data[2][p].item())
        kp = data[1][p, :n]
        f, reg = self._fuse(x, noise)
        d = f.size(1)
        f1 = f[0].reshape(d, -1)
        f2 = f[1].reshape(d, -1)
        f1 = f1 / f1.pow(2).sum(0, keepdim=True).sqrt()
        f2 = f2 / f2.pow(2).sum(0, keepdim=True).sqrt()
        src = kp[:, 0]
        tgt = kp[:, 1]
        l12 = f1.index_select(1, src).t().mm(f2) / self.temperature
        l21 = f2.index_select(1, tgt).t().mm(f1) / self.temperature
        loss = 0.5 * (F.cross_entropy(l12, tgt) + F.cross_entropy(l21, src))
        return common.regularised(loss, reg, self.s)

    @torch.jit.export
    def pack(self, buckets: List[Tensor]) -> Tensor:
        """One image's bucket features (each [C_b, h, w]: K buckets, then the pass-through) -> [K·C+E, h, w]."""
        return torch.cat(buckets, 0).contiguous()


def script() -> torch.jit.ScriptModule:
    return torch.jit.script(Amalgamation().eval())
