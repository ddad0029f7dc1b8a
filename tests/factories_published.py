"""Tiny random-weight folders in exactly the published layouts (PixCell, SD3.5 VAE, UNI-2h).

Each writer takes the published configuration (every key the release's config.json has),
shrinks only the sizes, and writes the files under the names the release uses, so the
loaders meet the same layout a user's download has. The real weights cannot be fetched
here; these are what the tests run on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.published import SD35_VAE_CONFIG

# --------------------------------------------------------------------------- PixCell
# transformer/config.json of the releases (PixCellTransformer2DModel's keys).
PIXCELL_256_CONFIG = {
    "_class_name": "PixCellTransformer2DModel", "_diffusers_version": "0.32.2",
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
    "attention_type": "default", "caption_channels": 1536, "caption_num_tokens": 1, "cross_attention_dim": 1152,
    "dropout": 0.0, "in_channels": 16, "interpolation_scale": 0.5, "norm_elementwise_affine": False,
    "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "out_channels": 32, "patch_size": 2, "sample_size": 32,
    "upcast_attention": False, "use_additional_conditions": False,
}
PIXCELL_1024_CONFIG = {**PIXCELL_256_CONFIG, "caption_num_tokens": 16, "interpolation_scale": 2, "sample_size": 128}
PIXCELL_INDEX = {
    "_class_name": "PixCellPipeline", "_diffusers_version": "0.32.2",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "transformer": ["pixcell_transformer_2d", "PixCellTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# The release ships its model code beside the weights; the studio must never import it.
REMOTE_CODE_TRIPWIRE = 'raise RuntimeError("remote code from the release folder was imported")\n'

# --------------------------------------------------------------------------- SD3.5 VAE
TINY_VAE = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 128}

TINY_UNI_DIM = 48


def tiny_pixcell_config(tokens: int = 1, **overrides) -> dict:
    """A published config at toy width/depth (geometry of PixCell-256: 32x32 latents, patch 2)."""
    base = PIXCELL_1024_CONFIG if tokens > 1 else PIXCELL_256_CONFIG
    return {**base, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16,
            "caption_channels": TINY_UNI_DIM, "sample_size": 32, **overrides}


def write_pixcell(folder: Path, tokens: int = 1, seed: int = 0, **overrides) -> Path:
    """``PixCell-256`` / ``-1024`` as downloaded: model_index.json, scheduler/, transformer/
    (config, diffusion_pytorch_model.safetensors, the release's .py file), vae/ (config only)."""
    from diffusers import DPMSolverMultistepScheduler

    from pipelines.pixcell import PixCellTransformer2DModel

    folder = Path(folder)
    config = tiny_pixcell_config(tokens, **overrides)
    torch.manual_seed(seed)
    model = PixCellTransformer2DModel.from_config(config)
    with torch.no_grad():  # PixArt zero-inits nothing, but give the null embedding and outputs some scale
        model.caption_projection.uncond_embedding.normal_()
        model.proj_out.weight.normal_(std=0.05)
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "transformer" / "pixcell_transformer_2d.py").write_text(REMOTE_CODE_TRIPWIRE)
    (folder / "model_index.json").write_text(json.dumps(PIXCELL_INDEX, indent=2))
    DPMSolverMultistepScheduler().save_config(str(folder / "scheduler"))
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps({**SD35_VAE_CONFIG, **TINY_VAE}, indent=2))
    return folder


def write_sd35_vae(folder: Path, seed: int = 0) -> Path:
    """The ``vae/`` subfolder of stabilityai/stable-diffusion-3.5-large as downloaded, tiny."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in {**SD35_VAE_CONFIG, **TINY_VAE}.items() if not k.startswith("_")}
    AutoencoderKL(**kwargs).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# --------------------------------------------------------------------------- UNI-2h
def tiny_uni2h_config():
    from pipelines.uni2h import UNI2hConfig

    return UNI2hConfig(img_size=56, patch_size=14, embed_dim=TINY_UNI_DIM, depth=2, num_heads=2)


def write_uni2h(folder: Path, fmt: str = "safetensors", seed: int = 0, config=None) -> Path:
    """``UNI2-h`` as MahmoodLab publishes it (timm config.json + weights), tiny.

    ``fmt="bin"`` writes the release's ``pytorch_model.bin`` (a torch pickle of the state
    dict, to be converted); ``"safetensors"`` the converted ``model.safetensors``.
    """
    from pipelines.uni2h import UNI2h

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config or tiny_uni2h_config()
    torch.manual_seed(seed)
    model = UNI2h(config)
    with torch.no_grad():  # the release's LayerScale is trained far above its 1e-5 init
        for block in model.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
        model.cls_token.normal_()
        model.reg_token.normal_()
    (folder / "config.json").write_text(json.dumps(config.to_json(), indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    return folder


def write_models_dir(root: Path, tokens: int = 1) -> dict[str, Path]:
    """A models folder as a user would fill it: PixCell, UNI-2h (converted) and the SD3.5 VAE."""
    root = Path(root)
    name = "PixCell-1024" if tokens > 1 else "PixCell-256"
    return {"pixcell": write_pixcell(root / name, tokens=tokens), "uni2h": write_uni2h(root / "UNI2-h"),
            "vae": write_sd35_vae(root / "sd3.5-vae")}
