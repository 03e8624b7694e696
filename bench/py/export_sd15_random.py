#!/usr/bin/env python3
"""Full-size export measurement (not a CI test).

Builds a random-weight SD1.5 (the real configs in weights/configs/sd15: UNet, VAE, CLIP text encoder,
ControlNet) as a diffusers-layout folder with float16 safetensors, exports it with weights/export.py in a
child process and prints the export's wall time and peak resident memory (getrusage of the child).

    python3 bench/py/export_sd15_random.py [--src /tmp/sd15-src] [--out /tmp/sd15-export] [--dtype float32]
                                    [--components unet,vae,text_encoder,controlnet] [--verify] [--keep-src]

The exported folder is left in place (for loading tests through the addon); the source folder is removed
unless --keep-src. Weights are seeded random with fan-in scaling, so a forward pass gives finite,
O(1) activations but meaningless images.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)

import torch

from weights.export import ALL_COMPONENTS, SD15_CONFIGS, SD15_SCHEDULER, fast_init
from weights.st import save

CLASS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "controlnet": "ControlNetModel"}
FILE = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
        "controlnet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def names_and_shapes(component, config):
    with fast_init():  # no initialisation: only names and shapes are needed
        if component == "unet":
            from weights.unet import UNet2DConditionModel
            mods = [UNet2DConditionModel(config)]
        elif component == "controlnet":
            from weights.controlnet import ControlNetModel
            mods = [ControlNetModel(config)]
        elif component == "vae":
            from weights.vae import VaeDecoder, VaeEncoder
            mods = [VaeEncoder(config), VaeDecoder(config)]
        else:
            from weights.clip import ClipTextModel
            mods = [ClipTextModel(config)]
    out = {}
    for m in mods:
        out.update({k: tuple(v.shape) for k, v in m.state_dict().items()})
    return out


def random_state_dict(shapes, gen):
    sd = {}
    for k, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            std = 0.02 if "embedding" in k else fan_in ** -0.5
            t = torch.randn(shape, generator=gen) * std
        elif k.endswith("weight"):  # norm scales
            t = 1.0 + 0.02 * torch.randn(shape, generator=gen)
        else:
            t = 0.01 * torch.randn(shape, generator=gen)
        sd[k] = t.half()
    return sd


def build_source(src, components):
    gen = torch.Generator().manual_seed(0)
    if os.path.exists(src):
        shutil.rmtree(src)
    os.makedirs(src)
    total = 0
    for c in components:
        with open(os.path.join(SD15_CONFIGS, c + ".json")) as f:
            cfg = json.load(f)
        if c in CLASS:
            cfg = dict({"_class_name": CLASS[c]}, **cfg)
        t0 = time.time()
        sd = random_state_dict(names_and_shapes(c, cfg), gen)
        n = sum(v.numel() for v in sd.values())
        total += n
        os.makedirs(os.path.join(src, c))
        with open(os.path.join(src, c, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save(os.path.join(src, c, FILE[c]), sd, {"format": "pt"})
        del sd
        log(f"{c}: {n:,} random float16 parameters written in {time.time() - t0:.1f} s")
    shutil.copytree(os.path.join(ROOT, "models", "micro-src", "tokenizer"), os.path.join(src, "tokenizer"))
    os.makedirs(os.path.join(src, "scheduler"))
    with open(os.path.join(src, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER, f, indent=2)
    return total


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def verify(out):
    """Loads each file and runs a tiny forward (64 px) to show the files work."""
    torch.set_num_threads(2)
    with torch.no_grad():
        t0 = time.time()
        unet = torch.jit.load(os.path.join(out, "unet.pt"))
        t1 = time.time()
        x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(51), torch.randn(1, 77, 768)
        o = unet(x, t, ctx, ["up-level1-repeat1-vit-block0-out"], None, None)
        log(f"unet.pt: loaded in {t1 - t0:.1f} s; 64px forward {time.time() - t1:.1f} s, out {tuple(o['out'].shape)}, "
            f"finite {bool(torch.isfinite(o['out']).all())}")
        del unet
        if os.path.exists(os.path.join(out, "controlnet.pt")):
            cn = torch.jit.load(os.path.join(out, "controlnet.pt"))
            r = cn(x, t, ctx, torch.rand(1, 3, 64, 64), 1.0)
            log(f"controlnet.pt: {len(r)} residuals, finite {all(bool(torch.isfinite(a).all()) for a in r)}")
            del cn
        enc = torch.jit.load(os.path.join(out, "vae_encoder.pt"))
        mean, logvar = enc(torch.rand(1, 3, 64, 64) * 2 - 1)
        log(f"vae_encoder.pt: mean {tuple(mean.shape)}, finite {bool(torch.isfinite(mean).all())}")
        te = torch.jit.load(os.path.join(out, "text_encoder.pt"))
        h = te(torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73]))
        log(f"text_encoder.pt: {tuple(h.shape)}, finite {bool(torch.isfinite(h).all())}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="/tmp/sd15-src")
    ap.add_argument("--out", default="/tmp/sd15-export")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--components", default=",".join(ALL_COMPONENTS))
    ap.add_argument("--keep-src", action="store_true")
    ap.add_argument("--verify", action="store_true", help="load each exported file and run a tiny forward")
    args = ap.parse_args()
    comps = [c for c in args.components.split(",") if c]
    t0 = time.time()
    n = build_source(args.src, comps)
    src_gib = du(args.src) / 2**30
    log(f"source: {args.src}, {n:,} parameters, {src_gib:.2f} GiB, built in {time.time() - t0:.1f} s")
    cmd = [sys.executable, os.path.join(ROOT, "weights", "export.py"), "--from", args.src, "--out", args.out,
           "--dtype", args.dtype, "--force", "--components", ",".join(comps)]
    log("running: " + " ".join(cmd))
    t0 = time.time()
    rc = subprocess.call(cmd)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    if rc != 0:
        log(f"export failed with exit code {rc}")
        return rc
    if not args.keep_src:
        shutil.rmtree(args.src, ignore_errors=True)
    print(json.dumps({"export_seconds": round(wall, 1), "peak_rss_gib": round(peak, 2),
                      "parameters": n, "source_gib_float16": round(src_gib, 2),
                      "output": args.out, "output_gib": round(du(args.out) / 2**30, 2), "dtype": args.dtype,
                      "torch": torch.__version__}, indent=1))
    if args.verify:
        verify(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
