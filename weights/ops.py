"""The pipeline's tensor math as one TorchScript module (`models/ops.pt`).

Every method is a `@torch.jit.export` method of `Ops`, scriptable with torch.jit.script on torch 1.13 and
2.x, device-agnostic (CUDA tensors stay on the GPU: no numpy, no Python loops over pixels) and, where it
makes sense, dtype-preserving. Signatures are fixed by .notes/CONTRACT.md ("ops.py methods").

    python3 weights/ops.py --out models/ops.pt     # scripts Ops and saves it atomically

References (GATE_SPEC): preprocess/posterior/add_noise §1.4, scheduler §1.5/§5.4 (diffusers PNDMScheduler
with skip_prk_steps, incl. its start-up quirk; DDIM eta 0), canny §5.1 (OpenCV 4.6 cv2.Canny on RGB,
apertureSize 3, L1 gradient), attention aggregation §4.2, packaging §3.5, feature_resize §3.3,
LoRA merge §6, PCA §9, Laplacian §7.4, nearest-neighbour correspondence §8.1.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F


class Ops(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # ------------------------------------------------------------------ scheduler tables (CPU float32)
    def _alphas_cumprod(self) -> torch.Tensor:
        # diffusers "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000, float32) ** 2
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32, device=torch.device('cpu')) ** 2
        alphas = 1.0 - betas
        return torch.cumprod(alphas, dim=0)

    def _check_t(self, t: int, name: str):
        if t < 0 or t > 999:
            raise ValueError('ops: ' + name + ' must be in [0, 999], got ' + str(t))

    @torch.jit.export
    def betas(self) -> torch.Tensor:
        return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32, device=torch.device('cpu')) ** 2

    @torch.jit.export
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod()

    # ------------------------------------------------------------------ image / latent prep
    @torch.jit.export
    def preprocess(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 B×H×W×3 RGB → float32 B×3×H×W in [-1, 1] (diffusers VaeImageProcessor: x/255, then 2x-1)."""
        if u8.dim() != 4 or u8.size(3) != 3:
            raise ValueError('ops.preprocess: expected B×H×W×3, got ' + str(u8.shape))
        x = u8.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        # channels-last strides, like the tensor diffusers' VaeImageProcessor hands the VAE: oneDNN takes its
        # NHWC convolution path, ~25% faster for the VAE encoder on the CPU (values differ from NCHW at ~1e-5)
        return (2.0 * x - 1.0).contiguous(memory_format=torch.channels_last)

    @torch.jit.export
    def posterior(self, mean: torch.Tensor, logvar: torch.Tensor, noise: Optional[torch.Tensor], sample: bool,
                  scaling: float) -> torch.Tensor:
        """z0 = scaling · (mean + exp(0.5·clamp(logvar, -30, 20)) · noise) when sample, else scaling · mean."""
        if sample:
            if noise is None:
                raise ValueError('ops.posterior: sample=True needs the VAE noise tensor')
            lv = torch.clamp(logvar, -30.0, 20.0)
            std = torch.exp(0.5 * lv)
            z = mean + std * noise.to(device=mean.device, dtype=mean.dtype)
        else:
            z = mean
        return scaling * z

    @torch.jit.export
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """diffusers PNDMScheduler.add_noise: ᾱ cast to the sample dtype/device before the square roots."""
        self._check_t(t, 'add_noise t')
        acp = self._alphas_cumprod().to(device=z0.device, dtype=z0.dtype)
        ts = torch.full([z0.size(0)], t, dtype=torch.long, device=z0.device)
        a = acp[ts]
        sqrt_alpha_prod = (a ** 0.5).flatten()
        while sqrt_alpha_prod.dim() < z0.dim():
            sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus = ((1 - a) ** 0.5).flatten()
        while sqrt_one_minus.dim() < z0.dim():
            sqrt_one_minus = sqrt_one_minus.unsqueeze(-1)
        return sqrt_alpha_prod * z0 + sqrt_one_minus * noise.to(device=z0.device, dtype=z0.dtype)

    # ------------------------------------------------------------------ timesteps
    def _plms_list(self, n: int) -> List[int]:
        # PNDMScheduler.set_timesteps(n) with skip_prk_steps, steps_offset 1, "leading" spacing
        ratio = 1000 // n
        ts: List[int] = []
        for i in range(n):
            ts.append(i * ratio + 1)
        full = ts[:-1] + ts[-2:-1] + ts[-1:]
        full.reverse()
        return full

    def _get_timesteps(self, n: int, strength: float) -> List[int]:
        # StableDiffusionImg2ImgPipeline.get_timesteps(n, strength), scheduler order 1
        init = min(int(n * strength), n)
        t_start = max(n - init, 0)
        return self._plms_list(n)[t_start:]

    @torch.jit.export
    def unet_timestep(self, t: int, mode: str) -> int:
        """'reference': the reference's set_timesteps(1000) + get_timesteps(1000, t/1000)[0] (= t+1, 999 → 999);
        'exact': t."""
        self._check_t(t, 't')
        if mode == 'exact':
            return t
        if mode != 'reference':
            raise ValueError("ops.unet_timestep: mode must be 'reference' or 'exact', got '" + mode + "'")
        ts = self._get_timesteps(1000, t / 1000.0)
        return ts[0]

    @torch.jit.export
    def plms_timesteps(self, denoise_from: int, t: int) -> List[int]:
        """GDF denoising_from (§5.4, the denoise_from - t ≤ 50 branch): get_timesteps(1000, denoise_from/1000),
        entries ≥ t. (60, 50) → [61, 60, …, 50]: noise at [0], PLMS over [:-1], extraction at [-1]."""
        self._check_t(t, 't')
        self._check_t(denoise_from, 'denoise_from')
        if denoise_from <= t:
            raise ValueError('ops.plms_timesteps: denoise_from must be > t')
        if denoise_from - t > 50:
            raise ValueError('ops.plms_timesteps: denoise_from - t must be at most 50')
        out: List[int] = []
        for s in self._get_timesteps(1000, denoise_from / 1000.0):
            if s >= t:
                out.append(s)
        return out

    # ------------------------------------------------------------------ samplers
    def _prev_sample(self, sample: torch.Tensor, t: int, prev: int, eps: torch.Tensor) -> torch.Tensor:
        # PNDMScheduler._get_prev_sample; ᾱ values are CPU float32 0-d tensors exactly as in diffusers
        acp = self._alphas_cumprod()
        alpha_prod_t = acp[t]
        alpha_prod_t_prev = acp[prev] if prev >= 0 else acp[0]
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        denom = alpha_prod_t * beta_prod_t_prev ** 0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom

    @torch.jit.export
    def plms_step(self, eps: torch.Tensor, t: int, sample: torch.Tensor, ets: List[torch.Tensor], counter: int,
                  cur: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], int, Optional[torch.Tensor]]:
        """diffusers PNDMScheduler.step_plms with 1000 inference steps (Δ = 1). State in/out: (ets, counter,
        cur_sample); start with ([], 0, None). Returns (prev_sample, ets, counter, cur_sample)."""
        self._check_t(t, 't')
        ets = list(ets)
        prev_t = t - 1
        if counter != 1:
            if len(ets) > 3:
                ets = ets[-3:]
            ets.append(eps)
        else:
            prev_t = t
            t = t + 1
            self._check_t(t, 't + 1')
        model_output = eps
        if len(ets) == 1 and counter == 0:
            cur = sample
        elif len(ets) == 1 and counter == 1:
            model_output = (eps + ets[-1]) / 2
            if cur is None:
                raise ValueError('ops.plms_step: counter 1 needs the cur_sample of the first step')
            sample = cur
            cur = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev_sample = self._prev_sample(sample, t, prev_t, model_output)
        return prev_sample, ets, counter + 1, cur

    @torch.jit.export
    def ddim_step(self, eps: torch.Tensor, t: int, prev: int, sample: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta 0, epsilon prediction, no clipping) from t to prev (prev < 0 → ᾱ_0),
        diffusers DDIMScheduler.step arithmetic."""
        self._check_t(t, 't')
        if prev > 999:
            raise ValueError('ops.ddim_step: prev must be ≤ 999')
        acp = self._alphas_cumprod()
        alpha_prod_t = acp[t]
        alpha_prod_t_prev = acp[prev] if prev >= 0 else acp[0]
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * eps
        return alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction

    # ------------------------------------------------------------------ canny (OpenCV 4.6 exact)
    def _pad_replicate(self, x: torch.Tensor) -> torch.Tensor:
        # replicate-pad the last two dims by 1 (any dtype)
        x = torch.cat([x[..., :1, :], x, x[..., -1:, :]], dim=-2)
        return torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)

    @torch.jit.export
    def canny(self, u8: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """cv2.Canny(img, low, high) (apertureSize 3, L2gradient False) on B×H×W×C uint8 images (channels in
        the given order; C = 3 for RGB) → B×H×W uint8 0/255. Port of OpenCV 4.6 canny.cpp, exact (integer
        values held in float32, every product and comparison below is exact there):
        Sobel 3×3 with BORDER_REPLICATE; per pixel the first channel with the largest |dx|+|dy| (strict >);
        non-maximum suppression with OpenCV's fixed-point tan(22.5°)/tan(67.5°) tests and its strict/non-strict
        comparisons (magnitude outside the image = 0); thresholds m > floor(low) and m > floor(high) (swapped
        when low > high); hysteresis = 8-connectivity from strong pixels through weak ones."""
        if u8.dim() != 4:
            raise ValueError('ops.canny: expected B×H×W×C uint8, got ' + str(u8.shape))
        if u8.dtype != torch.uint8:
            raise ValueError('ops.canny: expected uint8 input')
        if low > high:
            tmp = low
            low = high
            high = tmp
        lo = float(math.floor(low))
        hi = float(math.floor(high))
        B = u8.size(0)
        H = u8.size(1)
        W = u8.size(2)
        C = u8.size(3)
        x = u8.permute(0, 3, 1, 2).to(torch.float32)          # B×C×H×W, integers 0..255
        p = F.pad(x, [1, 1, 1, 1], mode='replicate')
        # OpenCV Sobel kernels (correlation): dx = [-1 0 1; -2 0 2; -1 0 1], dy = its transpose (separable)
        vs = p[:, :, 0:H, :] + 2.0 * p[:, :, 1:H + 1, :] + p[:, :, 2:H + 2, :]     # B×C×H×(W+2)
        dxs = vs[:, :, :, 2:W + 2] - vs[:, :, :, 0:W]
        hs = p[:, :, :, 0:W] + 2.0 * p[:, :, :, 1:W + 1] + p[:, :, :, 2:W + 2]     # B×C×(H+2)×W
        dys = hs[:, :, 2:H + 2, :] - hs[:, :, 0:H, :]
        mags = dxs.abs() + dys.abs()
        # per pixel the channel with the largest magnitude; ties keep the earlier channel
        m = mags[:, 0]
        sel = torch.zeros([B, H, W], dtype=torch.long, device=u8.device)
        for c in range(1, C):
            better = mags[:, c] > m
            m = torch.where(better, mags[:, c], m)
            sel = torch.where(better, torch.full_like(sel, c), sel)
        if C > 1:
            dx = dxs.gather(1, sel.unsqueeze(1)).squeeze(1)
            dy = dys.gather(1, sel.unsqueeze(1)).squeeze(1)
        else:
            dx = dxs[:, 0]
            dy = dys[:, 0]
        # neighbours' magnitudes, 0 outside the image (OpenCV's zeroed ring-buffer borders)
        mp = F.pad(m.unsqueeze(1), [1, 1, 1, 1]).squeeze(1)
        ax = dx.abs()
        ay = dy.abs()
        # OpenCV: x = |dx|, y = |dy| << 15, TG22 = 13573 (tan 22.5° in Q15), tg67x = x*TG22 + (x << 16):
        #   horizontal: y < x*TG22;  vertical: y > tg67x ⟺ (|dy| - 2|dx|)·2^15 > |dx|·TG22
        t22 = ax * 13573.0
        horiz = ay * 32768.0 < t22
        vert = (~horiz) & ((ay - 2.0 * ax) * 32768.0 > t22)
        diag = (~horiz) & (~vert)
        keep_h = (m > mp[:, 1:H + 1, 0:W]) & (m >= mp[:, 1:H + 1, 2:W + 2])
        keep_v = (m > mp[:, 0:H, 1:W + 1]) & (m >= mp[:, 2:H + 2, 1:W + 1])
        same_sign = (dx < 0) == (dy < 0)                      # (xs ^ ys) >= 0 → s = 1
        keep_d = torch.where(same_sign, (m > mp[:, 0:H, 0:W]) & (m > mp[:, 2:H + 2, 2:W + 2]),
                             (m > mp[:, 0:H, 2:W + 2]) & (m > mp[:, 2:H + 2, 0:W]))
        nms = torch.where(horiz, keep_h, torch.where(vert, keep_v, keep_d))
        cand = nms & (m > lo)
        strong = cand & (m > hi)
        return self._hysteresis(strong, cand).to(torch.uint8) * 255

    def _hysteresis(self, strong: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        # 8-connected components of the candidate pixels (sparse: min-label propagation + pointer jumping),
        # keeping the components that contain a strong pixel — what OpenCV's stack-based tracing yields.
        B = cand.size(0)
        H = cand.size(1)
        W = cand.size(2)
        dev = cand.device
        flat = cand.reshape(-1)
        idx = torch.nonzero(flat).squeeze(1)
        K = idx.numel()
        out = torch.zeros([B * H * W], dtype=torch.uint8, device=dev)
        if K == 0:
            return out.reshape(B, H, W) > 0
        ar = torch.arange(K, dtype=torch.long, device=dev)
        inner = torch.full([B * H * W], -1, dtype=torch.long, device=dev)
        inner.index_copy_(0, idx, ar)
        ids = F.pad(inner.reshape(B, 1, H, W), [1, 1, 1, 1], value=-1.0).reshape(-1)   # −1 border
        Wp = W + 2
        b = torch.div(idx, H * W, rounding_mode='floor')
        rem = idx - b * (H * W)
        y = torch.div(rem, W, rounding_mode='floor')
        xx = rem - y * W
        base = b * ((H + 2) * Wp) + (y + 1) * Wp + (xx + 1)
        offs = torch.tensor([-Wp - 1, -Wp, -Wp + 1, -1, 1, Wp - 1, Wp, Wp + 1], dtype=torch.long, device=dev)
        nb = ids[base.unsqueeze(1) + offs.unsqueeze(0)]                                # K×8, −1 = none
        valid = nb >= 0
        eu = ar.unsqueeze(1).expand(K, 8)[valid]                 # both directions of every 8-neighbour edge
        ev = nb[valid]
        # hook-and-compress (Shiloach–Vishkin style): a parent always has a smaller id and only ever decreases,
        # so this stays a forest; concurrent hooks may land in any order (which root wins does not change the
        # partition). At the fixed point (all trees stars, no hook left) every edge joins nodes of one root.
        lab = ar
        while True:
            pu = lab[eu]
            pv = lab[ev]
            hook = pv < lab[pu]
            new = lab.index_put((pu[hook],), pv[hook])
            while True:
                nn = new[new]
                if bool(torch.equal(nn, new)):
                    break
                new = nn
            if bool(torch.equal(new, lab)):
                break
            lab = new
        root_strong = torch.zeros([K], dtype=torch.uint8, device=dev)
        sidx = torch.nonzero(strong.reshape(-1)[idx]).squeeze(1)
        root_strong.index_fill_(0, lab[sidx], 1)
        keep = root_strong[lab] > 0
        out.index_fill_(0, idx[keep], 1)
        return out.reshape(B, H, W) > 0

    @torch.jit.export
    def control_image(self, edges: torch.Tensor) -> torch.Tensor:
        """B×H×W uint8 edges → B×3×H×W float32 in [0, 1] (replicated to 3 channels, /255)."""
        if edges.dim() != 3:
            raise ValueError('ops.control_image: expected B×H×W uint8, got ' + str(edges.shape))
        x = edges.to(torch.float32) / 255.0
        return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    # ------------------------------------------------------------------ features
    @torch.jit.export
    def aggregate_attention(self, maps: List[torch.Tensor], latent: int, min_q: int, max_q: int) -> torch.Tensor:
        """GATE_SPEC §4.2: per map (B×heads×nq×nk) the head mean, kept when min_q ≤ nq ≤ max_q; maps of equal nq
        (first-seen order) averaged, reshaped to B×nk×h×w, nearest-resized to latent×latent, concatenated."""
        order: List[int] = []
        sums: Dict[int, torch.Tensor] = {}
        counts: Dict[int, int] = {}
        for mp in maps:
            if mp.dim() != 4:
                raise ValueError('ops.aggregate_attention: maps must be B×heads×nq×nk, got ' + str(mp.shape))
            nq = mp.size(2)
            if nq < min_q or nq > max_q:
                continue
            hm = mp.mean(dim=1)
            if nq in sums:
                sums[nq] = sums[nq] + hm
                counts[nq] = counts[nq] + 1
            else:
                order.append(nq)
                sums[nq] = hm
                counts[nq] = 1
        if len(order) == 0:
            raise ValueError('ops.aggregate_attention: no attention map with min_q ≤ nq ≤ max_q')
        outs: List[torch.Tensor] = []
        for nq in order:
            avg = sums[nq] / counts[nq]
            B = avg.size(0)
            nk = avg.size(2)
            h = int(round(nq ** 0.5))
            if h * h != nq:
                raise ValueError('ops.aggregate_attention: nq is not a square: ' + str(nq))
            g = avg.permute(0, 2, 1).reshape(B, nk, h, h)
            if h != latent:
                g = self._nearest(g, latent)
            outs.append(g)
        return torch.cat(outs, dim=1)

    def _nearest(self, x: torch.Tensor, S: int) -> torch.Tensor:
        # F.interpolate(x, size=[S, S], mode='nearest'); CPU half/bfloat16 (no kernel in torch 1.13) by the same
        # index rule: src = min(floor(dst * (float32) in/out), in - 1)
        if x.device.type != 'cpu' or (x.dtype != torch.float16 and x.dtype != torch.bfloat16):
            return F.interpolate(x, size=[S, S], mode='nearest')
        H = x.size(-2)
        W = x.size(-1)
        iy = torch.floor(torch.arange(S, dtype=torch.float32) * torch.tensor(float(H) / float(S), dtype=torch.float32))
        ix = torch.floor(torch.arange(S, dtype=torch.float32) * torch.tensor(float(W) / float(S), dtype=torch.float32))
        iy = iy.to(torch.long).clamp(max=H - 1)
        ix = ix.to(torch.long).clamp(max=W - 1)
        return x.index_select(-2, iy).index_select(-1, ix)

    @torch.jit.export
    def feature_resize(self, x: torch.Tensor, r: int) -> torch.Tensor:
        """FeatureStore feature_resize: adaptive_avg_pool2d over the last two dims to (H//r, W//r)."""
        if r <= 1:
            return x
        return F.adaptive_avg_pool2d(x, [x.size(-2) // r, x.size(-1) // r])

    @torch.jit.export
    def package(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """§3.5 --aggregate_output: F.interpolate(v, S) (nearest) to the largest last-dim size S, concatenated
        on channels in the given order."""
        if len(feats) == 0:
            raise ValueError('ops.package: no features')
        # per-image C×h×w tensors (recipe amalgamation) are packaged like a batch of one
        single = feats[0].dim() == 3
        S = 0
        for f in feats:
            S = max(S, f.size(-1))
        outs: List[torch.Tensor] = []
        for f in feats:
            if (f.dim() == 3) != single:
                raise ValueError('ops.package: mixed C×h×w and B×C×h×w tensors')
            if single:
                f = f.unsqueeze(0)
            if f.size(-1) != S or f.size(-2) != S:
                f = self._nearest(f, S)
            outs.append(f)
        out = torch.cat(outs, dim=1)
        return out.squeeze(0) if single else out

    @torch.jit.export
    def split_to_cpu(self, d: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Per image i: {key: d[key][i] as a C×h×w float32 contiguous CPU tensor (own storage)}, key order kept."""
        B = -1
        cpu: Dict[str, torch.Tensor] = {}
        for k, v in d.items():
            if B < 0:
                B = v.size(0)
            elif v.size(0) != B:
                raise ValueError('ops.split_to_cpu: batch sizes differ (' + k + ')')
            cpu[k] = v.detach().to(device=torch.device('cpu'), dtype=torch.float32)
        out: List[Dict[str, torch.Tensor]] = []
        for i in range(max(B, 0)):
            di: Dict[str, torch.Tensor] = {}
            for k, v in cpu.items():
                di[k] = v[i].clone(memory_format=torch.contiguous_format)
            out.append(di)
        return out

    @torch.jit.export
    def rows(self, x: torch.Tensor, start: int, n: int) -> torch.Tensor:
        if start < 0 or n < 0 or start + n > x.size(0):
            raise ValueError('ops.rows: rows ' + str(start) + '..' + str(start + n) + ' out of range for ' + str(x.size(0)))
        return x.narrow(0, start, n).contiguous()

    @torch.jit.export
    def cat(self, xs: List[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(xs, dim=dim)

    @torch.jit.export
    def repeat_batch(self, x: torch.Tensor, n: int) -> torch.Tensor:
        reps: List[int] = [n]
        for _ in range(x.dim() - 1):
            reps.append(1)
        return x.repeat(reps)

    # ------------------------------------------------------------------ LoRA
    @torch.jit.export
    def lora_merge(self, w: torch.Tensor, ups: List[torch.Tensor], downs: List[torch.Tensor],
                   scales: List[float]) -> torch.Tensor:
        """W + Σ s·reshape(up.reshape(out, r) @ down.reshape(r, -1), W.shape), in float64, rounded once to
        w.dtype (the caller folds alpha/rank into s). ΔW may differ from W.shape only in trailing 1×1 dims."""
        if len(ups) != len(downs) or len(ups) != len(scales):
            raise ValueError('ops.lora_merge: ups, downs and scales must have the same length')
        acc = w.to(torch.float64)
        for i in range(len(ups)):
            up = ups[i].to(device=w.device, dtype=torch.float64)
            down = downs[i].to(device=w.device, dtype=torch.float64)
            r = down.size(0)
            if up.dim() < 2 or up.size(1) != r or up.numel() != up.size(0) * r:
                raise ValueError('ops.lora_merge: up ' + str(up.shape) + ' does not fit down ' + str(down.shape))
            delta = torch.mm(up.reshape(up.size(0), r), down.reshape(r, -1))
            if delta.numel() != w.numel():
                raise ValueError('ops.lora_merge: delta ' + str(delta.shape) + ' does not fit weight ' + str(w.shape))
            acc = acc + scales[i] * delta.reshape(w.shape)
        return acc.to(w.dtype)

    # ------------------------------------------------------------------ analysis helpers
    @torch.jit.export
    def pca_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """§9: C×H×W → H×W×3 uint8. Mean-centred PCA with 3 components (sklearn sign convention: svd_flip,
        u-based), per-component min–max to [0, 1] over the image, ×255, truncated to uint8. float64 maths:
        exact (Gram eigendecomposition) when min(H·W, C) ≤ 2048, else a deterministic block power iteration
        (sklearn itself uses randomized SVD at these sizes)."""
        if x.dim() != 3:
            raise ValueError('ops.pca_rgb: expected C×H×W, got ' + str(x.shape))
        C = x.size(0)
        H = x.size(1)
        W = x.size(2)
        X = x.reshape(C, H * W).t().to(torch.float64)         # N×C
        X = X - X.mean(dim=0, keepdim=True)
        N = H * W
        k = min(3, min(N, C))
        if min(N, C) <= 2048:
            # exact: eigenvectors of the smaller Gram matrix
            if C <= N:
                evals, V = torch.linalg.eigh(X.t().mm(X))       # ascending
                T = X.mm(V[:, C - k:].flip(1))                 # = U·S
            else:
                evals, U = torch.linalg.eigh(X.mm(X.t()))
                T = U[:, N - k:].flip(1) * evals[N - k:].flip(0).clamp_min(0.0).sqrt().unsqueeze(0)
        else:
            # deterministic block power iteration (pseudo-random start from an index hash), Rayleigh–Ritz
            p = k + 13
            idx = torch.arange(C * p, dtype=torch.float64, device=X.device)
            G = torch.frac(torch.sin(idx * 12.9898 + 78.233) * 43758.5453) - 0.5
            Q, R0 = torch.linalg.qr(X.t().mm(X.mm(G.reshape(C, p))))
            for it in range(16):
                Q, R0 = torch.linalg.qr(X.t().mm(X.mm(Q)))
            U, S, Vh = torch.linalg.svd(X.mm(Q), full_matrices=False)
            T = U[:, :k] * S[:k].unsqueeze(0)
        # svd_flip(u_based_decision=True): the largest-|u| entry of each component is made positive
        am = T.abs().argmax(dim=0)
        signs = torch.sign(T.gather(0, am.unsqueeze(0)).squeeze(0))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        T = T * signs.unsqueeze(0)                              # N×k transformed
        if k < 3:
            T = torch.cat([T, torch.zeros(N, 3 - k, dtype=torch.float64, device=X.device)], dim=1)
        mn = T.min(dim=0, keepdim=True)[0]
        mx = T.max(dim=0, keepdim=True)[0]
        rng = mx - mn
        scaled = torch.where(rng > 0, (T - mn) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(T))
        return (scaled * 255).to(torch.uint8).reshape(H, W, 3)

    @torch.jit.export
    def laplacian_map(self, x: torch.Tensor) -> torch.Tensor:
        """§7.4 m(F): per-channel 4-neighbour Laplacian [[0,1,0],[1,-4,1],[0,1,0]] with replicate padding,
        L2 norm over channels → H×W float32."""
        if x.dim() != 3:
            raise ValueError('ops.laplacian_map: expected C×H×W, got ' + str(x.shape))
        f = x.to(torch.float32)
        H = f.size(1)
        W = f.size(2)
        p = self._pad_replicate(f)
        lap = p[:, 0:H, 1:W + 1] + p[:, 2:H + 2, 1:W + 1] + p[:, 1:H + 1, 0:W] + p[:, 1:H + 1, 2:W + 2] - 4 * f
        return (lap * lap).sum(dim=0).sqrt()

    @torch.jit.export
    def correspondence(self, f1: torch.Tensor, f2: torch.Tensor, src_yx: torch.Tensor, size: int) -> torch.Tensor:
        """§8.1 nearest neighbour: both maps bilinearly upsampled to size×size (align_corners False); source
        index = size·round(clip(y, 0, size-1)) + round(clip(x, 0, size-1)) (half to even); cosine similarity
        against every target pixel; hard argmax → N×2 float32 (y, x), in the size×size space of src_yx.
        Channels are processed in chunks so memory stays bounded (no C×size² tensor)."""
        if f1.dim() != 3 or f2.dim() != 3 or f1.size(0) != f2.size(0):
            raise ValueError('ops.correspondence: f1, f2 must be C×h×w with equal C')
        if src_yx.dim() != 2 or src_yx.size(1) != 2:
            raise ValueError('ops.correspondence: src_yx must be N×2')
        dev = f2.device
        C = f1.size(0)
        S = size
        pts = src_yx.to(device=dev, dtype=torch.float32)
        yy = torch.round(torch.clamp(pts[:, 0], 0.0, float(S - 1))).to(torch.long)
        xx = torch.round(torch.clamp(pts[:, 1], 0.0, float(S - 1))).to(torch.long)
        src_idx = yy * S + xx
        N = src_idx.size(0)
        chunk = max(1, min(C, (1 << 24) // max(1, S * S)))
        # pass 1: source descriptors (N×C) and target squared norms (S²)
        desc = torch.zeros(N, C, dtype=torch.float32, device=dev)
        norm2 = torch.zeros(S * S, dtype=torch.float32, device=dev)
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            u1 = F.interpolate(f1[c0:c1].to(device=dev, dtype=torch.float32).unsqueeze(0), size=[S, S],
                               mode='bilinear', align_corners=False)[0].reshape(c1 - c0, S * S)
            desc[:, c0:c1] = u1.index_select(1, src_idx).t()
            u2 = F.interpolate(f2[c0:c1].to(torch.float32).unsqueeze(0), size=[S, S], mode='bilinear',
                               align_corners=False)[0].reshape(c1 - c0, S * S)
            norm2 = norm2 + (u2 * u2).sum(dim=0)
        desc = desc / (desc * desc).sum(dim=1, keepdim=True).sqrt()
        tnorm = norm2.sqrt()
        out = torch.zeros(N, 2, dtype=torch.float32, device=dev)
        kchunk = 256
        for k0 in range(0, N, kchunk):
            k1 = min(N, k0 + kchunk)
            sim = torch.zeros(k1 - k0, S * S, dtype=torch.float32, device=dev)
            for c0 in range(0, C, chunk):
                c1 = min(C, c0 + chunk)
                u2 = F.interpolate(f2[c0:c1].to(torch.float32).unsqueeze(0), size=[S, S], mode='bilinear',
                                   align_corners=False)[0].reshape(c1 - c0, S * S)
                sim = sim + desc[k0:k1, c0:c1].mm(u2)
            best = (sim / tnorm.unsqueeze(0)).argmax(dim=1)
            out[k0:k1, 0] = torch.div(best, S, rounding_mode='floor').to(torch.float32)
            out[k0:k1, 1] = (best % S).to(torch.float32)
        return out


METHODS = ['preprocess', 'posterior', 'add_noise', 'unet_timestep', 'plms_timesteps', 'plms_step', 'ddim_step',
           'canny', 'control_image', 'aggregate_attention', 'feature_resize', 'package', 'split_to_cpu', 'rows',
           'cat', 'repeat_batch', 'lora_merge', 'pca_rgb', 'laplacian_map', 'correspondence', 'betas',
           'alphas_cumprod']


def source_sha256() -> str:
    import hashlib
    with open(__file__, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def script() -> torch.jit.ScriptModule:
    return torch.jit.script(Ops().eval())


def save(out: str) -> None:
    import os
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
    ap = argparse.ArgumentParser(description='Script weights/ops.py:Ops and save it (TorchScript)')
    ap.add_argument('--out', default='models/ops.pt')
    a = ap.parse_args()
    save(a.out)
    print('wrote ' + a.out)


if __name__ == '__main__':
    main()
