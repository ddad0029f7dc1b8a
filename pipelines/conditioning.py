"""How SSL embedding tokens condition a latent-diffusion UNet.

:class:`EmbeddingConditioner` turns a grid of embedding tokens ``(B, gh*gw, D)`` into the
two inputs a conditional UNet takes:

* **cross-attention states** ``(B, gh*gw, C)``: the tokens, layer-normed and projected to
  the UNet's ``cross_attention_dim`` (PixCell and Graikos et al. condition by
  cross-attention on foundation-model embeddings);
* **a spatial map** ``(B, M, h, w)`` at latent resolution: each token projected to ``M``
  channels and upsampled (bilinear) over the region it describes, concatenated to the
  noisy latent. A UNet's queries carry no position, so cross-attention alone cannot tell
  which token describes which region; the map gives every latent pixel its local
  embedding, which turns generation into structured decoding and keeps large images
  consistent with their embedding grid.

A learned **null embedding** replaces the tokens for classifier-free guidance (dropped
with probability ``p`` during training, used as the unconditional branch at sampling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from studio.errors import InputError


class EmbeddingConditioner(ModelMixin, ConfigMixin):
    """Embedding tokens -> (cross-attention states, spatial map).

    Args:
        embed_dim: dimension ``D`` of the encoder's tokens.
        cross_attention_dim: the UNet's cross-attention width ``C``.
        map_channels: channels ``M`` of the spatial map concatenated to the latent.
        token_pixels: image pixels one token describes along each side (64: a 256x256
            tile has a 4x4 grid); the map is laid out from it, so any image size works.
        latent_factor: image pixels per latent pixel (the VAE's downsampling).
    """

    @register_to_config
    def __init__(self, embed_dim: int = 64, cross_attention_dim: int = 64, map_channels: int = 8,
                 token_pixels: int = 64, latent_factor: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.to_context = nn.Sequential(nn.Linear(embed_dim, cross_attention_dim), nn.GELU(),
                                        nn.Linear(cross_attention_dim, cross_attention_dim))
        self.to_map = nn.Linear(embed_dim, map_channels)
        self.null_embedding = nn.Parameter(torch.zeros(embed_dim))

    @property
    def token_latent(self) -> int:
        """Latent pixels one token covers along each side."""
        return self.config.token_pixels // self.config.latent_factor

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The token grid an image of ``height`` x ``width`` pixels is described by."""
        tp = self.config.token_pixels
        return max(1, round(height / tp)), max(1, round(width / tp))

    def check(self, tokens: torch.Tensor, grid: tuple[int, int]) -> None:
        if tokens.ndim != 3:
            raise InputError("embeddings", f"shape {tuple(tokens.shape)}; expected (batch, tokens, dim)")
        if tokens.shape[-1] != self.config.embed_dim:
            raise InputError("embeddings", f"dimension {tokens.shape[-1]}, but this model was trained on "
                                           f"{self.config.embed_dim}-dimensional embeddings (wrong encoder?)")
        if tokens.shape[1] not in (1, grid[0] * grid[1]):
            raise InputError("embeddings", f"{tokens.shape[1]} tokens do not fit a {grid[0]}x{grid[1]} grid "
                                           f"(give 1 global token or {grid[0] * grid[1]})")

    def null_like(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.null_embedding.to(tokens.dtype).expand_as(tokens)

    def drop(self, tokens: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Classifier-free-guidance dropout: whole samples replaced by the null embedding."""
        if p <= 0:
            return tokens
        keep = torch.rand(tokens.shape[0], generator=generator, device="cpu").to(tokens.device) >= p
        return torch.where(keep.view(-1, 1, 1), tokens, self.null_like(tokens))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` (B, N, D) on ``grid`` -> states (B, N, C) and map (B, M, h, w)."""
        self.check(tokens, grid)
        normed = self.norm(tokens)
        states = self.to_context(normed)
        b, n, _ = tokens.shape
        per_token = self.to_map(normed)  # (B, N, M)
        gh, gw = (1, 1) if n == 1 else grid
        small = per_token.transpose(1, 2).reshape(b, -1, gh, gw)
        spatial = F.interpolate(small, size=latent_hw, mode="bilinear", align_corners=False) if n > 1 else \
            small.expand(-1, -1, *latent_hw)
        return states, spatial.contiguous()
