"""SD1.5 UNet2DConditionModel (diffusers 0.27 architecture and parameter names) with GDF feature taps.

    from weights.unet import UNet2DConditionModel, layer_shapes, LAYER_IDS_FORWARD
    m = UNet2DConditionModel(json.load(open("unet/config.json")))   # diffusers config dict
    m.load_state_dict(sd, strict=True)                                # diffusers names
    s = torch.jit.script(m.eval())
    d = s(sample, timestep, ehs, ["up-level1-repeat1-vit-block0-cross-q"], None, None)
    d["out"]  # predicted noise; d[id] = (B, C, h, w) or (B, heads, n_q, n_k) for '-map' ids

Layer ids (docs/method.md §Layers) are validated at the start of forward: an unknown id raises
"unknown layer id: <id>"; `*-cross-k` / `*-cross-v` raise "layer id is not spatial ... : <id>" (GDF
legally names them in configs but always discards them; we refuse rather than silently return nothing).
The returned dict holds the requested ids in forward order, then 'out'.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from weights.blocks import (DownBlock, MidBlock, TimestepEmbedding, UpBlock, broadcast_timestep,
                            timestep_embedding)

RES_SUFFIXES = ["res-increment", "res-out"]
BLOCK_SUFFIXES = ["self-q", "self-k", "self-v", "self-map", "cross-q", "cross-map", "ffn-inner", "out"]


def _per_block(v: Any, n: int) -> List[Any]:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError("config list has %d entries, expected %d: %r" % (len(v), n, v))
        return list(v)
    return [v] * n


class UNetConfig:
    """Normalised view of a diffusers UNet2DConditionModel / ControlNetModel config dict."""

    def __init__(self, config: Dict[str, Any], controlnet: bool = False):
        c = dict(config)
        self.raw = c
        self.down_types = list(c.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        self.up_types = list(c.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        n = len(self.down_types)
        self.n = n
        self.in_channels = int(c.get("in_channels", 4))
        self.out_channels = int(c.get("out_channels", 4))
        self.boc = [int(x) for x in c.get("block_out_channels", [320, 640, 1280, 1280])]
        self.layers = [int(x) for x in _per_block(c.get("layers_per_block", 2), n)]
        self.groups = int(c.get("norm_num_groups", 32))
        self.eps = float(c.get("norm_eps", 1e-5))
        heads = c.get("num_attention_heads", None) or c.get("attention_head_dim", 8)
        self.heads = [int(x) for x in _per_block(heads, n)]
        self.cross_dim = [int(x) for x in _per_block(c.get("cross_attention_dim", 768), n)]
        self.tlayers = [int(x) for x in _per_block(c.get("transformer_layers_per_block", 1), n)]
        self.flip_sin_to_cos = bool(c.get("flip_sin_to_cos", True))
        self.freq_shift = float(c.get("freq_shift", 0))
        self.downsample_padding = int(c.get("downsample_padding", 1))
        self.mid_scale = float(c.get("mid_block_scale_factor", 1))
        self.use_linear = bool(c.get("use_linear_projection", False))
        self.upcast = bool(c.get("upcast_attention", False))
        self.mid_type = c.get("mid_block_type", "UNetMidBlock2DCrossAttn") or "UNetMidBlock2DCrossAttn"
        self.center_input_sample = bool(c.get("center_input_sample", False))
        if len(self.boc) != n or (not controlnet and len(self.up_types) != n):
            raise ValueError("block_out_channels / down_block_types / up_block_types lengths differ")
        for t in self.down_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError("unsupported down block type: %s" % t)
        if not controlnet:
            for t in self.up_types:
                if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                    raise ValueError("unsupported up block type: %s" % t)
        if self.mid_type != "UNetMidBlock2DCrossAttn":
            raise ValueError("unsupported mid_block_type: %s" % self.mid_type)
        unsupported = {
            "act_fn": ("silu",), "class_embed_type": (None,), "addition_embed_type": (None,),
            "encoder_hid_dim_type": (None,), "encoder_hid_dim": (None,),
            "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",),
            "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
            "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
            "only_cross_attention": (False,), "dual_cross_attention": (False,), "num_class_embeds": (None,),
            "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0, 1), "attention_type": ("default",),
            "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
            "reverse_transformer_layers_per_block": (None,), "global_pool_conditions": (False, True),
            "controlnet_conditioning_channel_order": ("rgb", "bgr"),
        }
        for k, ok in unsupported.items():
            if k in c and c[k] not in ok and not (isinstance(c[k], list) and all(x in ok for x in c[k])):
                raise ValueError("unsupported UNet config value %s=%r (supported: %r)" % (k, c[k], ok))
        self.temb = self.boc[0] * 4


def _layer_table(config: Dict[str, Any], size: int) -> List[Tuple[str, List[int]]]:
    """(id, per-image shape) for every legal layer id in forward order, image size `size` (latent size//8)."""
    cfg = UNetConfig(config)
    n = cfg.n
    lat = size // 8
    spatial = [lat]
    for i in range(n - 1):
        spatial.append((spatial[-1] + 1) // 2)  # 3x3 conv stride 2 pad 1: ceil(s/2)
    nk = 77
    rows: List[Tuple[str, List[int]]] = []

    def vit(prefix: str, c: int, s: int, heads: int, tl: int) -> None:
        hw = s * s
        for k in range(tl):
            b = prefix + "-vit-block" + str(k)
            rows.append((b + "-self-q", [c, s, s]))
            rows.append((b + "-self-k", [c, s, s]))
            rows.append((b + "-self-v", [c, s, s]))
            rows.append((b + "-self-map", [heads, hw, hw]))
            rows.append((b + "-cross-q", [c, s, s]))
            rows.append((b + "-cross-map", [heads, hw, nk]))
            rows.append((b + "-ffn-inner", [4 * c, s, s]))
            rows.append((b + "-out", [c, s, s]))
        rows.append((prefix + "-vit-out", [c, s, s]))

    rows.append(("unet-in", [cfg.in_channels, lat, lat]))
    rows.append(("unet-after-conv-in", [cfg.boc[0], lat, lat]))
    for L in range(n):
        c = cfg.boc[L]
        s = spatial[L]
        attn = cfg.down_types[L] == "CrossAttnDownBlock2D"
        for r in range(cfg.layers[L]):
            p = "down-level%d-repeat%d" % (L, r)
            rows.append((p + "-res-increment", [c, s, s]))
            rows.append((p + "-res-out", [c, s, s]))
            if attn:
                vit(p, c, s, cfg.heads[L], cfg.tlayers[L])
        if L < n - 1:
            rows.append(("down-level%d-downsampler-out" % L, [c, spatial[L + 1], spatial[L + 1]]))
    c = cfg.boc[-1]
    s = spatial[-1]
    rows.append(("mid-repeat0-res-increment", [c, s, s]))
    rows.append(("mid-repeat0-res-out", [c, s, s]))
    vit("mid", c, s, cfg.heads[-1], cfg.tlayers[-1])
    rows.append(("mid-repeat1-res-increment", [c, s, s]))
    rows.append(("mid-repeat1-res-out", [c, s, s]))
    rboc = list(reversed(cfg.boc))
    rheads = list(reversed(cfg.heads))
    rtl = list(reversed(cfg.tlayers))
    rlayers = list(reversed(cfg.layers))
    for L in range(n):
        c = rboc[L]
        s = spatial[n - 1 - L]
        attn = cfg.up_types[L] == "CrossAttnUpBlock2D"
        for r in range(rlayers[L] + 1):
            p = "up-level%d-repeat%d" % (L, r)
            rows.append((p + "-res-increment", [c, s, s]))
            rows.append((p + "-res-out", [c, s, s]))
            if attn:
                vit(p, c, s, rheads[L], rtl[L])
        if L < n - 1:
            s2 = spatial[n - 2 - L]
            rows.append(("up-level%d-upsampler-out" % L, [c, s2, s2]))
    rows.append(("unet-out", [cfg.out_channels, lat, lat]))
    return rows


def layer_shapes(config: Dict[str, Any], size: int) -> Dict[str, List[int]]:
    """Every legal layer id -> per-image shape at image size `size` (C,h,w; maps (heads, n_q, n_k) with
    n_k = 77), in forward order. cross-k/cross-v and vae-out are not included."""
    return dict(_layer_table(config, size))


def LAYER_IDS_FORWARD(config: Dict[str, Any]) -> List[str]:
    """Every legal layer id in forward order (= the capture dict's order)."""
    return [k for k, _ in _layer_table(config, 64)]


class UNet2DConditionModel(nn.Module):
    """diffusers UNet2DConditionModel (SD1.x / SD2.x family) with named feature taps.

    Args:
      config: diffusers unet/config.json dict.
      use_sdpa: None = use F.scaled_dot_product_attention for the non-map layers where this torch has it
        (decided here, at construction, so the module scripts on torch 1.13 and 2.x); False = always the
        explicit softmax path.
    """

    def __init__(self, config: Dict[str, Any], use_sdpa: Optional[bool] = None):
        super().__init__()
        cfg = UNetConfig(config)
        n = cfg.n
        self.flip_sin_to_cos = cfg.flip_sin_to_cos
        self.freq_shift = cfg.freq_shift
        self.center_input_sample = cfg.center_input_sample
        self.num_upsamplers = n - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.boc[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(cfg.boc[0], cfg.temb)
        self.time_dim = cfg.boc[0]
        downs = []
        out_ch = cfg.boc[0]
        for i, t in enumerate(cfg.down_types):
            in_ch = out_ch
            out_ch = cfg.boc[i]
            downs.append(DownBlock(in_ch, out_ch, cfg.temb, cfg.layers[i], t == "CrossAttnDownBlock2D",
                                   i < n - 1, cfg.groups, cfg.eps, cfg.heads[i], cfg.tlayers[i], cfg.cross_dim[i],
                                   cfg.downsample_padding, cfg.use_linear, cfg.upcast, "down-level%d" % i, use_sdpa))
        self.down_blocks = nn.ModuleList(downs)
        self.mid_block = MidBlock(cfg.boc[-1], cfg.temb, cfg.groups, cfg.eps, cfg.heads[-1], cfg.tlayers[-1],
                                  cfg.cross_dim[-1], cfg.mid_scale, cfg.use_linear, cfg.upcast, "mid", use_sdpa)
        rboc = list(reversed(cfg.boc))
        rheads = list(reversed(cfg.heads))
        rtl = list(reversed(cfg.tlayers))
        rlayers = list(reversed(cfg.layers))
        rcross = list(reversed(cfg.cross_dim))
        ups = []
        out_ch = rboc[0]
        for i, t in enumerate(cfg.up_types):
            prev = out_ch
            out_ch = rboc[i]
            in_ch = rboc[min(i + 1, n - 1)]
            ups.append(UpBlock(in_ch, prev, out_ch, cfg.temb, rlayers[i] + 1, t == "CrossAttnUpBlock2D", i < n - 1,
                               cfg.groups, cfg.eps, rheads[i], rtl[i], rcross[i], cfg.use_linear, cfg.upcast,
                               "up-level%d" % i, use_sdpa))
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = nn.GroupNorm(cfg.groups, cfg.boc[0], eps=cfg.eps)
        self.conv_out = nn.Conv2d(cfg.boc[0], cfg.out_channels, 3, padding=1)
        self.layer_ids: List[str] = LAYER_IDS_FORWARD(config)
        self.valid_ids: Dict[str, bool] = {k: True for k in self.layer_ids}

    @torch.jit.export
    def layer_id_list(self) -> List[str]:
        """Every legal layer id in forward order."""
        return self.layer_ids

    def _want(self, capture: List[str]) -> Dict[str, bool]:
        want: Dict[str, bool] = {}
        for k in capture:
            if k not in self.valid_ids:
                if k.endswith("-cross-k") or k.endswith("-cross-v"):
                    raise ValueError("layer id is not spatial (cross-attention keys/values are text-side and "
                                     "never recorded): " + k)
                raise ValueError("unknown layer id: " + k)
            want[k] = True
        return want

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, capture: List[str],
                down_residuals: Optional[List[Tensor]] = None,
                mid_residual: Optional[Tensor] = None) -> Dict[str, Tensor]:
        want = self._want(capture)
        feats: Dict[str, Tensor] = {}
        if "unet-in" in want:
            feats["unet-in"] = sample
        # diffusers: upsample to the skip's size when the latent is not a multiple of 2**num_upsamplers
        factor = 2 ** self.num_upsamplers
        forward_upsample_size = False
        if sample.shape[-2] % factor != 0 or sample.shape[-1] % factor != 0:
            forward_upsample_size = True
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        t = broadcast_timestep(timestep, sample)
        t_emb = timestep_embedding(t, self.time_dim, self.flip_sin_to_cos, self.freq_shift).to(sample.dtype)
        emb = self.time_embedding(t_emb)

        x = self.conv_in(sample)
        if "unet-after-conv-in" in want:
            feats["unet-after-conv-in"] = x
        skips: List[Tensor] = [x]
        for blk in self.down_blocks:
            x, outs = blk(x, emb, encoder_hidden_states, want, feats)
            skips.extend(outs)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError("down_residuals: expected " + str(len(skips)) + " tensors, got "
                                 + str(len(down_residuals)))
            added: List[Tensor] = []
            for i in range(len(skips)):
                added.append(skips[i] + down_residuals[i])
            skips = added
        x = self.mid_block(x, emb, encoder_hidden_states, want, feats)
        if mid_residual is not None:
            x = x + mid_residual
        nblocks = len(self.up_blocks)
        i = 0
        for blk in self.up_blocks:
            n_res = blk.num_layers
            size: Optional[List[int]] = None
            if i < nblocks - 1 and forward_upsample_size:
                nxt = skips[len(skips) - n_res - 1]
                size = [nxt.shape[2], nxt.shape[3]]
            x = blk(x, skips, emb, encoder_hidden_states, size, want, feats)
            i += 1
        x = self.conv_out(torch.nn.functional.silu(self.conv_norm_out(x)))
        if "unet-out" in want:
            feats["unet-out"] = x
        feats["out"] = x
        return feats
