"""Noise schedule, timesteps and samplers (docs/method.md §Latents, §Timesteps, §Denoising).

diffusers' SD1.5 schedule ("scaled_linear" β, 1000 training steps), PNDMScheduler with skip_prk_steps
(including its start-up quirk) and deterministic DDIM (eta 0). ᾱ tables are CPU float32, exactly as diffusers
holds them; every function is TorchScript-compatible (torch 1.13 and 2.x).
"""
from typing import List, Optional, Tuple

import torch


def betas() -> torch.Tensor:
    # diffusers "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000, float32) ** 2
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32, device=torch.device('cpu')) ** 2


def alphas_cumprod() -> torch.Tensor:
    alphas = 1.0 - betas()
    return torch.cumprod(alphas, dim=0)


def check_t(t: int, name: str):
    if t < 0 or t > 999:
        raise ValueError('ops: ' + name + ' must be in [0, 999], got ' + str(t))


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """diffusers PNDMScheduler.add_noise: ᾱ cast to the sample dtype/device before the square roots."""
    check_t(t, 'add_noise t')
    acp = alphas_cumprod().to(device=z0.device, dtype=z0.dtype)
    ts = torch.full([z0.size(0)], t, dtype=torch.long, device=z0.device)
    a = acp[ts]
    sqrt_alpha_prod = (a ** 0.5).flatten()
    while sqrt_alpha_prod.dim() < z0.dim():
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
    sqrt_one_minus = ((1 - a) ** 0.5).flatten()
    while sqrt_one_minus.dim() < z0.dim():
        sqrt_one_minus = sqrt_one_minus.unsqueeze(-1)
    return sqrt_alpha_prod * z0 + sqrt_one_minus * noise.to(device=z0.device, dtype=z0.dtype)


# ---------------------------------------------------------------------------------------------- timesteps
def plms_list(n: int) -> List[int]:
    # PNDMScheduler.set_timesteps(n) with skip_prk_steps, steps_offset 1, "leading" spacing
    ratio = 1000 // n
    ts: List[int] = []
    for i in range(n):
        ts.append(i * ratio + 1)
    full = ts[:-1] + ts[-2:-1] + ts[-1:]
    full.reverse()
    return full


def get_timesteps(n: int, strength: float) -> List[int]:
    # StableDiffusionImg2ImgPipeline.get_timesteps(n, strength), scheduler order 1
    init = min(int(n * strength), n)
    t_start = max(n - init, 0)
    return plms_list(n)[t_start:]


def unet_timestep(t: int, mode: str) -> int:
    """'reference': the reference's set_timesteps(1000) + get_timesteps(1000, t/1000)[0] (= t+1, 999 → 999);
    'exact': t."""
    check_t(t, 't')
    if mode == 'exact':
        return t
    if mode != 'reference':
        raise ValueError("ops.unet_timestep: mode must be 'reference' or 'exact', got '" + mode + "'")
    ts = get_timesteps(1000, t / 1000.0)
    return ts[0]


def plms_timesteps(denoise_from: int, t: int) -> List[int]:
    """The reference's denoising_from (the denoise_from - t ≤ 50 branch): get_timesteps(1000, denoise_from/1000),
    entries ≥ t. (60, 50) → [61, 60, …, 50]: noise at [0], PLMS over [:-1], extraction at [-1]."""
    check_t(t, 't')
    check_t(denoise_from, 'denoise_from')
    if denoise_from <= t:
        raise ValueError('ops.plms_timesteps: denoise_from must be > t')
    if denoise_from - t > 50:
        raise ValueError('ops.plms_timesteps: denoise_from - t must be at most 50')
    out: List[int] = []
    for s in get_timesteps(1000, denoise_from / 1000.0):
        if s >= t:
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------- samplers
def prev_sample(sample: torch.Tensor, t: int, prev: int, eps: torch.Tensor) -> torch.Tensor:
    # PNDMScheduler._get_prev_sample; ᾱ values are CPU float32 0-d tensors exactly as in diffusers
    acp = alphas_cumprod()
    alpha_prod_t = acp[t]
    alpha_prod_t_prev = acp[prev] if prev >= 0 else acp[0]
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
    denom = alpha_prod_t * beta_prod_t_prev ** 0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom


def plms_step(eps: torch.Tensor, t: int, sample: torch.Tensor, ets: List[torch.Tensor], counter: int,
              cur: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], int, Optional[torch.Tensor]]:
    """diffusers PNDMScheduler.step_plms with 1000 inference steps (Δ = 1). State in/out: (ets, counter,
    cur_sample); start with ([], 0, None). Returns (prev_sample, ets, counter, cur_sample)."""
    check_t(t, 't')
    ets = list(ets)
    prev_t = t - 1
    if counter != 1:
        if len(ets) > 3:
            ets = ets[-3:]
        ets.append(eps)
    else:
        prev_t = t
        t = t + 1
        check_t(t, 't + 1')
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
    out = prev_sample(sample, t, prev_t, model_output)
    return out, ets, counter + 1, cur


def ddim_step(eps: torch.Tensor, t: int, prev: int, sample: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0, epsilon prediction, no clipping) from t to prev (prev < 0 → ᾱ_0),
    diffusers DDIMScheduler.step arithmetic."""
    check_t(t, 't')
    if prev > 999:
        raise ValueError('ops.ddim_step: prev must be ≤ 999')
    acp = alphas_cumprod()
    alpha_prod_t = acp[t]
    alpha_prod_t_prev = acp[prev] if prev >= 0 else acp[0]
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * eps
    return alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
