"""Times the SD1.5 UNet run eagerly in Python (our model definitions, the weights of a given unet.pt),
for the benchmark baseline. Prints one JSON object: {"B×S": seconds per forward, ...}.

    /usr/bin/python3 bench/py/unet_eager.py DIR SIZES BATCHES REPS [--scripted] [--unsliced]

--unsliced: attention without query slicing (MathCore.chunk_elems = ∞), i.e. the full score matrix as
diffusers' AttnProcessor computes it on a torch without SDPA: the reference-like baseline.
"""
import json, os, sys, time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from weights.unet import UNet2DConditionModel  # noqa: E402

d, sizes, batches, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
scripted = '--scripted' in sys.argv
unsliced = '--unsliced' in sys.argv
if scripted and unsliced:
    sys.exit('--unsliced needs the eager model')
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', os.cpu_count() or 1)))
if os.path.exists(os.path.join(d, 'model.json')):  # a weights/export.py folder
    with open(os.path.join(d, 'model.json')) as f:
        cfg = json.load(f)['configs']['unet']
else:  # legacy unet-only folder
    with open(os.path.join(d, 'unet.json')) as f:
        cfg = json.load(f)
ts = torch.jit.load(os.path.join(d, 'unet.pt'))
if scripted:
    model = ts
else:
    model = UNet2DConditionModel(cfg).eval()
    model.load_state_dict(ts.state_dict(), strict=True)
    if unsliced:
        from weights.blocks import MathCore  # noqa: E402
        for mod in model.modules():
            if isinstance(mod, MathCore):
                mod.chunk_elems = 1 << 62
del ts
out = {}
ctx = cfg.get('cross_attention_dim', 768)
with torch.inference_mode():
    for s in [int(x) for x in sizes.split(',')]:
        for b in [int(x) for x in batches.split(',')]:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, 4, s // 8, s // 8, generator=g)
            e = torch.randn(b, 77, ctx, generator=g)
            t = torch.tensor([51])
            model(x, t, e, ['up-level1-upsampler-out'], None, None)  # warm-up
            t0 = time.perf_counter()
            for _ in range(reps):
                model(x, t, e, ['up-level1-upsampler-out'], None, None)
            out[f'{b}x{s}'] = (time.perf_counter() - t0) / reps
print(json.dumps(out))
