"""Original single-file Stable Diffusion checkpoint layout (CompVis LDM keys) <-> diffusers names.

An SD1.x single file (`v1-5-pruned-emaonly.safetensors` / `.ckpt`) holds the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text encoder under
`cond_stage_model.transformer.`; everything else (DDPM schedule buffers, EMA counters and shadow
weights, `logvar`, ...) is not a weight of the exported modules and is ignored.

The mapping reproduces diffusers 0.27.2's single-file conversion (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, the CLIP prefix strip). It is driven by the diffusers configs
(number of blocks, layers_per_block, which blocks have attention), so it covers the real SD1.5 and
narrower SD1.5-shaped models alike. The only reshape is the VAE mid-block attention: LDM stores
q/k/v/proj_out as 1×1 convs (C,C,1,1), diffusers as linears (C,C) -- the same bytes.

API:
    m = LdmKeyMap(unet_config, vae_config)
    m.to_diffusers(ldm_key)             -> (component, diffusers_key) or None (not a weight we map)
    m.to_ldm(component, diffusers_key)  -> full LDM key
    convert_ldm_state_dict(sd, unet_config, vae_config) -> ({component: state dict}, unmapped keys)
    to_ldm_state_dict({component: state dict}, unet_config, vae_config) -> LDM state dict
"""
from typing import Dict, Iterable, List, Optional, Tuple

import torch

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
# SD-XL style text prefix, stripped the same way by diffusers
_TEXT_PREFIX_ALT = "conditioner.embedders.0.transformer."

_UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
_VAE_RESNET = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("nin_shortcut", "conv_shortcut")]
_VAE_ATTN = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]


def _has_attn(block_type: str) -> bool:
    return "CrossAttn" in block_type or block_type.startswith("Attn")


class _PrefixTable:
    """Bijective table of module-path prefixes; keys map by their longest matching prefix."""

    def __init__(self):
        self.fwd: Dict[str, str] = {}
        self.inv: Dict[str, str] = {}

    def add(self, a: str, b: str) -> None:
        assert a not in self.fwd and b not in self.inv, (a, b)
        self.fwd[a] = b
        self.inv[b] = a

    def add_sub(self, a: str, b: str, subs: Iterable[Tuple[str, str]]) -> None:
        for x, y in subs:
            self.add(f"{a}.{x}", f"{b}.{y}")

    @staticmethod
    def _lookup(table: Dict[str, str], key: str) -> Optional[str]:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            p = ".".join(parts[:n])
            if p in table:
                return table[p] + "." + ".".join(parts[n:])
        return None

    def forward(self, key: str) -> Optional[str]:
        return self._lookup(self.fwd, key)

    def inverse(self, key: str) -> Optional[str]:
        return self._lookup(self.inv, key)


def unet_table(config: dict) -> _PrefixTable:
    t = _PrefixTable()
    boc = list(config["block_out_channels"])
    nb = len(boc)
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise ValueError("ldm: per-block layers_per_block lists are not supported for single-file checkpoints")
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * (nb - 1) + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (nb - 1)))
    t.add("time_embed.0", "time_embedding.linear_1")
    t.add("time_embed.2", "time_embedding.linear_2")
    t.add("input_blocks.0.0", "conv_in")
    t.add("out.0", "conv_norm_out")
    t.add("out.2", "conv_out")
    n = 1
    for i in range(nb):
        for j in range(lpb):
            t.add_sub(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET)
            if _has_attn(down[i]):
                t.add(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}")
            n += 1
        if i != nb - 1:
            t.add(f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            n += 1
    t.add_sub("middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    t.add("middle_block.1", "mid_block.attentions.0")
    t.add_sub("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    n = 0
    for i in range(nb):
        attn = _has_attn(up[i])
        for j in range(lpb + 1):
            t.add_sub(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET)
            if attn:
                t.add(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}")
            if j == lpb and i != nb - 1:
                t.add(f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
            n += 1
    # ControlNet-free UNet: nothing else
    return t


def vae_table(config: dict) -> _PrefixTable:
    t = _PrefixTable()
    nb = len(config["block_out_channels"])
    lpb = int(config.get("layers_per_block", 2))
    for side in ("encoder", "decoder"):
        t.add(f"{side}.conv_in", f"{side}.conv_in")
        t.add(f"{side}.conv_out", f"{side}.conv_out")
        t.add(f"{side}.norm_out", f"{side}.conv_norm_out")
        t.add_sub(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET)
        t.add_sub(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET)
        t.add_sub(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTN)
    t.add("quant_conv", "quant_conv")
    t.add("post_quant_conv", "post_quant_conv")
    for i in range(nb):
        for j in range(lpb):
            t.add_sub(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i != nb - 1:
            t.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    for i in range(nb):
        d = nb - 1 - i
        for j in range(lpb + 1):
            t.add_sub(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", _VAE_RESNET)
        if i != 0:
            t.add(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{d}.upsamplers.0.conv")
    return t


def is_vae_attn_weight(diffusers_key: str) -> bool:
    """The 8 weights stored (C,C,1,1) in LDM and (C,C) in diffusers."""
    return ".mid_block.attentions.0.to_" in diffusers_key and diffusers_key.endswith(".weight")


class LdmKeyMap:
    def __init__(self, unet_config: dict, vae_config: dict):
        self.unet = unet_table(unet_config)
        self.vae = vae_table(vae_config)

    def to_diffusers(self, key: str) -> Optional[Tuple[str, str]]:
        p = PREFIXES["unet"]
        if key.startswith(p):
            d = self.unet.forward(key[len(p):])
            return ("unet", d) if d is not None else None
        p = PREFIXES["vae"]
        if key.startswith(p):
            d = self.vae.forward(key[len(p):])
            return ("vae", d) if d is not None else None
        for p in (PREFIXES["text_encoder"], _TEXT_PREFIX_ALT):
            if key.startswith(p):
                rest = key[len(p):]
                if rest.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
                    rest = "text_model." + rest  # NovelAI-style keys without text_model.
                return "text_encoder", rest
        return None

    def to_ldm(self, component: str, key: str) -> str:
        if component == "text_encoder":
            return PREFIXES["text_encoder"] + key
        table = {"unet": self.unet, "vae": self.vae}[component]
        k = table.inverse(key)
        if k is None:
            raise KeyError(f"ldm: no LDM name for {component} key {key!r}")
        return PREFIXES[component] + k


def convert_ldm_state_dict(sd: Dict[str, torch.Tensor], unet_config: dict, vae_config: dict
                           ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], List[str]]:
    """Splits and renames an LDM state dict. Returns ({'unet'|'vae'|'text_encoder': state dict},
    keys under a component prefix that have no diffusers name). Keys outside the three prefixes
    (schedule buffers, EMA, logvar ...) are silently dropped."""
    m = LdmKeyMap(unet_config, vae_config)
    out: Dict[str, Dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    unmapped: List[str] = []
    for k, v in sd.items():
        r = m.to_diffusers(k)
        if r is None:
            if k.startswith((PREFIXES["unet"], PREFIXES["vae"])):
                unmapped.append(k)
            continue
        comp, dk = r
        if comp == "vae" and is_vae_attn_weight(dk) and v.dim() == 4:
            v = v[:, :, 0, 0]
        elif comp == "vae" and is_vae_attn_weight(dk) and v.dim() == 3:
            v = v[:, :, 0]
        out[comp][dk] = v
    return out, unmapped


def to_ldm_state_dict(components: Dict[str, Dict[str, torch.Tensor]], unet_config: dict, vae_config: dict
                      ) -> Dict[str, torch.Tensor]:
    """Inverse of convert_ldm_state_dict (diffusers component state dicts -> one LDM dict)."""
    m = LdmKeyMap(unet_config, vae_config)
    out: Dict[str, torch.Tensor] = {}
    for comp, sd in components.items():
        for k, v in sd.items():
            if comp == "vae" and is_vae_attn_weight(k) and v.dim() == 2:
                v = v.reshape(v.shape[0], v.shape[1], 1, 1)
            out[m.to_ldm(comp, k)] = v
    return out
