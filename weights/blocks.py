"""Shared SD1.5 UNet / ControlNet building blocks with named feature taps.

Parameter names and shapes follow diffusers 0.27 exactly (ResnetBlock2D, Transformer2DModel,
BasicTransformerBlock, Attention, FeedForward/GEGLU, Downsample2D, Upsample2D, the down/mid/up blocks),
so a diffusers state dict loads with strict=True.

Feature taps (docs/method.md §Layers): every module that has taps gets the full layer ids it may record
at construction time (`key_*` string attributes, "" = never recorded). forward() receives
`want: Dict[str, bool]` (the validated capture set) and `feats: Dict[str, Tensor]` (the output dict,
filled in forward order); a tap is recorded only when its id is in `want`. Token tensors (B, n, C) are
stored as (B, C, h, w); attention maps as (B, heads, n_q, n_k). Attention probabilities are computed
explicitly only for layers whose `-map` was requested; every other layer takes the fast path
(F.scaled_dot_product_attention where this torch has it, decided at construction time).

Everything here is scriptable with torch.jit.script on torch 1.13 and 2.x.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def tokens_to_map(x: Tensor, h: int, w: int) -> Tensor:
    """(B, n, C) row-major tokens -> (B, C, h, w) contiguous."""
    b = x.shape[0]
    c = x.shape[2]
    return x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def timestep_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Tensor:
    """diffusers get_timestep_embedding (scale 1, max_period 10000); timesteps 1-d."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].float() * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, [0, 1, 0, 0])
    return emb


def broadcast_timestep(timestep: Tensor, sample: Tensor) -> Tensor:
    """0-d or 1-d timestep -> 1-d of batch size on the sample's device."""
    t = timestep.to(sample.device)
    if t.dim() == 0:
        t = t.reshape(1)
    return t.expand(sample.shape[0])


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm='default', pre-norm, SiLU). Taps: -increment, -out."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0, prefix: str = ""):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
        else:
            self.conv_shortcut = None
        self.output_scale_factor = float(output_scale_factor)
        self.key_increment = prefix + "-increment" if prefix else ""
        self.key_out = prefix + "-out" if prefix else ""

    def forward(self, x: Tensor, temb: Tensor, want: Dict[str, bool], feats: Dict[str, Tensor]) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = h + t
        h = self.conv2(F.silu(self.norm2(h)))
        if self.key_increment in want:
            feats[self.key_increment] = h
        shortcut = x
        if self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(x)
        out = (shortcut + h) / self.output_scale_factor
        if self.key_out in want:
            feats[self.key_out] = out
        return out


class SDPACore(nn.Module):
    """Fast attention core on torch >= 2: F.scaled_dot_product_attention. Only instantiated (and
    therefore only compiled) where torch has it."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b = q.shape[0]
        nq = q.shape[1]
        c = q.shape[2]
        d = c // self.heads
        qh = q.reshape(b, nq, self.heads, d).transpose(1, 2)
        kh = k.reshape(b, k.shape[1], self.heads, d).transpose(1, 2)
        vh = v.reshape(b, v.shape[1], self.heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh)
        return o.transpose(1, 2).reshape(b, nq, c)


class MathCore(nn.Module):
    """Attention core without SDPA (torch 1.13): softmax(q kᵀ · scale) v per head with bmm.

    On the CPU, when the score matrix (batch·heads × n_q × n_k) has more than `chunk_elems` elements,
    the queries are taken in slices whose scores stay within 2^20 elements (4 MiB in float32), so they
    stay in cache: every row's softmax and output are computed exactly as before (the same sums; the
    GEMM may round the last bit differently for another M), while a 64² self-attention at 512 px no
    longer writes and re-reads a 512 MiB score tensor (about 1.5x faster on 2 cores)."""

    def __init__(self, heads: int, chunk_elems: int = 1 << 22):
        super().__init__()
        self.heads = heads
        self.chunk_elems = chunk_elems

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b = q.shape[0]
        nq = q.shape[1]
        nk = k.shape[1]
        c = q.shape[2]
        d = c // self.heads
        bh = b * self.heads
        scale = float(d) ** -0.5
        qh = q.reshape(b, nq, self.heads, d).permute(0, 2, 1, 3).reshape(bh, nq, d)
        kh = k.reshape(b, nk, self.heads, d).permute(0, 2, 1, 3).reshape(bh, nk, d)
        vh = v.reshape(b, v.shape[1], self.heads, d).permute(0, 2, 1, 3).reshape(bh, v.shape[1], d)
        kt = kh.transpose(1, 2)
        if (not q.is_cuda) and bh * nq * nk > self.chunk_elems:
            rows = max(16, (1 << 20) // (bh * nk))
            outs: List[Tensor] = []
            for s in range(0, nq, rows):
                p = torch.softmax(torch.bmm(qh[:, s:s + rows], kt) * scale, dim=-1)
                outs.append(torch.bmm(p, vh))
            o = torch.cat(outs, 1)
        else:
            p = torch.softmax(torch.bmm(qh, kt) * scale, dim=-1)
            o = torch.bmm(p, vh)
        return o.reshape(b, self.heads, nq, d).permute(0, 2, 1, 3).reshape(b, nq, c)


class Attention(nn.Module):
    """diffusers Attention (AttnProcessor semantics): to_q/to_k/to_v (no bias), to_out.0 (bias).

    Taps (recorded right after the projections, before the head split): key_q, key_k, key_v, and
    key_map = probabilities (B, heads, n_q, n_k), computed explicitly only when requested."""

    def __init__(self, query_dim: int, cross_attention_dim: int, heads: int, dim_head: int,
                 upcast_attention: bool = False, key_q: str = "", key_k: str = "", key_v: str = "",
                 key_map: str = "", use_sdpa: Optional[bool] = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = float(dim_head) ** -0.5
        self.upcast = upcast_attention
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(cross_attention_dim, inner, bias=False)
        self.to_v = nn.Linear(cross_attention_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=True), nn.Dropout(0.0)])
        if use_sdpa is None:
            use_sdpa = HAS_SDPA
        self.core = SDPACore(heads) if (use_sdpa and not upcast_attention) else MathCore(heads)
        self.key_q = key_q
        self.key_k = key_k
        self.key_v = key_v
        self.key_map = key_map

    def forward(self, x: Tensor, context: Tensor, h: int, w: int, want: Dict[str, bool],
                feats: Dict[str, Tensor]) -> Tensor:
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(context)
        if self.key_q in want:
            feats[self.key_q] = tokens_to_map(q, h, w)
        if self.key_k in want:
            feats[self.key_k] = tokens_to_map(k, h, w)
        if self.key_v in want:
            feats[self.key_v] = tokens_to_map(v, h, w)
        if self.key_map in want or self.upcast:
            b = q.shape[0]
            nq = q.shape[1]
            nk = k.shape[1]
            c = q.shape[2]
            d = c // self.heads
            qh = q.reshape(b, nq, self.heads, d).permute(0, 2, 1, 3).reshape(b * self.heads, nq, d)
            kh = k.reshape(b, nk, self.heads, d).permute(0, 2, 1, 3).reshape(b * self.heads, nk, d)
            vh = v.reshape(b, nk, self.heads, d).permute(0, 2, 1, 3).reshape(b * self.heads, nk, d)
            if self.upcast:
                scores = torch.bmm(qh.float(), kh.float().transpose(1, 2)) * self.scale
            else:
                scores = torch.bmm(qh, kh.transpose(1, 2)) * self.scale
            p = torch.softmax(scores, dim=-1).to(q.dtype)
            if self.key_map in want:
                feats[self.key_map] = p.reshape(b, self.heads, nq, nk)
            o = torch.bmm(p, vh).reshape(b, self.heads, nq, d).permute(0, 2, 1, 3).reshape(b, nq, c)
        else:
            o = self.core(q, k, v)
        return self.to_out[0](o)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn='geglu', mult=4): net.0 = GEGLU, net.1 dropout, net.2 Linear.
    Tap: key_inner = GEGLU output."""

    def __init__(self, dim: int, mult: int = 4, key_inner: str = ""):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])
        self.key_inner = key_inner

    def forward(self, x: Tensor, h: int, w: int, want: Dict[str, bool], feats: Dict[str, Tensor]) -> Tensor:
        y = self.net[0](x)
        if self.key_inner in want:
            feats[self.key_inner] = tokens_to_map(y, h, w)
        return self.net[2](y)


class BasicTransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock (layer_norm, self-attn, cross-attn, GEGLU FF). Prefix e.g.
    'down-level0-repeat0-vit-block0'. Taps: -self-q/k/v/map, -cross-q/-cross-map, -ffn-inner, -out."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int,
                 upcast_attention: bool = False, prefix: str = "", use_sdpa: Optional[bool] = None):
        super().__init__()
        p = prefix

        def key(s: str) -> str:
            return p + s if p else ""

        self.norm1 = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.attn1 = Attention(dim, dim, heads, dim_head, upcast_attention, key("-self-q"), key("-self-k"),
                               key("-self-v"), key("-self-map"), use_sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head, upcast_attention, key("-cross-q"),
                               "", "", key("-cross-map"), use_sdpa)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
        self.ff = FeedForward(dim, 4, key("-ffn-inner"))
        self.key_out = key("-out")

    def forward(self, x: Tensor, context: Tensor, h: int, w: int, want: Dict[str, bool],
                feats: Dict[str, Tensor]) -> Tensor:
        n = self.norm1(x)
        x = self.attn1(n, n, h, w, want, feats) + x
        n = self.norm2(x)
        x = self.attn2(n, context, h, w, want, feats) + x
        n = self.norm3(x)
        x = self.ff(n, h, w, want, feats) + x
        if self.key_out in want:
            feats[self.key_out] = tokens_to_map(x, h, w)
        return x


class Transformer2DModel(nn.Module):
    """diffusers Transformer2DModel (continuous input; 1x1-conv or linear projections). Prefix e.g.
    'down-level0-repeat0-vit'; blocks get prefix + '-block{k}'. Tap: -out."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool = False, upcast_attention: bool = False,
                 prefix: str = "", use_sdpa: Optional[bool] = None):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast_attention,
                                  (prefix + "-block" + str(i)) if prefix else "", use_sdpa)
            for i in range(num_layers)])
        if use_linear_projection:
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, 1, stride=1, padding=0)
        self.key_out = prefix + "-out" if prefix else ""

    def forward(self, x: Tensor, context: Tensor, want: Dict[str, bool], feats: Dict[str, Tensor]) -> Tensor:
        b = x.shape[0]
        h = x.shape[2]
        w = x.shape[3]
        residual = x
        y = self.norm(x)
        if self.use_linear:
            c = y.shape[1]
            y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
            y = self.proj_in(y)
        else:
            y = self.proj_in(y)
            c = y.shape[1]
            y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
        for blk in self.transformer_blocks:
            y = blk(y, context, h, w, want, feats)
        if self.use_linear:
            y = self.proj_out(y)
            y = y.reshape(b, h, w, y.shape[2]).permute(0, 3, 1, 2).contiguous()
        else:
            y = y.reshape(b, h, w, y.shape[2]).permute(0, 3, 1, 2).contiguous()
            y = self.proj_out(y)
        out = y + residual
        if self.key_out in want:
            feats[self.key_out] = out
        return out


class Downsample2D(nn.Module):
    """diffusers Downsample2D(use_conv=True): 3x3 conv stride 2. Tap: -out."""

    def __init__(self, channels: int, padding: int = 1, prefix: str = ""):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.key_out = prefix + "-out" if prefix else ""

    def forward(self, x: Tensor, want: Dict[str, bool], feats: Dict[str, Tensor]) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, [0, 1, 0, 1], mode="constant", value=0.0)
        y = self.conv(x)
        if self.key_out in want:
            feats[self.key_out] = y
        return y


class Upsample2D(nn.Module):
    """diffusers Upsample2D(use_conv=True): nearest x2 (or to the given size), 3x3 conv. Tap: -out."""

    def __init__(self, channels: int, prefix: str = ""):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.key_out = prefix + "-out" if prefix else ""

    def forward(self, x: Tensor, size: Optional[List[int]], want: Dict[str, bool],
                feats: Dict[str, Tensor]) -> Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:
            x = x.float()
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        if dtype == torch.bfloat16:
            x = x.to(dtype)
        y = self.conv(x)
        if self.key_out in want:
            feats[self.key_out] = y
        return y


def _p(prefix: str, s: str) -> str:
    return prefix + s if prefix else ""


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (has_attn) or DownBlock2D. Prefix e.g. 'down-level0'.
    forward returns (hidden, skip outputs in diffusers order)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, has_attn: bool,
                 add_downsample: bool, groups: int, eps: float, heads: int, transformer_layers: int,
                 cross_attention_dim: int, downsample_padding: int = 1, use_linear_projection: bool = False,
                 upcast_attention: bool = False, prefix: str = "", use_sdpa: Optional[bool] = None):
        super().__init__()
        self.has_attn = has_attn
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps,
                          1.0, _p(prefix, "-repeat" + str(i) + "-res"))
            for i in range(num_layers)])
        if has_attn:
            self.attentions = nn.ModuleList([
                Transformer2DModel(heads, out_channels // heads, out_channels, transformer_layers,
                                   cross_attention_dim, groups, use_linear_projection, upcast_attention,
                                   _p(prefix, "-repeat" + str(i) + "-vit"), use_sdpa)
                for i in range(num_layers)])
        else:
            # placeholder list (no parameters) so forward can zip in TorchScript
            self.attentions = nn.ModuleList([Identity3() for _ in range(num_layers)])
        self.has_down = add_downsample
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding,
                                                            _p(prefix, "-downsampler"))])
        else:
            self.downsamplers = nn.ModuleList([])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, want: Dict[str, bool],
                feats: Dict[str, Tensor]) -> Tuple[Tensor, List[Tensor]]:
        outs: List[Tensor] = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = resnet(x, temb, want, feats)
            x = attn(x, context, want, feats)
            outs.append(x)
        for down in self.downsamplers:
            x = down(x, want, feats)
            outs.append(x)
        return x, outs


class Identity3(nn.Module):
    """No-op stand-in for a Transformer2DModel in blocks without attention (no parameters)."""

    def forward(self, x: Tensor, context: Tensor, want: Dict[str, bool], feats: Dict[str, Tensor]) -> Tensor:
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnets.0, attentions.0, resnets.1. Prefix 'mid'."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, heads: int,
                 transformer_layers: int, cross_attention_dim: int, output_scale_factor: float = 1.0,
                 use_linear_projection: bool = False, upcast_attention: bool = False, prefix: str = "",
                 use_sdpa: Optional[bool] = None):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, output_scale_factor,
                          _p(prefix, "-repeat" + str(i) + "-res"))
            for i in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, channels // heads, channels, transformer_layers, cross_attention_dim,
                               groups, use_linear_projection, upcast_attention, _p(prefix, "-vit"), use_sdpa)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, want: Dict[str, bool],
                feats: Dict[str, Tensor]) -> Tensor:
        x = self.resnets[0](x, temb, want, feats)
        x = self.attentions[0](x, context, want, feats)
        x = self.resnets[1](x, temb, want, feats)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (has_attn) or UpBlock2D. Prefix e.g. 'up-level1'. Consumes skips from the end."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, has_attn: bool, add_upsample: bool, groups: int, eps: float, heads: int,
                 transformer_layers: int, cross_attention_dim: int, use_linear_projection: bool = False,
                 upcast_attention: bool = False, prefix: str = "", use_sdpa: Optional[bool] = None):
        super().__init__()
        res = []
        for i in range(num_layers):
            skip_ch = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_output_channel if i == 0 else out_channels
            res.append(ResnetBlock2D(res_in + skip_ch, out_channels, temb_channels, groups, eps, 1.0,
                                     _p(prefix, "-repeat" + str(i) + "-res")))
        self.resnets = nn.ModuleList(res)
        self.num_layers = num_layers
        if has_attn:
            self.attentions = nn.ModuleList([
                Transformer2DModel(heads, out_channels // heads, out_channels, transformer_layers,
                                   cross_attention_dim, groups, use_linear_projection, upcast_attention,
                                   _p(prefix, "-repeat" + str(i) + "-vit"), use_sdpa)
                for i in range(num_layers)])
        else:
            self.attentions = nn.ModuleList([Identity3() for _ in range(num_layers)])
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, _p(prefix, "-upsampler"))])
        else:
            self.upsamplers = nn.ModuleList([])

    def forward(self, x: Tensor, skips: List[Tensor], temb: Tensor, context: Tensor,
                upsample_size: Optional[List[int]], want: Dict[str, bool], feats: Dict[str, Tensor]) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            s = skips.pop()
            x = torch.cat([x, s], dim=1)
            x = resnet(x, temb, want, feats)
            x = attn(x, context, want, feats)
        for up in self.upsamplers:
            x = up(x, upsample_size, want, feats)
        return x
