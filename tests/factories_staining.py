"""A tiny ``pixcell-virtual-staining`` release in its published layout and key names.

The release (Hugging Face StonyBrook-CVLab/pixcell-virtual-staining) holds per stain
``ckpts/lora/<name>_lora.pth`` (peft LoRA, rank 4, on PixCell-1024's ``attn2`` projections:
``transformer_blocks.{i}.attn2.{to_q,to_k,to_v,to_out.0}.lora_{A,B}.default.weight``) and
``ckpts/mlp/<name>_mlp.pth`` (the flow MLP's state dict). These writers make the same files
at toy widths, with random weights, for the tiny PixCell-1024 / UNI-2h of
:mod:`tests.factories_published`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from factories_published import TINY_UNI_DIM, tiny_pixcell_config, write_models_dir
from safetensors.torch import save_file

LORA_RANK = 4
TINY_FLOW = {"in_channels": TINY_UNI_DIM, "time_embed_dim": 32, "model_channels": 32, "bottleneck_channels": 24,
             "out_channels": TINY_UNI_DIM, "num_res_blocks": 6}  # the release: 1536, 1024, 1024, 1024, 1536, 6


def _save(state: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file(state, str(path))
    else:
        torch.save(state, path.with_suffix(".pth"))
        path = path.with_suffix(".pth")
    return path


def lora_state(seed: int = 0, zero_b: bool = False, with_base: bool = False, scale: float = 0.2
               ) -> dict[str, torch.Tensor]:
    """peft's names for a rank-4 LoRA on every ``attn2`` target of the tiny PixCell-1024.

    ``with_base`` adds the ``base_layer`` weights a full ``transformer.state_dict()`` after
    ``add_adapter`` holds (the release's files may be such a dict)."""
    from pipelines.pixcell import PixCellTransformer2DModel

    torch.manual_seed(seed)
    model = PixCellTransformer2DModel.from_config(tiny_pixcell_config(16))
    state = {}
    for name, module in model.named_modules():
        if not name.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")):
            continue
        out_f, in_f = module.weight.shape
        state[f"{name}.lora_A.default.weight"] = torch.randn(LORA_RANK, in_f) * scale
        b = torch.zeros(out_f, LORA_RANK) if zero_b else torch.randn(out_f, LORA_RANK) * scale
        state[f"{name}.lora_B.default.weight"] = b
        if with_base:
            state[f"{name}.base_layer.weight"] = module.weight.detach().clone()
            state[f"{name}.base_layer.bias"] = module.bias.detach().clone()
    return state


def flow_state(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """The flow MLP's published state dict at toy width; every weight (also the zero-init ones) random."""
    from pipelines.pixcell_staining import FlowMLP

    torch.manual_seed(seed)
    model = FlowMLP(**{**TINY_FLOW, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_staining_release(folder: Path, names: tuple[str, ...] = ("mist_her2",), fmt: str = "pth", seed: int = 0,
                           **lora_kwargs) -> Path:
    """``pixcell-virtual-staining`` as downloaded: ``ckpts/lora/<name>_lora.pth``, ``ckpts/mlp/<name>_mlp.pth``."""
    folder = Path(folder)
    for i, name in enumerate(names):
        _save(lora_state(seed + i, **lora_kwargs), folder / "ckpts" / "lora" / f"{name}_lora", fmt)
        _save(flow_state(seed + i), folder / "ckpts" / "mlp" / f"{name}_mlp", fmt)
    (folder / "README.md").write_text("tiny pixcell-virtual-staining release (random weights)\n")
    return folder


def write_staining_models_dir(root: Path, fmt: str = "pth", **kwargs) -> dict[str, Path]:
    """A models folder: PixCell-1024, UNI-2h, the SD3.5 VAE and the staining release beside them."""
    paths = write_models_dir(Path(root), tokens=16)
    paths["staining"] = write_staining_release(Path(root) / "pixcell-virtual-staining", fmt=fmt, **kwargs)
    return paths
