"""The pipeline's tensor math as one TorchScript module (`models/ops.pt`), by concern:

- `scheduler.py`: noise schedule, add_noise, the reference's timesteps, PLMS and DDIM steps;
- `latents.py`: VAE preprocessing and posterior;
- `canny.py`: OpenCV-exact canny and the ControlNet conditioning image;
- `packaging.py`: attention aggregation, feature_resize, packaging, per-image split, batch helpers;
- `lora.py`: the LoRA merge;
- `analysis.py`: PCA to RGB, the Laplacian map of the GATE score, nearest-neighbour correspondence.

`Ops` exposes each as a `@torch.jit.export` method (the names and TorchScript signatures the TypeScript `Ops`
class in lib/ops.ts calls; listed in docs/INTERNALS.md). Every function is scriptable with torch.jit.script
on torch 1.13 and 2.x, device-agnostic (CUDA tensors stay on the GPU: no numpy, no Python loops over pixels)
and, where it makes sense, dtype-preserving. What each computes and why: docs/method.md.

    python3 -m weights.ops --out models/ops.pt     # scripts Ops and saves it atomically
"""
import os
from typing import Dict, List, Optional, Tuple

import torch

from weights.ops import analysis, canny, latents, lora, packaging, scheduler


class Ops(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # ------------------------------------------------------------------ scheduler tables (CPU float32)
    @torch.jit.export
    def betas(self) -> torch.Tensor:
        return scheduler.betas()

    @torch.jit.export
    def alphas_cumprod(self) -> torch.Tensor:
        return scheduler.alphas_cumprod()

    # ------------------------------------------------------------------ image / latent prep
    @torch.jit.export
    def preprocess(self, u8: torch.Tensor) -> torch.Tensor:
        return latents.preprocess(u8)

    @torch.jit.export
    def posterior(self, mean: torch.Tensor, logvar: torch.Tensor, noise: Optional[torch.Tensor], sample: bool,
                  scaling: float) -> torch.Tensor:
        return latents.posterior(mean, logvar, noise, sample, scaling)

    @torch.jit.export
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        return scheduler.add_noise(z0, noise, t)

    # ------------------------------------------------------------------ timesteps and samplers
    @torch.jit.export
    def unet_timestep(self, t: int, mode: str) -> int:
        return scheduler.unet_timestep(t, mode)

    @torch.jit.export
    def plms_timesteps(self, denoise_from: int, t: int) -> List[int]:
        return scheduler.plms_timesteps(denoise_from, t)

    @torch.jit.export
    def plms_step(self, eps: torch.Tensor, t: int, sample: torch.Tensor, ets: List[torch.Tensor], counter: int,
                  cur: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], int, Optional[torch.Tensor]]:
        return scheduler.plms_step(eps, t, sample, ets, counter, cur)

    @torch.jit.export
    def ddim_step(self, eps: torch.Tensor, t: int, prev: int, sample: torch.Tensor) -> torch.Tensor:
        return scheduler.ddim_step(eps, t, prev, sample)

    # ------------------------------------------------------------------ ControlNet conditioning
    @torch.jit.export
    def canny(self, u8: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return canny.canny(u8, low, high)

    @torch.jit.export
    def control_image(self, edges: torch.Tensor) -> torch.Tensor:
        return canny.control_image(edges)

    # ------------------------------------------------------------------ features
    @torch.jit.export
    def aggregate_attention(self, maps: List[torch.Tensor], latent: int, min_q: int, max_q: int) -> torch.Tensor:
        return packaging.aggregate_attention(maps, latent, min_q, max_q)

    @torch.jit.export
    def feature_resize(self, x: torch.Tensor, r: int) -> torch.Tensor:
        return packaging.feature_resize(x, r)

    @torch.jit.export
    def package(self, feats: List[torch.Tensor]) -> torch.Tensor:
        return packaging.package(feats)

    @torch.jit.export
    def split_to_cpu(self, d: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        return packaging.split_to_cpu(d)

    @torch.jit.export
    def rows(self, x: torch.Tensor, start: int, n: int) -> torch.Tensor:
        return packaging.rows(x, start, n)

    @torch.jit.export
    def cat(self, xs: List[torch.Tensor], dim: int) -> torch.Tensor:
        return packaging.cat(xs, dim)

    @torch.jit.export
    def repeat_batch(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return packaging.repeat_batch(x, n)

    # ------------------------------------------------------------------ LoRA
    @torch.jit.export
    def lora_merge(self, w: torch.Tensor, ups: List[torch.Tensor], downs: List[torch.Tensor],
                   scales: List[float]) -> torch.Tensor:
        return lora.lora_merge(w, ups, downs, scales)

    # ------------------------------------------------------------------ analysis helpers
    @torch.jit.export
    def pca_rgb(self, x: torch.Tensor) -> torch.Tensor:
        return analysis.pca_rgb(x)

    @torch.jit.export
    def laplacian_map(self, x: torch.Tensor) -> torch.Tensor:
        return analysis.laplacian_map(x)

    @torch.jit.export
    def correspondence(self, f1: torch.Tensor, f2: torch.Tensor, src_yx: torch.Tensor, size: int) -> torch.Tensor:
        return analysis.correspondence(f1, f2, src_yx, size)


METHODS = ['preprocess', 'posterior', 'add_noise', 'unet_timestep', 'plms_timesteps', 'plms_step', 'ddim_step',
           'canny', 'control_image', 'aggregate_attention', 'feature_resize', 'package', 'split_to_cpu', 'rows',
           'cat', 'repeat_batch', 'lora_merge', 'pca_rgb', 'laplacian_map', 'correspondence', 'betas',
           'alphas_cumprod']

_HERE = os.path.dirname(os.path.abspath(__file__))


def source_sha256() -> str:
    """SHA-256 over the package's Python sources (file names and contents, in name order): what models/ops.pt
    records, so a test can tell when it is stale."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(_HERE) if f.endswith('.py')):
        with open(os.path.join(_HERE, name), 'rb') as f:
            data = f.read()
        h.update(name.encode() + b'\0' + str(len(data)).encode() + b'\0' + data)
    return h.hexdigest()


def script() -> torch.jit.ScriptModule:
    return torch.jit.script(Ops().eval())


def save(out: str) -> None:
    import tempfile
    m = script()
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.ops-', suffix='.pt', dir=d)
    os.close(fd)
    try:
        torch.jit.save(m, tmp, _extra_files={'ops_source_sha256': source_sha256(), 'torch_version': torch.__version__})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(prog='python3 -m weights.ops', description='Script weights.ops.Ops and save it (TorchScript)')
    ap.add_argument('--out', default='models/ops.pt')
    a = ap.parse_args()
    save(a.out)
    print('wrote ' + a.out)
