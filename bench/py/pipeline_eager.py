"""Baseline of bench/pipeline.ts: the legacy-preset extraction done step by step in eager PyTorch with our
model definitions (weights/*.py), weights taken from the state_dict of the same exported .pt files.

    /usr/bin/python3 bench/py/pipeline_eager.py DIR JOB.json

JOB.json (written by bench/pipeline.ts): {"size", "images": [paths], "capture": [ids], "unet_t", "noise_t",
"scaling", "seed", "configs": [{"batch": B, "tokens": [[ids of each 77-token chunk]]}]}.

Per batch: PIL open → resize((size, size)) → convert('RGB') (the reference's order), stack, /255*2-1,
VaeEncoder → posterior sample × scaling, add_noise at noise_t (PNDM ᾱ from the scaled-linear betas),
UNet at unet_t capturing the legacy ids, per-image C×h×w CPU float32 contiguous copies (what the Node side
hands to JS). The prompt is encoded once per configuration (the Node pipeline caches embeddings by text;
each configuration uses its own prompt on both sides, so both pay the text encoder once per configuration).
JOB.warmup untimed warm-up batches of each batch size run first, as on the Node side.

Prints one JSON object: {"load_s", "configs": {B: {"seconds", "cpu_s", "load1", "stages": {decode, vae, text, unet, handoff}}}}.
"""
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from weights.clip import ClipTextModel  # noqa: E402
from weights.unet import UNet2DConditionModel  # noqa: E402
from weights.vae import VaeEncoder  # noqa: E402
from weights.export import fast_init  # noqa: E402

d, job_path = sys.argv[1], sys.argv[2]
with open(job_path) as f:
    job = json.load(f)
with open(os.path.join(d, 'model.json')) as f:
    model_json = json.load(f)
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', os.cpu_count() or 1)))
cfgs = model_json['configs']


def eager(cls, cfg, file):
    with fast_init():
        m = cls(cfg).eval()
    ts = torch.jit.load(os.path.join(d, file))
    sd = {k: v for k, v in ts.state_dict().items() if not k.endswith('position_ids')}
    m.load_state_dict(sd, strict=False if cls is ClipTextModel else True)
    del ts
    return m.float()


t0 = time.perf_counter()
unet = eager(UNet2DConditionModel, cfgs['unet'], 'unet.pt')
vae = eager(VaeEncoder, cfgs['vae'], 'vae_encoder.pt')
text = eager(ClipTextModel, cfgs['text_encoder'], 'text_encoder.pt')
load_s = time.perf_counter() - t0

sch = model_json.get('scheduler', {})
betas = torch.linspace(sch.get('beta_start', 0.00085) ** 0.5, sch.get('beta_end', 0.012) ** 0.5,
                       sch.get('num_train_timesteps', 1000), dtype=torch.float32) ** 2
alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
size, capture = job['size'], job['capture']
latent = size // 8
gen = torch.Generator().manual_seed(job['seed'])


def encode_prompt(tokens):
    parts = [text(torch.tensor([ids], dtype=torch.int64)) for ids in tokens]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def run_batch(paths, ehs1, st):
    B = len(paths)
    t = time.perf_counter()
    arrs = [np.asarray(Image.open(p).resize((size, size)).convert('RGB')) for p in paths]
    u8 = torch.from_numpy(np.stack(arrs))
    now = time.perf_counter(); st['decode'] += now - t; t = now
    x = (u8.permute(0, 3, 1, 2).float() / 255.0) * 2.0 - 1.0
    mean, logvar = vae(x)
    std = torch.exp(0.5 * logvar)
    z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * job['scaling']
    a = alphas_cumprod[job['noise_t']]
    noise = torch.randn(z0.shape, generator=gen)
    lat = a.sqrt() * z0 + (1 - a).sqrt() * noise
    now = time.perf_counter(); st['vae'] += now - t; t = now
    if ehs1[0] is None:
        ehs1[0] = encode_prompt(ehs1[1])
    ehs = ehs1[0].repeat(B, 1, 1)
    now = time.perf_counter(); st['text'] += now - t; t = now
    out = unet(lat, torch.tensor([job['unet_t']]), ehs, capture, None, None)
    now = time.perf_counter(); st['unet'] += now - t; t = now
    feats = [{k: out[k][i].to(torch.float32).contiguous().clone() for k in capture} for i in range(B)]
    now = time.perf_counter(); st['handoff'] += now - t
    return feats


res = {}
with torch.inference_mode():
    for c in job['configs']:
        B = c['batch']
        for _ in range(job.get('warmup', 1)):
            run_batch(job['images'][:B], [None, job['warmup_tokens']], {k: 0.0 for k in ('decode', 'vae', 'text', 'unet', 'handoff')})
        st = {k: 0.0 for k in ('decode', 'vae', 'text', 'unet', 'handoff')}
        ehs1 = [None, c['tokens']]
        load1 = os.getloadavg()[0]
        c0 = time.process_time()
        t0 = time.perf_counter()
        imgs = job['images']
        for s in range(0, len(imgs), B):
            feats = run_batch(imgs[s:s + B], ehs1, st)
            del feats
        res[str(B)] = {'seconds': time.perf_counter() - t0, 'stages': st, 'cpu_s': time.process_time() - c0, 'load1': load1}
print(json.dumps({'load_s': load_s, 'configs': res}))
