"""The jobs behind ``histostudio embed`` and ``histostudio generate embedding``.

Every run writes PNGs, a contact sheet, and ``manifest.json`` with what made each image
(checkpoint, encoder, seed, steps, guidance, source), so any output can be reproduced.
Embedding files are safetensors: ``embeddings`` ``(B, N, D)`` plus metadata (grid, encoder
identity, source names).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipelines.loading import dtype_kwargs
from studio.errors import InputError, WeightsError
from studio.io import atomic_path, atomic_write_text, to_tensor, write_image

Step = Callable[[int, int], None]  # (done, total) progress callback


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (as users write sizes) -> (height, width) (as tensors are shaped)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(text, "size must look like WIDTHxHEIGHT, e.g. 1024x1024") from None
    if w < 16 or h < 16:
        raise InputError(text, "size must be at least 16x16")
    return h, w


def parse_grid(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        gh, gw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(text, "grid must look like ROWSxCOLS, e.g. 4x4") from None
    if gh < 1 or gw < 1:
        raise InputError(text, "grid must be at least 1x1")
    return gh, gw


def load_source_image(source: str) -> tuple[np.ndarray, str]:
    """An image path or a shipped sample name -> uint8 RGB and a display name."""
    from studio.data.samples import SAMPLES, load_sample
    from studio.io import read_image

    if source in SAMPLES:
        return np.ascontiguousarray(load_sample(source)), source
    return read_image(source), Path(source).name


def fit_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize (area) to height x width."""
    h, w = image.shape[:2]
    scale = min(h / height, w / width)
    ch, cw = int(round(height * scale)), int(round(width * scale))
    y, x = (h - ch) // 2, (w - cw) // 2
    crop = np.ascontiguousarray(image[y:y + ch, x:x + cw])
    if (ch, cw) == (height, width):
        return crop
    t = F.interpolate(to_tensor(crop), size=(height, width), mode="area")
    return (t[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_embeddings(path: str | Path, embeddings: torch.Tensor, grid: tuple[int, int] | None, identity: str,
                    sources: list[str]) -> Path:
    meta = {"grid": "global" if grid is None else f"{grid[0]}x{grid[1]}", "encoder": identity,
            "sources": json.dumps(sources)}
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.contiguous().float()}, str(tmp), metadata=meta)
    return Path(path)


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, tuple[int, int] | None, dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such embeddings file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise InputError(path, f"is not a safetensors embeddings file ({exc})") from exc
    if "embeddings" not in tensors or tensors["embeddings"].ndim != 3:
        raise InputError(path, "needs an 'embeddings' tensor of shape (B, N, D)")
    grid = None if meta.get("grid", "global") == "global" else parse_grid(meta["grid"])
    return tensors["embeddings"], grid, meta


@dataclass
class GenerationSettings:
    checkpoint: str
    encoder: str
    steps: int = 20
    guidance: float = 2.0
    seed: int = 0
    scheduler: str = "ddim"
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def load_generation_pipeline(settings: GenerationSettings):
    """The pipeline from its folder, with the requested scheduler, dtype and device."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from pipelines.loading import latent_ddim

    folder = Path(settings.checkpoint)
    if not folder.exists():
        raise WeightsError(folder, "no such checkpoint: train one with `python -m training.ldm` or pass "
                                   "--checkpoint DIR")
    from pipelines.pixcell import is_pixcell_folder, load_pixcell_pipeline

    if is_pixcell_folder(folder):  # a published PixCell release: its own back-end, same interface
        return load_pixcell_pipeline(settings)
    dtypes = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if settings.dtype not in dtypes:
        raise InputError("--dtype", f"{settings.dtype!r}; use float32, bf16 or fp16")
    pipe = EmbeddingToImagePipeline.from_pretrained(folder, **dtype_kwargs(dtypes[settings.dtype]))
    schedulers = {"ddim": None, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if settings.scheduler not in schedulers:
        raise InputError("--scheduler", f"{settings.scheduler!r}; use {', '.join(schedulers)}")
    config = pipe.scheduler.config
    if settings.scheduler == "ddim":
        pipe.scheduler = latent_ddim(config)
    else:
        if config.get("prediction_type", "epsilon") == "epsilon" and config.get("beta_schedule") == "squaredcos_cap_v2":
            warnings.warn(f"--scheduler {settings.scheduler}: this epsilon-prediction model on the cosine schedule "
                          "samples reliably only with DDIM (x0 clipping); expect colour artefacts", stacklevel=2)
        spacing = ({"timestep_spacing": "trailing", "steps_offset": 0} if config.get("rescale_betas_zero_snr")
                   else {"timestep_spacing": "leading", "steps_offset": 1})  # zero terminal SNR starts at t = 999
        pipe.scheduler = schedulers[settings.scheduler].from_config(config, **spacing)
    pipe.to(settings.device)
    from studio.devices import enable_fast_attention

    enable_fast_attention(pipe, settings.device)  # xformers when installed on CUDA, else torch SDPA
    if settings.compile:
        pipe.unet = torch.compile(pipe.unet, dynamic=False)  # first call compiles (slow), later ones are fast
    return pipe


def embedding_encoder_for(settings: GenerationSettings):
    from pipelines.encoders import load_encoder

    folder = Path(settings.checkpoint) / "encoder.json"
    spec = settings.encoder
    if spec == "auto" and not folder.is_file():
        from pipelines.pixcell import is_pixcell_folder, uni2h_spec_for

        if is_pixcell_folder(settings.checkpoint):  # PixCell is conditioned on UNI-2h
            spec = uni2h_spec_for(settings.checkpoint)
    if spec == "auto":
        spec = json.loads(folder.read_text())["encoder"] if folder.is_file() else "builtin"
    return load_encoder(spec, device=settings.device)


def _autocast(settings: GenerationSettings):
    """bf16/fp16 autocast on CUDA for a float32 pipeline (:func:`studio.devices.autocast_context`);
    a no-op on the CPU, and when ``--dtype`` already loaded the weights in half precision."""
    from studio.devices import autocast_context

    return autocast_context(settings.device, enabled=settings.dtype == "float32")


def generate(pipe, embeddings: torch.Tensor, height: int, width: int, grid: tuple[int, int] | None,
             settings: GenerationSettings, seed: int, step: Step | None = None, total: int = 0, done: int = 0
             ) -> np.ndarray:
    """One image per embedding row, seeds ``seed, seed+1, ...``; returns uint8 (B, H, W, 3)."""
    images = []
    for i in range(embeddings.shape[0]):
        def tick(_pipe, k, _t, kwargs, i=i):
            if step:
                step(done + i * settings.steps + k + 1, total)
            return kwargs

        with _autocast(settings):
            out = pipe(embeddings[i:i + 1], height=height, width=width, grid=grid,
                       num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       generator=torch.Generator().manual_seed(seed + i), output_type="np", progress=False,
                       callback_on_step_end=tick)
        images.append((out.images[0] * 255 + 0.5).astype(np.uint8))
    return np.stack(images)


def write_outputs(out: Path, images: np.ndarray, names: list[str], rows: list, manifest: dict[str, Any]
                  ) -> list[tuple[str, Path]]:
    from studio.report import contact_sheet, save_png

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image, name in zip(images, names, strict=True):
        written.append(("image", write_image(out / f"{name}.png", image)))
    written.append(("contact sheet", save_png(contact_sheet(rows, cell=192), out / "contact_sheet.png")))
    written.append(("manifest", atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")))
    return written


def run_variations(source: str, n: int, out: Path, settings: GenerationSettings, size: int = 256,
                   step: Step | None = None) -> list[tuple[str, Path]]:
    """Embed a real tile on the model's grid, then ``n`` variations of it."""
    pipe = load_generation_pipeline(settings)
    encoder = embedding_encoder_for(settings)
    check_encoder(pipe, encoder)
    image, name = load_source_image(source)
    tile = fit_to(image, size, size)
    grid = pipe.conditioner.grid_for(size, size)
    tokens = encoder.embed(to_tensor(tile), grid=grid).repeat(n, 1, 1)
    start = time.perf_counter()
    images = generate(pipe, tokens, size, size, grid, settings, settings.seed, step, n * settings.steps)
    seconds = time.perf_counter() - start
    names = [f"variation_{settings.seed + i:04d}" for i in range(n)]
    manifest = {"command": "generate embedding", "source": name, "size": size, "grid": list(grid), "n": n,
                "seeds": [settings.seed + i for i in range(n)], "seconds": round(seconds, 2),
                "settings": asdict(settings), "encoder_identity": encoder.identity}
    rows = [("source tile", [(name, tile)]), ("variations", [(nm, im) for nm, im in zip(names, images, strict=True)])]
    written = write_outputs(out, images, names, rows, manifest)
    written.append(("embeddings", save_embeddings(out / "embeddings.safetensors", tokens[:1], grid,
                                                   encoder.identity, [name])))
    write_image(out / "source.png", tile)
    return written


def run_large(source: str, size: tuple[int, int], grid: tuple[int, int], out: Path, settings: GenerationSettings,
              n: int = 1, window: int | None = None, step: Step | None = None) -> list[tuple[str, Path]]:
    """A large image from the embedding grid of a real region (Graikos et al.): each grid
    cell's tile embedding conditions its part of one shared latent canvas."""
    pipe = load_generation_pipeline(settings)
    encoder = embedding_encoder_for(settings)
    check_encoder(pipe, encoder)
    height, width = size
    image, name = load_source_image(source)
    region = fit_to(image, height, width)
    tokens = encoder.embed(to_tensor(region), grid=grid).repeat(n, 1, 1)

    def call(i: int) -> np.ndarray:
        def tick(_pipe, k, _t, kwargs):
            if step:
                step(i * settings.steps + k + 1, n * settings.steps)
            return kwargs

        with _autocast(settings):
            out = pipe(tokens[i:i + 1], height=height, width=width, grid=grid, num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance, generator=torch.Generator().manual_seed(settings.seed + i),
                       window=window, output_type="np", progress=False, callback_on_step_end=tick)
        return (out.images[0] * 255 + 0.5).astype(np.uint8)

    start = time.perf_counter()
    images = np.stack([call(i) for i in range(n)])
    names = [f"large_{width}x{height}_{settings.seed + i:04d}" for i in range(n)]
    manifest = {"command": "generate embedding --large", "source": name, "size": [width, height],
                "grid": list(grid), "seeds": [settings.seed + i for i in range(n)],
                "seconds": round(time.perf_counter() - start, 2), "settings": asdict(settings),
                "encoder_identity": encoder.identity}
    rows = [("source region (its embedding grid conditions the output)", [(name, region)]),
            ("generated", [(nm, im) for nm, im in zip(names, images, strict=True)])]
    written = write_outputs(out, images, names, rows, manifest)
    written.append(("embeddings", save_embeddings(out / "embeddings.safetensors", tokens[:1], grid,
                                                   encoder.identity, [name])))
    return written


def run_from_embeddings(path: str | Path, n: int, out: Path, settings: GenerationSettings, size: int = 256,
                        step: Step | None = None) -> list[tuple[str, Path]]:
    """``n`` images per row of an embeddings file (e.g. edited or sampled embeddings)."""
    embeddings, grid, meta = load_embeddings(path)
    pipe = load_generation_pipeline(settings)
    grid = grid or (1, 1)
    rows_in = embeddings.repeat_interleave(n, dim=0)
    images = generate(pipe, rows_in, size, size, grid if embeddings.shape[1] > 1 else None, settings,
                      settings.seed, step, len(rows_in) * settings.steps)
    names = [f"emb{i // n:03d}_seed{settings.seed + i:04d}" for i in range(len(rows_in))]
    manifest = {"command": "generate embedding --embeddings", "embeddings": str(path), "file_metadata": meta,
                "n_per_embedding": n, "settings": asdict(settings)}
    rows = [("generated", [(nm, im) for nm, im in zip(names, images, strict=True)][:12])]
    return write_outputs(out, images, names, rows, manifest)


def run_sampled(label: str, n: int, out: Path, settings: GenerationSettings, size: int = 256,
                step: Step | None = None) -> list[tuple[str, Path]]:
    """New tiles with no source image: embeddings drawn from the checkpoint's label-
    conditional sampler (``<checkpoint>/embedding-sampler``), then generated."""
    from pipelines.embedding_sampler import EmbeddingSampler

    sampler_dir = Path(settings.checkpoint) / "embedding-sampler"
    if not sampler_dir.is_dir():
        raise WeightsError(sampler_dir, "missing: this checkpoint ships no embedding sampler (fit one with "
                                        "pipelines.embedding_sampler.fit_on_real_tiles and save it there)")
    sampler = EmbeddingSampler.load(sampler_dir)
    pipe = load_generation_pipeline(settings)
    grid = pipe.conditioner.grid_for(size, size)
    if sampler.shape is None or sampler.shape[0] != grid[0] * grid[1]:
        raise InputError("--size", f"the sampler draws {sampler.shape[0] if sampler.shape else 0}-token grids; "
                                   f"a {size}x{size} tile needs {grid[0] * grid[1]}")
    tokens = sampler.sample(label, n, torch.Generator().manual_seed(settings.seed))
    images = generate(pipe, tokens, size, size, grid, settings, settings.seed, step, n * settings.steps)
    names = [f"{label}_{settings.seed + i:04d}" for i in range(n)]
    manifest = {"command": "generate embedding --label", "label": label, "labels_available": sampler.labels,
                "size": size, "seeds": [settings.seed + i for i in range(n)], "settings": asdict(settings)}
    rows = [(f"sampled '{label}' embeddings -> generated", [(nm, im) for nm, im in zip(names, images, strict=True)])]
    written = write_outputs(out, images, names, rows, manifest)
    written.append(("embeddings", save_embeddings(out / "embeddings.safetensors", tokens, grid,
                                                   f"sampler:{label}", names)))
    return written


def check_encoder(pipe, encoder) -> None:
    if encoder.dim != pipe.conditioner.config.embed_dim:
        raise InputError("--encoder", f"gives {encoder.dim}-dimensional embeddings; the checkpoint was trained "
                                      f"on {pipe.conditioner.config.embed_dim}-dimensional ones")


def embed_to_file(inputs: list[str], out: Path, encoder_spec: str, grid: tuple[int, int] | None, size: int,
                  device: str = "cpu") -> tuple[Path, int]:
    """Embed images (paths or sample names, fitted to ``size``) into one safetensors file."""
    from pipelines.encoders import load_encoder

    encoder = load_encoder(encoder_spec, device=device)
    tiles, names = [], []
    for source in inputs:
        image, name = load_source_image(source)
        tiles.append(fit_to(image, size, size))
        names.append(name)
    tokens = torch.cat([encoder.embed(to_tensor(t), grid=grid) for t in tiles])
    return save_embeddings(out, tokens, grid, encoder.identity, names), tokens.shape[0]
