"""GATE's label-scarce pixel classifier (docs/method.md §Amalgamation and heads) as a TorchScript template.

One pixel's input vector is the concatenation of bucket features: group g has `buckets[g]` buckets of
`channels[g]` channels each (e.g. Horse-21: 4 buckets × 3674 SD channels, and optionally a group of DDPM
buckets), then nothing else. Per group one assigner — Linear(C→A) → ReLU → BN1d(A) → Dropout(0.5) →
Linear(A→C) — is applied to each bucket (a separate BatchNorm batch per bucket); its logits get a
per-channel softmax over the group's buckets and weight the buckets' sum (a group of one bucket passes
through). The fused groups are concatenated and classified by Linear(→h0) → ReLU → BN1d → Linear(h0→h1)
→ ReLU → BN1d → Linear(h1→classes) (h = 128, 32; 256, 128 for ≥ 30 classes).

Every parameter and buffer has a leading *member* dimension: a trained ensemble of M classifiers is the
same module with M members (the native trainer trains members of 1 and stacks them), evaluated as
batched matrix products with a majority vote. Parameter shapes are set at run time by `configure`.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from weights.heads import common
except ImportError:  # run as a script from weights/heads
    import common  # type: ignore


class PixelClassifier(common.HeadBase):
    def __init__(self):
        super().__init__()
        self.kind = 'gate-pixel-classifier'
        self.buckets: List[int] = [1]
        self.channels: List[int] = [1]
        self.hidden: List[int] = [1, 1]
        self.assigner_hidden = 1
        self.classes = 2
        self.members = 1
        self.out_size: List[int] = [1, 1]
        z = torch.zeros(1, 1)
        for name in self._param_names():
            self.register_parameter(name, nn.Parameter(z.clone()))
        for name in self._buffer_names():
            self.register_buffer(name, z.clone())

    @staticmethod
    def _param_names() -> List[str]:
        return ['a_w1', 'a_b1', 'a_bn_w', 'a_bn_b', 'a_w2', 'a_b2',
                'c_w0', 'c_b0', 'c_bn0_w', 'c_bn0_b', 'c_w1', 'c_b1', 'c_bn1_w', 'c_bn1_b', 'c_w2', 'c_b2']

    @staticmethod
    def _buffer_names() -> List[str]:
        return ['a_rm', 'a_rv', 'c_rm0', 'c_rv0', 'c_rm1', 'c_rv1']

    @torch.jit.export
    def configure(self, cfg: Dict[str, List[int]]) -> Dict[str, List[int]]:
        """Sets the configuration and returns the shape of every parameter and buffer (member dim first).

        cfg: buckets, channels (per group), classes [C], members [M], out_size [H, W]; optional hidden
        [h0, h1] and assigner_hidden [A] (defaults 128/32, or 256/128 for ≥ 30 classes; A = 128).
        """
        buckets = cfg['buckets']
        channels = cfg['channels']
        if len(buckets) == 0 or len(buckets) != len(channels):
            raise ValueError('configure: buckets and channels must be non-empty lists of the same length')
        for i in range(len(buckets)):
            if buckets[i] < 1 or channels[i] < 1:
                raise ValueError('configure: every group needs >= 1 bucket of >= 1 channel')
        classes = cfg['classes'][0]
        if classes < 2:
            raise ValueError('configure: at least 2 classes are needed')
        self.buckets = buckets
        self.channels = channels
        self.classes = classes
        self.members = cfg['members'][0]
        self.out_size = cfg['out_size']
        if 'hidden' in cfg:
            self.hidden = cfg['hidden']
        elif classes >= 30:
            self.hidden = [256, 128]
        else:
            self.hidden = [128, 32]
        self.assigner_hidden = cfg['assigner_hidden'][0] if 'assigner_hidden' in cfg else 128
        m = self.members
        a = self.assigner_hidden
        g = len(buckets)
        c = 0
        for ch in channels:
            c += ch
        h0 = self.hidden[0]
        h1 = self.hidden[1]
        return {
            'a_w1': [m, a, c], 'a_b1': [m, g, a], 'a_bn_w': [m, g, a], 'a_bn_b': [m, g, a],
            'a_w2': [m, c, a], 'a_b2': [m, c],
            'c_w0': [m, h0, c], 'c_b0': [m, h0], 'c_bn0_w': [m, h0], 'c_bn0_b': [m, h0],
            'c_w1': [m, h1, h0], 'c_b1': [m, h1], 'c_bn1_w': [m, h1], 'c_bn1_b': [m, h1],
            'c_w2': [m, classes, h1], 'c_b2': [m, classes],
            'a_rm': [m, g, a], 'a_rv': [m, g, a], 'c_rm0': [m, h0], 'c_rv0': [m, h0], 'c_rm1': [m, h1],
            'c_rv1': [m, h1],
        }

    @torch.jit.export
    def init_rule(self, name: str) -> Tuple[str, float]:
        """How the trainer fills a freshly shaped tensor: Linear weights N(0, 0.02), biases 0,
        BatchNorm weight 1 / bias 0, running mean 0 / var 1 (docs/method.md §Amalgamation and heads)."""
        if name in ['a_w1', 'a_w2', 'c_w0', 'c_w1', 'c_w2']:
            return 'normal', 0.02
        if name in ['a_bn_w', 'c_bn0_w', 'c_bn1_w', 'a_rv', 'c_rv0', 'c_rv1']:
            return 'constant', 1.0
        return 'constant', 0.0

    @torch.jit.export
    def input_channels(self) -> int:
        d = 0
        for i in range(len(self.buckets)):
            d += self.buckets[i] * self.channels[i]
        return d

    @torch.jit.export
    def noise_shape(self, batch: int) -> List[int]:
        """Uniforms one training step needs: a dropout draw per bucket over [batch, A] (members = 1)."""
        k = 0
        for b in self.buckets:
            k += b
        return [k, self.members, batch, self.assigner_hidden]

    def _fuse(self, x: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor]:
        """x [M, N, D] -> fused [M, N, sum C] and the sparsity term P (mean L2 norm of the weights)."""
        m = x.size(0)
        n = x.size(1)
        a = self.assigner_hidden
        off = 0
        coff = 0
        k_all = 0
        fused: List[Tensor] = []
        norms: List[Tensor] = []
        for g in range(len(self.buckets)):
            k = self.buckets[g]
            c = self.channels[g]
            xg = x[:, :, off:off + k * c]
            off += k * c
            w1 = self.a_w1[:, :, coff:coff + c]
            w2 = self.a_w2[:, coff:coff + c, :]
            b2 = self.a_b2[:, coff:coff + c]
            logits: List[Tensor] = []
            for j in range(k):
                h = torch.relu(common.linear(xg[:, :, j * c:(j + 1) * c], w1, self.a_b1[:, g]))
                h = common.bn(h, self.a_bn_w[:, g], self.a_bn_b[:, g], self.a_rm[:, g], self.a_rv[:, g], self.training)
                if self.training:
                    h = common.dropout(h, noise[k_all + j], self.dropout_p)
                logits.append(common.linear(h, w2, b2))
            k_all += k
            wts = torch.softmax(torch.stack(logits, 2), dim=2)  # [M, N, K, C]
            fused.append((wts * xg.reshape(m, n, k, c)).sum(2))
            if k > 1:
                norms.append(wts.pow(2).sum(2).sqrt().reshape(-1))
            coff += c
        if len(norms) > 0:
            p = torch.cat(norms).mean()
        else:
            p = torch.ones([], dtype=x.dtype, device=x.device)
        return torch.cat(fused, 2), p

    def _classify(self, f: Tensor) -> Tensor:
        h = torch.relu(common.linear(f, self.c_w0, self.c_b0))
        h = common.bn(h, self.c_bn0_w, self.c_bn0_b, self.c_rm0, self.c_rv0, self.training)
        h = torch.relu(common.linear(h, self.c_w1, self.c_b1))
        h = common.bn(h, self.c_bn1_w, self.c_bn1_b, self.c_rm1, self.c_rv1, self.training)
        return common.linear(h, self.c_w2, self.c_b2)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [M, N, classes] of pixel vectors x [N, D] for every member."""
        xm = x.unsqueeze(0).expand(self.members, x.size(0), x.size(1))
        f, _ = self._fuse(xm, torch.empty(0))
        return self._classify(f)

    @torch.jit.export
    def vote(self, x: Tensor) -> Tensor:
        """Majority vote of the members' argmax labels for pixel vectors x [N, D] -> int64 [N] (ties: lowest label)."""
        pred = self.forward(x).argmax(2)  # [M, N]
        counts = torch.zeros([x.size(0), self.classes], dtype=torch.int64, device=x.device)
        counts.scatter_add_(1, pred.t(), torch.ones_like(pred.t()))
        return counts.argmax(1)

    @torch.jit.export
    def loss(self, data: List[Tensor], idx: Tensor, noise: Tensor) -> Tensor:
        """Training loss of a mini-batch of pixels. data = [pixels int64 [N, 3] (image, y, x at out_size),
        labels int64 [N], features [I, h, w, D] (channels last)]; idx: the batch's rows of pixels."""
        pix = data[0].index_select(0, idx)
        y = data[1].index_select(0, idx)
        x = common.bilinear_pixels(data[2], pix[:, 0], pix[:, 1], pix[:, 2], self.out_size[0], self.out_size[1])
        f, p = self._fuse(x.unsqueeze(0), noise)
        logits = self._classify(f)[0]
        return common.regularised(F.cross_entropy(logits, y), p, self.s)

    @torch.jit.export
    def new_store(self, n: int, h: int, w: int) -> Tensor:
        """Room for n images' features [n, h, w, D] (channels last), filled by `store_image`."""
        return torch.zeros([n, h, w, self.input_channels()])

    @torch.jit.export
    def store_image(self, store: Tensor, i: int, buckets: List[Tensor]) -> None:
        """Writes image i's bucket features (each [C_b, h, w], in input order) into the store."""
        store[i].copy_(torch.cat(buckets, 0).permute(1, 2, 0))

    @torch.jit.export
    def pack(self, buckets: List[Tensor]) -> Tensor:
        """One image's bucket features (each [C_b, h, w], in group order) -> [h, w, D] channels last."""
        return torch.cat(buckets, 0).permute(1, 2, 0).contiguous()

    @torch.jit.export
    def segment(self, feats: Tensor, out_h: int, out_w: int, chunk: int) -> Tensor:
        """Label map int64 [out_h, out_w] of one image's features [h, w, D] (channels last): features are
        bilinearly interpolated (align_corners=False) pixel by pixel, `chunk` pixels at a time."""
        total = out_h * out_w
        out = torch.empty([total], dtype=torch.int64, device=feats.device)
        f = feats.unsqueeze(0)
        start = 0
        while start < total:
            end = min(start + chunk, total)
            p = torch.arange(start, end, dtype=torch.int64, device=feats.device)
            img = torch.zeros_like(p)
            x = common.bilinear_pixels(f, img, torch.div(p, out_w, rounding_mode='floor'), p % out_w, out_h, out_w)
            out[start:end] = self.vote(x)
            start = end
        return out.reshape(out_h, out_w)


def script() -> torch.jit.ScriptModule:
    return torch.jit.script(PixelClassifier().eval())
