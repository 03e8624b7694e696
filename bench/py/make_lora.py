"""Writes a random kohya/LoCon-style LoRA for the full-size SD1.5 UNet (for bench/recipe.ts).

    /usr/bin/python3 bench/py/make_lora.py OUT.safetensors [--rank 8] [--seed 0] [--config weights/configs/sd15/unet.json]

Modules: every transformer attention to_q/to_k/to_v/to_out.0 (attn1 and attn2) and every proj_in/proj_out
(1×1 convs in SD1.5: LoCon conv factors r×in×1×1 / out×r×1×1). Keys as kohya-ss writes them:
lora_unet_<diffusers module path with . → _>.lora_down.weight / .lora_up.weight / .alpha, float16,
alpha = rank. Factors are small random values (the merge cost, not the effect, is what is measured).
"""
import argparse
import json
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
from weights.export import fast_init  # noqa: E402
from weights.st import save  # noqa: E402
from weights.unet import UNet2DConditionModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument('out')
ap.add_argument('--rank', type=int, default=8)
ap.add_argument('--seed', type=int, default=0)
ap.add_argument('--config', default=os.path.join(ROOT, 'weights', 'configs', 'sd15', 'unet.json'))
a = ap.parse_args()
with open(a.config) as f:
    cfg = json.load(f)
with fast_init():
    unet = UNet2DConditionModel(cfg)
shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
del unet
pat = re.compile(r'(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out)\.weight$')
g = torch.Generator().manual_seed(a.seed)
r = a.rank
out = {}
for name, shape in shapes.items():
    if not pat.search(name):
        continue
    mod = 'lora_unet_' + name[: -len('.weight')].replace('.', '_')
    o, i = shape[0], shape[1]
    tail = tuple(shape[2:])  # (1, 1) for proj_in/proj_out convs
    out[mod + '.lora_down.weight'] = (torch.randn((r, i) + tail, generator=g) * i ** -0.5).half()
    out[mod + '.lora_up.weight'] = (torch.randn((o, r) + tail, generator=g) * 0.01).half()
    out[mod + '.alpha'] = torch.tensor(float(r)).half()
os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
save(a.out + '.tmp', out, {'ss_network_module': 'networks.lora', 'ss_network_dim': str(r), 'ss_network_alpha': str(float(r)),
                           'note': f'random bench LoRA for the full SD1.5 UNet: {len(out) // 3} modules, rank {r}, seed {a.seed}'})
os.replace(a.out + '.tmp', a.out)
print(json.dumps({'file': a.out, 'modules': len(out) // 3, 'bytes': os.path.getsize(a.out)}))
