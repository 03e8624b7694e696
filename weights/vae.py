"""SD1.5 VAE (diffusers AutoencoderKL) as two TorchScript-able modules.

`VaeEncoder(config)`: image B×3×H×W in [-1, 1] -> (mean, logvar) of the latent posterior,
logvar clamped to [-30, 20] exactly as diffusers' DiagonalGaussianDistribution does.
`VaeDecoder(config)`: latents (already divided by the scaling factor) -> image.

Parameter names are diffusers AutoencoderKL names: the encoder holds `encoder.*` + `quant_conv.*`,
the decoder `decoder.*` + `post_quant_conv.*`, so a full AutoencoderKL state dict splits into both
(see `split_state_dict`). `config` is the diffusers vae/config.json dict.

The mid-block attention follows diffusers' AttnProcessor (single head of width C, scale C^-1/2,
softmax in float32, residual connection); it is written as plain matmul + softmax (no baddbmm with
beta=0 over uninitialised memory, which can give NaNs on torch 1.13).
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code resnet_eps=1e-6 and GroupNorm eps=1e-6


def _check_config(config: dict) -> None:
    act = config.get("act_fn", "silu")
    if act != "silu":
        raise ValueError(f"vae config: act_fn {act!r} is not supported (only 'silu')")
    for t in config.get("down_block_types", []):
        if t != "DownEncoderBlock2D":
            raise ValueError(f"vae config: down block type {t!r} is not supported")
    for t in config.get("up_block_types", []):
        if t != "UpDecoderBlock2D":
            raise ValueError(f"vae config: up block type {t!r} is not supported")
    if config.get("norm_type", "group") != "group":
        raise ValueError("vae config: only norm_type 'group' is supported")
    if not config.get("mid_block_add_attention", True):
        raise ValueError("vae config: mid_block_add_attention=false is not supported")


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding (temb_channels=None)."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float = _RESNET_EPS):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.has_shortcut = cin != cout
        # Identity has no parameters, so the state dict only has conv_shortcut.* where diffusers has it
        self.conv_shortcut = nn.Conv2d(cin, cout, 1, 1, 0) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(h)
        h = F.silu(self.norm2(h))
        h = self.conv2(h)
        return self.conv_shortcut(x) + h


class Downsample(nn.Module):
    """diffusers Downsample2D(use_conv=True, padding=0): pad right/bottom by 1, 3×3 stride-2 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, [0, 1, 0, 1], mode="constant", value=0.0))


class Upsample(nn.Module):
    """diffusers Upsample2D(use_conv=True): nearest ×2, 3×3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel in older torch
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if dtype == torch.bfloat16:
            x = x.to(dtype)
        return self.conv(x)


class SelfAttention(nn.Module):
    """diffusers Attention as built for the VAE mid block (heads = 1, dim_head = C, residual)."""

    def __init__(self, c: int, groups: int, eps: float = _RESNET_EPS):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=eps, affine=True)
        self.to_q = nn.Linear(c, c, bias=True)
        self.to_k = nn.Linear(c, c, bias=True)
        self.to_v = nn.Linear(c, c, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(c, c, bias=True)])
        self.scale = float(c) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        t = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)  # B×HW×C
        q = self.to_q(t)
        k = self.to_k(t)
        v = self.to_v(t)
        scores = torch.matmul(q, k.transpose(1, 2)) * self.scale
        probs = scores.float().softmax(dim=-1).to(q.dtype)  # upcast_softmax=True
        o = torch.matmul(probs, v)
        for lin in self.to_out:
            o = lin(o)
        o = o.transpose(1, 2).reshape(b, c, h, w)
        return o + residual


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D (temb None): resnet, attention, resnet."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(c, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        x = self.resnets[1](x)
        return x


class ResnetStack(nn.Module):
    """diffusers DownEncoderBlock2D (sampler 'down') / UpDecoderBlock2D (sampler 'up'): resnets, then an
    optional resampler. The unused sampler list stays empty, so it adds no state-dict names."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, sampler: str):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if sampler == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if sampler == "up" else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nn.Module):
    """diffusers vae Encoder (double_z=True)."""

    def __init__(self, config: dict):
        super().__init__()
        boc: List[int] = [int(c) for c in config["block_out_channels"]]
        groups = int(config.get("norm_num_groups", 32))
        layers = int(config.get("layers_per_block", 2))
        latent = int(config.get("latent_channels", 4))
        self.conv_in = nn.Conv2d(int(config.get("in_channels", 3)), boc[0], 3, 1, 1)
        blocks = []
        cout = boc[0]
        for i, c in enumerate(boc):
            cin, cout = cout, c
            blocks.append(ResnetStack(cin, cout, layers, groups, "down" if i != len(boc) - 1 else ""))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(boc[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, boc[-1], eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(boc[-1], 2 * latent, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        x = F.silu(self.conv_norm_out(x))
        return self.conv_out(x)


class Decoder(nn.Module):
    """diffusers vae Decoder (norm_type 'group')."""

    def __init__(self, config: dict):
        super().__init__()
        boc: List[int] = [int(c) for c in config["block_out_channels"]]
        groups = int(config.get("norm_num_groups", 32))
        layers = int(config.get("layers_per_block", 2))
        latent = int(config.get("latent_channels", 4))
        self.conv_in = nn.Conv2d(latent, boc[-1], 3, 1, 1)
        self.mid_block = MidBlock(boc[-1], groups)
        rev = list(reversed(boc))
        blocks = []
        cout = rev[0]
        for i, c in enumerate(rev):
            cin, cout = cout, c
            blocks.append(ResnetStack(cin, cout, layers + 1, groups, "up" if i != len(rev) - 1 else ""))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(groups, boc[0], eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(boc[0], int(config.get("out_channels", 3)), 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        x = F.silu(self.conv_norm_out(x))
        return self.conv_out(x)


class VaeEncoder(nn.Module):
    """forward(image B×3×H×W in [-1,1]) -> (mean, logvar), logvar clamped to [-30, 20]."""

    def __init__(self, config: dict):
        super().__init__()
        _check_config(config)
        latent = int(config.get("latent_channels", 4))
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.in_channels = int(config.get("in_channels", 3))

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if image.dim() != 4 or image.size(1) != self.in_channels:
            raise ValueError("vae_encoder: expected image B×" + str(self.in_channels)
                             + "×H×W, got shape " + str(image.shape))
        moments = self.quant_conv(self.encoder(image))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        return mean, logvar


class VaeDecoder(nn.Module):
    """forward(latents B×4×h×w, already divided by the scaling factor) -> image B×3×8h×8w."""

    def __init__(self, config: dict):
        super().__init__()
        _check_config(config)
        latent = int(config.get("latent_channels", 4))
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(config)
        self.latent_channels = latent

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.size(1) != self.latent_channels:
            raise ValueError("vae_decoder: expected latents B×" + str(self.latent_channels)
                             + "×h×w, got shape " + str(latents.shape))
        return self.decoder(self.post_quant_conv(latents))


# Old diffusers / LDM-converted checkpoints name the mid attention query/key/value/proj_attn
# (and group_norm); current diffusers names are to_q/to_k/to_v/to_out.0.
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames legacy attention keys to current diffusers names and squeezes (C,C,1,1) attention
    weights to (C,C). Other keys are returned unchanged."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".mid_block.attentions." in k and len(parts) >= 2 and parts[-2] in _LEGACY_ATTN:
            k = ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
        if ".mid_block.attentions." in k and k.endswith(".weight") and v.dim() == 4 \
                and v.shape[2] == 1 and v.shape[3] == 1 and "group_norm" not in k:
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def split_state_dict(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Splits a full AutoencoderKL state dict into (encoder part, decoder part, the rest)."""
    enc: Dict[str, torch.Tensor] = {}
    dec: Dict[str, torch.Tensor] = {}
    rest: Dict[str, torch.Tensor] = {}
    for k, v in normalize_state_dict(sd).items():
        if k.startswith("encoder.") or k.startswith("quant_conv."):
            enc[k] = v
        elif k.startswith("decoder.") or k.startswith("post_quant_conv."):
            dec[k] = v
        else:
            rest[k] = v
    return enc, dec, rest
