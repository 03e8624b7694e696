"""CLIP text encoder (transformers CLIPTextModel) as a TorchScript-able module.

`ClipTextModel(config)`: forward(input_ids int64 B×L) -> last_hidden_state B×L×hidden (after the final
layer norm). `config` is the transformers text_encoder/config.json dict. Parameter names equal
transformers' (`text_model.*`). Positions are always 0..L-1 (L <= max_position_embeddings), computed in
forward: a `text_model.embeddings.position_ids` entry in a checkpoint is accepted and ignored
(`clean_state_dict`), because merged community checkpoints are known to carry broken ones.

Math follows transformers 4.38 CLIPTextTransformer without an attention mask (what Stable Diffusion
1.5 pipelines feed): token + position embeddings, pre-LN encoder layers with causal self-attention
(q scaled after projection), quick_gelu MLP, final_layer_norm.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

IGNORED_KEYS = ("text_model.embeddings.position_ids",)


class ClipAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"text_encoder config: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        self.heads = heads
        self.head_dim = hidden // heads
        self.scale = float(self.head_dim) ** -0.5
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = (self.q_proj(x) * self.scale).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        w = torch.matmul(q, k.transpose(2, 3))  # B×H×n×n
        w = w.masked_fill(causal, float("-inf"))
        p = F.softmax(w, dim=-1)
        o = torch.matmul(p, v).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(o)


class ClipMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)
        self.quick = act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.quick:
            x = x * torch.sigmoid(1.702 * x)
        else:
            x = F.gelu(x)
        return self.fc2(x)


class ClipEncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, act: str, eps: float):
        super().__init__()
        self.self_attn = ClipAttention(hidden, heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = ClipMLP(hidden, inter, act)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        x = x + self.mlp(self.layer_norm2(x))
        return x


class ClipEncoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inter: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList([ClipEncoderLayer(hidden, heads, inter, act, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class ClipEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, hidden)
        self.position_embedding = nn.Embedding(max_pos, hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.size(1)
        pos = torch.arange(n, dtype=torch.long, device=input_ids.device).unsqueeze(0)
        return self.token_embedding(input_ids) + self.position_embedding(pos)


class ClipTextTransformer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden = int(config["hidden_size"])
        act = str(config.get("hidden_act", "quick_gelu"))
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"text_encoder config: hidden_act {act!r} is not supported (quick_gelu, gelu)")
        eps = float(config.get("layer_norm_eps", 1e-5))
        self.max_positions = int(config.get("max_position_embeddings", 77))
        self.vocab_size = int(config.get("vocab_size", 49408))
        self.embeddings = ClipEmbeddings(self.vocab_size, hidden, self.max_positions)
        self.encoder = ClipEncoder(int(config["num_hidden_layers"]), hidden, int(config["num_attention_heads"]),
                                   int(config["intermediate_size"]), act, eps)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError("text_encoder: expected input_ids B×L, got shape " + str(input_ids.shape))
        if input_ids.dtype != torch.long:
            raise ValueError("text_encoder: input_ids must be int64, got " + str(input_ids.dtype))
        n = input_ids.size(1)
        if n < 1 or n > self.max_positions:
            raise ValueError("text_encoder: sequence length " + str(n) + " is outside 1.."
                             + str(self.max_positions))
        x = self.embeddings(input_ids)
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).triu(1)
        x = self.encoder(x, causal)
        return self.final_layer_norm(x)


class ClipTextModel(nn.Module):
    """forward(input_ids int64 B×L) -> last_hidden_state B×L×hidden."""

    def __init__(self, config: dict):
        super().__init__()
        self.text_model = ClipTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)


def clean_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drops entries a CLIPTextModel checkpoint may carry that are not weights (position_ids)."""
    return {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
