"""A tiny random-weight ``PixCell-256-Cell-ControlNet`` folder in the published layout.

model_index.json (``PixCellControlNetPipeline``), ``controlnet/`` (config with the base
transformer's keys plus ``n_blocks``, ``diffusion_pytorch_model.safetensors``, the release's
``.py``), ``transformer/`` (the PixCell-256 base, class ``PixCellTransformer2DModelControlNet``),
``scheduler/`` and ``vae/`` (config only unless ``vae_weights``). Sizes shrink; names don't.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from factories_published import (
    PIXCELL_256_CONFIG,
    REMOTE_CODE_TRIPWIRE,
    SD35_VAE_CONFIG,
    TINY_VAE,
    tiny_pixcell_config,
    write_sd35_vae,
)
from safetensors.torch import save_file

# controlnet/config.json: the PixCell-256 transformer keys it copies, plus n_blocks.
PIXCELL_CONTROLNET_CONFIG = {**PIXCELL_256_CONFIG, "_class_name": "PixCellControlNet", "n_blocks": 27}
CONTROLNET_TRANSFORMER_CLASS = "PixCellTransformer2DModelControlNet"
CONTROLNET_INDEX = {
    "_class_name": "PixCellControlNetPipeline", "_diffusers_version": "0.32.2",
    "controlnet": ["pixcell_controlnet", "PixCellControlNet"],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["pixcell_controlnet_transformer", CONTROLNET_TRANSFORMER_CLASS],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_controlnet_config(**overrides) -> dict:
    """The published ControlNet config at toy width/depth (the tiny PixCell-256 base's dims)."""
    base = tiny_pixcell_config(1)
    return {**base, "_class_name": "PixCellControlNet", "n_blocks": base["num_layers"], **overrides}


def _save(model: torch.nn.Module, folder: Path, config: dict, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / script).write_text(REMOTE_CODE_TRIPWIRE)


def write_pixcell_controlnet(folder: Path, seed: int = 0, zero: bool = False, transformer: bool = True,
                             vae_weights: bool = False, controlnet_overrides: dict | None = None) -> Path:
    """Write the release folder. ``zero``: the ControlNet as initialised (zero outputs), else
    its zero layers get random weights, as after training; ``transformer=False`` leaves the
    base weights out (config only); ``vae_weights`` puts SD3.5 VAE weights in ``vae/``."""
    from diffusers import DPMSolverMultistepScheduler

    from pipelines.pixcell import PixCellTransformer2DModel
    from pipelines.pixcell_controlnet import PixCellControlNet

    folder = Path(folder)
    torch.manual_seed(seed)
    base_config = {**tiny_pixcell_config(1), "_class_name": CONTROLNET_TRANSFORMER_CLASS}
    base = PixCellTransformer2DModel.from_config({k: v for k, v in base_config.items() if not k.startswith("_")})
    with torch.no_grad():
        base.caption_projection.uncond_embedding.normal_()
        base.proj_out.weight.normal_(std=0.05)
    if transformer:
        _save(base, folder / "transformer", base_config, "pixcell_controlnet_transformer.py")
    else:
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "config.json").write_text(json.dumps(base_config, indent=2))
    config = tiny_controlnet_config(**(controlnet_overrides or {}))
    net = PixCellControlNet.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    net.transformer.load_state_dict(base.state_dict())  # a copy of the base, as training starts
    if not zero:
        with torch.no_grad():
            net.cond_pos_embed.proj.weight.normal_(std=0.5)
            for lin in net.controlnet_blocks:
                lin.weight.normal_(std=0.5)
                lin.bias.normal_(std=0.1)
    _save(net, folder / "controlnet", config, "pixcell_controlnet.py")
    (folder / "model_index.json").write_text(json.dumps(CONTROLNET_INDEX, indent=2))
    DPMSolverMultistepScheduler().save_config(str(folder / "scheduler"))
    if vae_weights:
        write_sd35_vae(folder / "vae")
    else:
        (folder / "vae").mkdir()
        (folder / "vae" / "config.json").write_text(json.dumps({**SD35_VAE_CONFIG, **TINY_VAE}, indent=2))
    return folder
