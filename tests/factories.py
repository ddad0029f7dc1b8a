"""Tiny, fast, randomly initialised models for tests (real architectures, toy sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from pipelines.conditioning import EmbeddingConditioner
from pipelines.embedding_sampler import EmbeddingSampler
from pipelines.embedding_to_image import EmbeddingToImagePipeline
from pipelines.encoders import PatchEncoder
from studio.data.samples import load_sample
from studio.io import to_tensor

DIM = 16


def tiny_pipeline(seed: int = 0, embed_dim: int = DIM) -> EmbeddingToImagePipeline:
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        mid_block_add_attention=False)
    conditioner = EmbeddingConditioner(embed_dim=embed_dim, cross_attention_dim=16, map_channels=2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=6, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    with torch.no_grad():
        conditioner.null_embedding.normal_()
    return EmbeddingToImagePipeline(vae=vae, unet=unet, conditioner=conditioner,
                                    scheduler=DDIMScheduler(num_train_timesteps=100))


def tiny_encoder(folder: Path, embed_dim: int = DIM, seed: int = 0) -> Path:
    """A PatchEncoder with BatchNorm statistics calibrated on real patches (as training
    would leave them; a random network in eval mode otherwise maps everything alike)."""
    torch.manual_seed(seed)
    model = PatchEncoder(embed_dim=embed_dim, channels=(8, 8, 16, 16, 16))
    image = load_sample("skin")
    patches = to_tensor(np.stack([image[y:y + 64, x:x + 64] for y in range(0, 640, 64) for x in range(0, 640, 64)]))
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # cumulative average: one pass calibrates
            layer.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(patches)
    model.eval().save_pretrained(folder)
    return folder


def tiny_checkpoint(folder: Path) -> Path:
    """A saved pipeline plus the encoder it 'was trained with' (encoder.json)."""
    tiny_pipeline().save_pretrained(folder)
    encoder = tiny_encoder(folder.parent / f"{folder.name}-encoder")
    (folder / "encoder.json").write_text(json.dumps({"encoder": str(encoder), "embed_dim": DIM}))
    # A label-conditional embedding sampler for 2x2 grids (128x128 tiles) of two labels.
    gen = torch.Generator().manual_seed(0)
    grids = torch.cat([torch.randn(6, 4, DIM, generator=gen) + 1, torch.randn(6, 4, DIM, generator=gen) - 1])
    EmbeddingSampler(rank=2).fit(grids, ["skin"] * 6 + ["tumour"] * 6).save(folder / "embedding-sampler")
    return folder


def tiny_mask_pipeline(seed: int = 0):
    """The tiny base pipeline plus a ControlNet copied from its UNet (PanNuke classes), with
    the zero convolutions perturbed so the mask visibly changes the output."""
    from pipelines.mask_to_image import MaskToImagePipeline, controlnet_from_base
    from studio.data.samples import PANNUKE_CLASSES

    base = tiny_pipeline(seed)
    torch.manual_seed(seed + 1)
    controlnet = controlnet_from_base(base.unet, len(PANNUKE_CLASSES), base.latent_factor)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name \
                    or "conv_out" in name:
                p.normal_(0, 0.05)
    return MaskToImagePipeline(vae=base.vae, unet=base.unet, conditioner=base.conditioner, controlnet=controlnet,
                               scheduler=base.scheduler, class_names=list(PANNUKE_CLASSES.values()))


def tiny_mask_checkpoint(folder: Path) -> Path:
    tiny_mask_pipeline().save_pretrained(folder)
    return folder
