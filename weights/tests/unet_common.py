"""Shared helpers for the weights/ model tests (fixtures live in the repo; nothing outside it is read)."""
import json
import os
import sys
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from weights import st  # noqa: E402

MICRO = os.path.join(ROOT, "models", "micro-src")
GOLDENS = os.path.join(ROOT, "test", "fixtures", "micro", "goldens")
MANIFESTS = os.path.join(ROOT, "test", "fixtures", "manifests")
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    if a.shape != b.shape:
        raise AssertionError("shape %s != reference %s" % (tuple(a.shape), tuple(b.shape)))
    d = float((a - b).norm())
    n = float(b.norm())
    return d / n if n > 0 else d


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def load_weights(component: str) -> Dict[str, torch.Tensor]:
    d = os.path.join(MICRO, component)
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    sd, _ = st.load(os.path.join(d, files[0]))
    return {k: v.float() for k, v in sd.items()}


def load_goldens(name: str) -> Dict[str, torch.Tensor]:
    g, _ = st.load(os.path.join(GOLDENS, name))
    return g


def read_manifest(name: str) -> List[Tuple[str, List[int]]]:
    rows = []
    with open(os.path.join(MANIFESTS, name)) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            shape = [int(x) for x in parts[1].split(",")] if parts[1] else []
            rows.append((parts[0], shape))
    return rows


def build_on_meta(cls, config):
    """Construct a model without allocating its parameters (full SD1.5 size): on torch >= 2 via the
    meta device context; on 1.13 by giving the parameter-holding layers device='meta'."""
    if hasattr(torch.device, "__enter__"):
        with torch.device("meta"):
            return cls(config)
    layers = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
    saved = {c: c.__init__ for c in layers}

    def patch(orig):
        def init(self, *a, **k):
            k["device"] = "meta"
            orig(self, *a, **k)
        return init

    try:
        for c in layers:
            c.__init__ = patch(saved[c])
        return cls(config)
    finally:
        for c in layers:
            c.__init__ = saved[c]


def worst(errs: Dict[str, float], n: int = 3) -> str:
    items = sorted(errs.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join("%s=%.2e" % kv for kv in items)
