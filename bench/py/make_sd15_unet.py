"""Writes a full-size SD1.5 UNet (and optionally ControlNet) with random weights, TorchScript-exported
exactly as weights/export.py does, for the benchmarks.

    /usr/bin/python3 bench/py/make_sd15_unet.py OUT_DIR [--controlnet]

Weights are random (seeded) with the real shapes; nothing is downloaded.
"""
import argparse, json, os, sys, time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from weights.unet import UNet2DConditionModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument('out')
ap.add_argument('--controlnet', action='store_true')
a = ap.parse_args()
os.makedirs(a.out, exist_ok=True)
cfg_dir = os.path.join(ROOT, 'weights', 'configs', 'sd15')
torch.manual_seed(0)
with open(os.path.join(cfg_dir, 'unet.json')) as f:
    cfg = json.load(f)
t0 = time.time()
unet = UNet2DConditionModel(cfg).eval()
path = os.path.join(a.out, 'unet.pt')
torch.jit.script(unet).save(path + '.tmp')
os.replace(path + '.tmp', path)
with open(os.path.join(a.out, 'unet.json'), 'w') as f:
    json.dump(cfg, f)
print(f'unet.pt written in {time.time() - t0:.1f} s', file=sys.stderr)
if a.controlnet:
    from weights.controlnet import ControlNetModel  # noqa: E402
    with open(os.path.join(cfg_dir, 'controlnet.json')) as f:
        ccfg = json.load(f)
    cn = ControlNetModel(ccfg).eval()
    p = os.path.join(a.out, 'controlnet.pt')
    torch.jit.script(cn).save(p + '.tmp')
    os.replace(p + '.tmp', p)
