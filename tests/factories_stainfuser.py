"""Tiny random-weight StainFuser checkpoints in the release's layout.

The release (R-J96/stainFuser, HF ``R-J/StainFuser``) saves one state dict of its wrapper
module, whose attributes are ``encoder`` (AutoencoderKL), ``conditioner`` (a ControlNetModel
built from the UNet config, plus an ``encoder_projector`` Linear(4, cross_dim)),
``noise_predictor`` (UNet2DConditionModel plus its own ``encoder_projector``) and
``noise_scheduler`` (PNDM, no tensors), next to the JSON configs of ``src/configs/``. This
factory rebuilds that wrapper at toy sizes independently of the loader under test (through
diffusers' own ``ControlNetModel.from_unet``) and writes its ``state_dict()`` as
``.safetensors`` (with or without DataParallel's ``module.`` prefix) or as a tensor-only ``.pth``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipelines.stainfuser_published import SD21B_SCHEDULER_CONFIG, SD21B_UNET_CONFIG, SD21B_VAE_CONFIG

# The published configs, every key kept, only the sizes shrunk (64 px tiles, 8x8 latents).
TINY_UNET_CONFIG = {
    **SD21B_UNET_CONFIG, "attention_head_dim": [2, 4], "block_out_channels": [16, 32], "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8,
}
TINY_VAE_CONFIG = {**SD21B_VAE_CONFIG, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
                   "norm_num_groups": 4, "sample_size": 64}


class ReleaseWrapper(nn.Module):
    """The release's wrapper module: what its checkpoint's key names come from."""

    def __init__(self, unet_config: dict, vae_config: dict, seed: int = 0):
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

        super().__init__()
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
        cross = unet_config["cross_attention_dim"]
        unet.encoder_projector = nn.Linear(4, cross)
        controlnet.encoder_projector = nn.Linear(4, cross)
        with torch.no_grad():  # ControlNet zero-inits its outputs; give them scale so the path is exercised
            for p in list(controlnet.controlnet_down_blocks.parameters()) + \
                    list(controlnet.controlnet_mid_block.parameters()) + \
                    list(controlnet.controlnet_cond_embedding.conv_out.parameters()) + \
                    list(unet.conv_out.parameters()):
                p.normal_(std=0.05)
        self.encoder = AutoencoderKL.from_config(vae_config)
        self.conditioner = controlnet
        self.noise_predictor = unet


def stainfuser_state_dict(seed: int = 0, unet_config: dict | None = None, vae_config: dict | None = None,
                          prefix: str = "") -> dict[str, torch.Tensor]:
    model = ReleaseWrapper(unet_config or TINY_UNET_CONFIG, vae_config or TINY_VAE_CONFIG, seed)
    return {f"{prefix}{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def write_stainfuser(folder: Path, fmt: str = "safetensors", prefix: str = "", seed: int = 0,
                     configs: bool = True, name: str = "stainfuser") -> Path:
    """``folder/`` as a user assembles it: the weights file (``fmt`` safetensors or pth) and,
    with ``configs``, the release's ``sd21b_*_config.json`` (tiny sizes). Returns the weights file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = stainfuser_state_dict(seed, prefix=prefix)
    path = folder / f"{name}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    elif fmt == "pth":
        torch.save(tensors, path)
    else:
        raise ValueError(fmt)
    if configs:
        write_configs(folder)
    return path


def write_configs(folder: Path, unet: dict | None = None) -> None:
    folder = Path(folder)
    for name, config in (("sd21b_unet_config.json", unet or TINY_UNET_CONFIG),
                         ("sd21b_vae_config.json", TINY_VAE_CONFIG),
                         ("sd21b_scheduler_config.json", SD21B_SCHEDULER_CONFIG)):
        (folder / name).write_text(json.dumps({**config, "_diffusers_version": "0.26.3"}, indent=2))
