"""Baseline for bench/heads.ts: GATE's pixel-classifier training the reference way, in eager PyTorch.

Every feature map is upsampled to the mask size with F.interpolate (bilinear, align_corners=False) and the
pixel vectors are gathered into one [pixels, D] matrix (as GATE's data preparation does), then the
eager reference model (weights/heads/reference.py: nn.Linear/BatchNorm1d, torch.optim.Adam) trains on
mini-batches of 64 for a fixed number of steps. Then an ensemble of `members` copies segments one image.
Prints one JSON object: prepare_s, train_s, steps, pixels_per_s, segment_s, peak_rss_mb.

    python3 bench/py/heads_eager.py DATA.safetensors STEPS MEMBERS BUCKETS CHANNELS MASK
"""
import json
import os
import resource
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from weights import st  # noqa: E402
from weights.heads.reference import PixelClassifierRef  # noqa: E402

path, steps, members, buckets, channels, mask = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', os.cpu_count() or 1)))
torch.manual_seed(0)
d, _ = st.load(path)
feats, pixels, labels = d['features'], d['pixels'], d['labels']
classes = int(labels.max()) + 1

t0 = time.perf_counter()
up = F.interpolate(feats, size=(mask, mask), mode='bilinear', align_corners=False)  # [I, D, H, W]
x_all = up.permute(0, 2, 3, 1)[pixels[:, 0], pixels[:, 1], pixels[:, 2]].contiguous()  # [N, D]
del up
prepare = time.perf_counter() - t0

model = PixelClassifierRef([buckets], [channels], classes)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
g = torch.Generator().manual_seed(1)
n = x_all.shape[0]
perm = torch.randperm(n, generator=g)
t0 = time.perf_counter()
done = 0
start = 0
while done < steps:
    if start + 64 > n:
        perm = torch.randperm(n, generator=g)
        start = 0
    idx = perm[start:start + 64]
    start += 64
    noise = torch.rand([buckets, 1, 64, 128], generator=g)
    opt.zero_grad()
    logits, p = model(x_all[idx], noise)
    loss = F.cross_entropy(logits, labels[idx])
    loss.backward()
    opt.step()
    done += 1
train = time.perf_counter() - t0
train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

# segmentation of one image with an ensemble of `members` classifiers: upsample, classify, vote
model.eval()
ens = [model] * members
t0 = time.perf_counter()
with torch.no_grad():
    x = F.interpolate(feats[:1], size=(mask, mask), mode='bilinear', align_corners=False)[0]
    x = x.reshape(x.shape[0], -1).t()
    votes = torch.zeros(x.shape[0], classes, dtype=torch.int64)
    for m in ens:
        for s in range(0, x.shape[0], 4096):
            pred = m(x[s:s + 4096], torch.empty(0))[0].argmax(1)
            votes[s:s + 4096].scatter_add_(1, pred.unsqueeze(1), torch.ones_like(pred).unsqueeze(1))
    labels_out = votes.argmax(1)
segment = time.perf_counter() - t0
print(json.dumps({'prepare_s': prepare, 'train_s': train, 'steps': steps, 'pixels_per_s': steps * 64 / train, 'segment_s': segment, 'train_rss_mb': train_rss,
                  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
