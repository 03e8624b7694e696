"""Eager PyTorch reference of GATE's pixel classifier training (docs/method.md §Amalgamation and heads), written from the spec with
plain nn.Linear / nn.BatchNorm1d modules, torch.optim.Adam and F.interpolate (no TorchScript, no shared
code with the templates). It replays a run of the native trainer (src/train.cc) draw for draw:

- one CPU generator seeded with the run's seed; per epoch `torch.randperm(N)` over the training pixels,
  mini-batches of `batch` in that order (a last batch smaller than `min_batch` is skipped);
- per step `torch.rand(noise_shape)` = the dropout draws (keep where u >= 0.5, scale 2), then the loss,
  backward, Adam step, then `torch.rand(4)` for the sparsity coefficient's random walk;
- DatasetGAN's early stopping (after epoch `early_stop_after`, stop once the batch loss has not beaten
  its best for more than `patience` consecutive steps).

Features are upsampled with F.interpolate(mode='bilinear', align_corners=False) to the mask size, as
GATE does, and indexed at the training pixels.

    python3 weights/heads/reference.py --init INIT.pt --data DATA.safetensors --options JSON --out OUT.safetensors

INIT.pt: a configured, untrained head saved by the native side (its member 0 gives the initial
weights); DATA: features [I, D, h, w], pixels [N, 3] (image, y, x), labels [N]; OUT: per-step losses and
the final weights named as in the head (member dim 1).
"""
import argparse
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Assigner(nn.Module):
    def __init__(self, c: int, a: int):
        super().__init__()
        self.fc1 = nn.Linear(c, a)
        self.bn = nn.BatchNorm1d(a)
        self.fc2 = nn.Linear(a, c)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        h = self.bn(torch.relu(self.fc1(x)))
        if self.training:
            h = h * (u >= 0.5).float() * 2.0
        return self.fc2(h)


class PixelClassifierRef(nn.Module):
    def __init__(self, buckets: List[int], channels: List[int], classes: int, a: int = 128, hidden=(128, 32)):
        super().__init__()
        self.buckets = buckets
        self.channels = channels
        self.assigners = nn.ModuleList([Assigner(c, a) for c in channels])
        self.mlp = nn.Sequential(nn.Linear(sum(channels), hidden[0]), nn.ReLU(), nn.BatchNorm1d(hidden[0]),
                                 nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.BatchNorm1d(hidden[1]),
                                 nn.Linear(hidden[1], classes))

    def forward(self, x: Tensor, noise: Tensor):
        off = 0
        kk = 0
        fused, norms = [], []
        for g, (k, c) in enumerate(zip(self.buckets, self.channels)):
            buckets = [x[:, off + j * c: off + (j + 1) * c] for j in range(k)]
            off += k * c
            logits = [self.assigners[g](b, noise[kk + j, 0] if noise.numel() else noise) for j, b in enumerate(buckets)]
            kk += k
            w = torch.softmax(torch.stack(logits, 1), dim=1)  # [N, K, C]
            fused.append((w * torch.stack(buckets, 1)).sum(1))
            if k > 1:
                norms.append(torch.sqrt((w ** 2).sum(1)).reshape(-1))
        p = torch.cat(norms).mean() if norms else torch.ones(())
        return self.mlp(torch.cat(fused, 1)), p

    def load_head(self, sd: Dict[str, Tensor], member: int = 0) -> None:
        """Copies member `member` of a native head's tensors (weights/heads/pixel_classifier.py names)."""
        a = self.assigners[0].fc1.out_features
        coff = 0
        with torch.no_grad():
            for g, c in enumerate(self.channels):
                asg = self.assigners[g]
                asg.fc1.weight.copy_(sd['a_w1'][member, :, coff:coff + c])
                asg.fc1.bias.copy_(sd['a_b1'][member, g])
                asg.bn.weight.copy_(sd['a_bn_w'][member, g])
                asg.bn.bias.copy_(sd['a_bn_b'][member, g])
                asg.bn.running_mean.copy_(sd['a_rm'][member, g])
                asg.bn.running_var.copy_(sd['a_rv'][member, g])
                asg.fc2.weight.copy_(sd['a_w2'][member, coff:coff + c])
                asg.fc2.bias.copy_(sd['a_b2'][member, coff:coff + c])
                coff += c
            for i, (li, bi) in enumerate([(0, 2), (3, 5), (6, -1)]):
                self.mlp[li].weight.copy_(sd['c_w%d' % i][member])
                self.mlp[li].bias.copy_(sd['c_b%d' % i][member])
                if bi >= 0:
                    self.mlp[bi].weight.copy_(sd['c_bn%d_w' % i][member])
                    self.mlp[bi].bias.copy_(sd['c_bn%d_b' % i][member])
                    self.mlp[bi].running_mean.copy_(sd['c_rm%d' % i][member])
                    self.mlp[bi].running_var.copy_(sd['c_rv%d' % i][member])
        del a

    def head_tensors(self) -> Dict[str, Tensor]:
        """This model's weights named and shaped as a 1-member native head."""
        out: Dict[str, List[Tensor]] = {}
        for g, asg in enumerate(self.assigners):
            out.setdefault('a_w1', []).append(asg.fc1.weight)
            out.setdefault('a_w2', []).append(asg.fc2.weight)
            out.setdefault('a_b2', []).append(asg.fc2.bias)
        res = {'a_w1': torch.cat(out['a_w1'], 1), 'a_w2': torch.cat(out['a_w2'], 0), 'a_b2': torch.cat(out['a_b2'], 0)}
        res['a_b1'] = torch.stack([a.fc1.bias for a in self.assigners])
        res['a_bn_w'] = torch.stack([a.bn.weight for a in self.assigners])
        res['a_bn_b'] = torch.stack([a.bn.bias for a in self.assigners])
        res['a_rm'] = torch.stack([a.bn.running_mean for a in self.assigners])
        res['a_rv'] = torch.stack([a.bn.running_var for a in self.assigners])
        for i, (li, bi) in enumerate([(0, 2), (3, 5), (6, -1)]):
            res['c_w%d' % i] = self.mlp[li].weight
            res['c_b%d' % i] = self.mlp[li].bias
            if bi >= 0:
                res['c_bn%d_w' % i] = self.mlp[bi].weight
                res['c_bn%d_b' % i] = self.mlp[bi].bias
                res['c_rm%d' % i] = self.mlp[bi].running_mean
                res['c_rv%d' % i] = self.mlp[bi].running_var
        return {k: v.detach().unsqueeze(0).clone() for k, v in res.items()}


class SparsityWalk:
    """The sparsity coefficient's random walk (docs/method.md §Amalgamation and heads) (same rule as weights/heads/common.py:walk)."""

    def __init__(self, period=5, delta=1e-5, decay=0.9, accept=0.05):
        self.s = self.s_last = self.record = 0.0
        self.check_loss = -1.0
        self.period, self.delta, self.decay, self.accept = period, delta, decay, accept

    def step(self, step: int, loss: float, u: Tensor) -> None:
        if step % self.period:
            return
        self.record *= self.decay
        improvement = self.check_loss - loss if self.check_loss >= 0 else 0.0
        beat = improvement > self.record
        if beat:
            self.record = improvement
        if beat or float(u[0]) < self.accept:
            self.s_last = self.s
        k = min(int(float(u[1]) * 3.0), 2)
        self.s = max(0.0, self.s_last + (k - 1) * self.delta)
        self.check_loss = loss


def train(model: PixelClassifierRef, features: Tensor, pixels: Tensor, labels: Tensor, out_size, seed: int,
          batch: int = 64, max_epochs: int = 100, early_stop_after: int = 3, patience: int = 50, min_batch: int = 2,
          lr: float = 1e-3, assigner_hidden: int = 128):
    up = F.interpolate(features, size=tuple(out_size), mode='bilinear', align_corners=False)  # [I, D, H, W]
    x_all = up[pixels[:, 0], :, pixels[:, 1], pixels[:, 2]]  # [N, D]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    walk = SparsityWalk()
    model.train()
    n = pixels.shape[0]
    k_total = sum(model.buckets)
    losses: List[float] = []
    best, breaks, step, stop = float('inf'), 0, 0, False
    for epoch in range(max_epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            if idx.numel() < min_batch:
                continue
            noise = torch.rand([k_total, 1, idx.numel(), assigner_hidden], generator=g)
            opt.zero_grad()
            logits, p = model(x_all[idx], noise)
            ce = F.cross_entropy(logits, labels[idx])
            loss = ce - walk.s * ce.detach() * p / p.detach() if walk.s != 0.0 else ce
            loss.backward()
            opt.step()
            step += 1
            lv = loss.item()
            losses.append(lv)
            walk.step(step, lv, torch.rand(4, generator=g))
            if epoch > early_stop_after:
                if lv < best:
                    best, breaks = lv, 0
                else:
                    breaks += 1
                    if breaks > patience:
                        stop = True
                        break
        if stop:
            break
    return losses


def main() -> None:
    import json
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from weights import st

    ap = argparse.ArgumentParser(description='Replay a native pixel-classifier run in eager PyTorch')
    ap.add_argument('--init', required=True, help='configured, untrained head saved by the native side')
    ap.add_argument('--data', required=True, help='safetensors: features [I, D, h, w], pixels [N, 3], labels [N]')
    ap.add_argument('--options', required=True, help='JSON: seed, batch, max_epochs, early_stop_after, patience, min_batch, lr')
    ap.add_argument('--out', required=True, help='safetensors: losses [steps] (float64) and the final head tensors')
    a = ap.parse_args()
    torch.set_num_threads(1)
    head = torch.jit.load(a.init)
    sd = {k: v for k, v in list(head.named_parameters()) + list(head.named_buffers())}
    d, _ = st.load(a.data)
    o = json.loads(a.options)
    model = PixelClassifierRef(list(head.buckets), list(head.channels), int(head.classes), int(head.assigner_hidden),
                               tuple(head.hidden))
    model.load_head(sd)
    losses = train(model, d['features'], d['pixels'], d['labels'], list(head.out_size), int(o['seed']),
                   batch=int(o['batch']), max_epochs=int(o['max_epochs']), early_stop_after=int(o['early_stop_after']),
                   patience=int(o['patience']), min_batch=int(o['min_batch']), lr=float(o['lr']),
                   assigner_hidden=int(head.assigner_hidden))
    out = {'losses': torch.tensor(losses, dtype=torch.float64)}
    out.update(model.head_tensors())
    st.save(a.out, out)


if __name__ == '__main__':
    main()
