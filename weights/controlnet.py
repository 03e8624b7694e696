"""diffusers ControlNetModel (lllyasviel/sd-controlnet-canny architecture, diffusers 0.27 names).

    from weights.controlnet import ControlNetModel
    cn = ControlNetModel(json.load(open("controlnet/config.json")))
    cn.load_state_dict(sd, strict=True)
    res = torch.jit.script(cn.eval())(sample, timestep, ehs, cond01, 1.0)
    unet(sample, timestep, ehs, capture, res[:-1], res[-1])

forward returns the 12 down residuals (UNet skip order: conv_in output, each down resnet(+attention)
output, each downsampler output) followed by the mid residual, each multiplied by conditioning_scale
(guess_mode=False). `controlnet_cond` is B x 3 x H x W in [0, 1] (H, W = 8x the latent size).
"""
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weights.blocks import DownBlock, MidBlock, TimestepEmbedding, broadcast_timestep, timestep_embedding
from weights.unet import UNetConfig


class ControlNetConditioningEmbedding(nn.Module):
    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels: List[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        blocks = []
        for i in range(len(block_out_channels) - 1):
            ci = block_out_channels[i]
            co = block_out_channels[i + 1]
            blocks.append(nn.Conv2d(ci, ci, 3, padding=1))
            blocks.append(nn.Conv2d(ci, co, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, 3, padding=1)

    def forward(self, cond: Tensor) -> Tensor:
        x = F.silu(self.conv_in(cond))
        for b in self.blocks:
            x = F.silu(b(x))
        return self.conv_out(x)


class ControlNetModel(nn.Module):
    """Args: config = diffusers controlnet/config.json dict; use_sdpa as in UNet2DConditionModel."""

    def __init__(self, config: Dict[str, Any], use_sdpa: Optional[bool] = None):
        super().__init__()
        cfg = UNetConfig(config, controlnet=True)
        n = cfg.n
        c = config
        self.flip_sin_to_cos = cfg.flip_sin_to_cos
        self.freq_shift = cfg.freq_shift
        self.bgr = c.get("controlnet_conditioning_channel_order", "rgb") == "bgr"
        self.global_pool = bool(c.get("global_pool_conditions", False))
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.boc[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(cfg.boc[0], cfg.temb)
        self.time_dim = cfg.boc[0]
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.boc[0], int(c.get("conditioning_channels", 3)),
            [int(x) for x in c.get("conditioning_embedding_out_channels", [16, 32, 96, 256])])
        downs = []
        zeros = [nn.Conv2d(cfg.boc[0], cfg.boc[0], 1)]
        out_ch = cfg.boc[0]
        empty = ""
        for i, t in enumerate(cfg.down_types):
            in_ch = out_ch
            out_ch = cfg.boc[i]
            final = i == n - 1
            downs.append(DownBlock(in_ch, out_ch, cfg.temb, cfg.layers[i], t == "CrossAttnDownBlock2D",
                                   not final, cfg.groups, cfg.eps, cfg.heads[i], cfg.tlayers[i], cfg.cross_dim[i],
                                   cfg.downsample_padding, cfg.use_linear, cfg.upcast, empty, use_sdpa))
            for _ in range(cfg.layers[i]):
                zeros.append(nn.Conv2d(out_ch, out_ch, 1))
            if not final:
                zeros.append(nn.Conv2d(out_ch, out_ch, 1))
        self.down_blocks = nn.ModuleList(downs)
        self.controlnet_down_blocks = nn.ModuleList(zeros)
        self.mid_block = MidBlock(cfg.boc[-1], cfg.temb, cfg.groups, cfg.eps, cfg.heads[-1], cfg.tlayers[-1],
                                  cfg.cross_dim[-1], cfg.mid_scale, cfg.use_linear, cfg.upcast, empty, use_sdpa)
        self.controlnet_mid_block = nn.Conv2d(cfg.boc[-1], cfg.boc[-1], 1)

    @torch.jit.export
    def conditioning(self, controlnet_cond: Tensor) -> Tensor:
        """The conditioning embedding (controlnet_cond_embedding output) alone."""
        if self.bgr:
            controlnet_cond = torch.flip(controlnet_cond, [1])
        return self.controlnet_cond_embedding(controlnet_cond)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, controlnet_cond: Tensor,
                conditioning_scale: float = 1.0) -> List[Tensor]:
        want: Dict[str, bool] = {}
        feats: Dict[str, Tensor] = {}
        t = broadcast_timestep(timestep, sample)
        t_emb = timestep_embedding(t, self.time_dim, self.flip_sin_to_cos, self.freq_shift).to(sample.dtype)
        emb = self.time_embedding(t_emb)
        x = self.conv_in(sample)
        x = x + self.conditioning(controlnet_cond.to(x.dtype))
        skips: List[Tensor] = [x]
        for blk in self.down_blocks:
            x, outs = blk(x, emb, encoder_hidden_states, want, feats)
            skips.extend(outs)
        x = self.mid_block(x, emb, encoder_hidden_states, want, feats)
        res: List[Tensor] = []
        i = 0
        for zc in self.controlnet_down_blocks:
            res.append(zc(skips[i]))
            i += 1
        res.append(self.controlnet_mid_block(x))
        out: List[Tensor] = []
        for r in res:
            if self.global_pool:
                r = torch.mean(r, dim=[2, 3], keepdim=True)
            out.append(r * conditioning_scale)
        return out
