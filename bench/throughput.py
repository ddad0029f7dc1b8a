"""Throughput of every pipeline at its shipped settings: tiles/s, MPix/s and peak memory.

    python bench/throughput.py [--device auto|cpu|cuda] [--size N] [--batches 1,2,4,8] [--repeats R]
                               [--only macenko,segmenter] [--out docs/throughput.json]

Pipelines (each through its public loader, with the settings the CLI ships):

- ``macenko``, ``reinhard``, ``vahadane``: :func:`studio.stain.get_normalizer`, fitted on the
  shipped ``hgsc_nest`` sample, then ``transform`` of float tiles;
- ``stainfuser``: the ``normalize --method stainfuser`` tile transform (checkpoints/stain-fuser, 6 steps);
- ``vihc-fast``, ``vihc-diffusion``: the ``translate`` tile transform (checkpoints/virtual-ihc-her2);
- ``segmenter``: :class:`pipelines.segmenter.NucleiSegmenter` forward pass (checkpoints/nuclei-segmenter);
- ``embedding-4``, ``embedding-20``: the embedding LDM (checkpoints/embedding-ldm) at 4 and 20 steps,
  guidance 2.0, conditioned on the tiles' own embeddings (encoding is timed too);
- ``mask``: the mask LDM (checkpoints/mask-ldm), 20 steps, guidance 2.0, on phantom layouts;
- ``pixcell-256`` (on CUDA by default, on the CPU only when named in ``--only``): the published
  PixCell-256 architecture at full size (28 DiT blocks, 1152 wide, ~0.6 B parameters, bf16 on
  CUDA) with an SD3.5-shaped VAE, **random weights** (the real ones cannot be fetched here;
  speed and memory do not depend on the values), DPM-Solver 20 steps, guidance 2.0 against
  the learned null token, one UNI-2h-sized token per tile at its native 256 px. ``--pixcell
  tiny`` swaps in a toy width and depth, to test the row on a CPU.

Input tiles are crops of the shipped real H&E samples. Each (pipeline, batch) is run once to
warm up, then ``--repeats`` times; the best time is reported (the least disturbed by other load).
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset per row) and the process's
peak resident set (``ru_maxrss``, monotone over the run, so an upper bound per row) on the CPU.

On the CPU the defaults are small (128 px tiles, batch 1 and 4, one repeat) so the whole bench
runs in a few minutes; with ``--device cuda`` they are 512x512 tiles and a batch sweep 1,2,4,8
(compare StainFuser's published cost: 20 steps, batch 8 at 512x512 fp16, ~18 GB).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from studio.devices import resolve_device  # noqa: E402
from studio.errors import InputError  # noqa: E402
from studio.info import checkpoints_dir  # noqa: E402

PIPELINES = ("macenko", "reinhard", "vahadane", "stainfuser", "vihc-fast", "vihc-diffusion", "segmenter",
             "embedding-4", "embedding-20", "mask", "pixcell-256")
GPU_ONLY = ("pixcell-256",)  # left out of the CPU default: minutes per tile at full size
PIXCELL_NATIVE = 256
GUIDANCE = 2.0  # the CLI's default for both generators

#: A runner maps uint8 tiles ``(B, H, W, 3)`` to anything; it is built once per pipeline.
Runner = Callable[[np.ndarray], object]


def sample_tiles(size: int, count: int) -> np.ndarray:
    """``count`` uint8 ``size x size`` crops of the shipped real H&E samples (tiled when too small)."""
    from studio.data.samples import SAMPLES, load_sample

    crops = []
    for name in SAMPLES:
        image = np.asarray(load_sample(name))
        if image.ndim != 3 or image.shape[-1] != 3:
            continue
        reps = (-(-size // image.shape[0]), -(-size // image.shape[1]), 1)
        image = np.tile(image, reps)
        for y in range(0, image.shape[0] - size + 1, size):
            for x in range(0, image.shape[1] - size + 1, size):
                crops.append(image[y:y + size, x:x + size])
    if not crops:
        raise InputError("studio.data.samples", "no RGB sample image is installed to cut tiles from")
    return np.stack([crops[i % len(crops)] for i in range(count)]).astype(np.uint8)


def _checkpoint(name: str) -> Path:
    from studio.errors import WeightsError

    folder = checkpoints_dir() / name
    if not folder.exists():
        raise WeightsError(folder, f"the shipped checkpoint is missing; run with --only to skip {name}")
    return folder


def random_pixcell(device: str, scale: str = "full") -> object:
    """PixCell-256 with random weights in the published architecture (``scale="full"``) or at
    toy width and depth (``"tiny"``), its SD3.5-shaped VAE, and the published DPM-Solver."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler

    from pipelines.pixcell import PixCellPipeline, PixCellTransformer2DModel
    from studio.published import SD35_VAE_CONFIG

    if scale not in ("full", "tiny"):
        raise InputError("--pixcell", f"{scale!r}; use full or tiny")
    torch.manual_seed(0)
    dit = {} if scale == "full" else {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
                                      "cross_attention_dim": 16, "caption_channels": 48}
    vae = {k: v for k, v in SD35_VAE_CONFIG.items() if not k.startswith("_")}
    if scale == "tiny":
        vae.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
    on_gpu = device.startswith("cuda")
    transformer = PixCellTransformer2DModel(**dit).to(device, torch.bfloat16 if on_gpu else torch.float32)
    return PixCellPipeline(transformer.eval(), AutoencoderKL(**vae).to(device).eval(), DPMSolverMultistepScheduler())


def build(name: str, device: str, pixcell: str = "full", embedding_ldm: Path | None = None) -> Runner:
    """Load one pipeline with its shipped settings and return a function timing can call."""
    from studio.io import to_tensor

    if name in ("macenko", "reinhard", "vahadane"):
        from studio.data.samples import load_sample
        from studio.stain import get_normalizer

        norm = get_normalizer(name, device=device, seed=0)
        norm.fit([np.ascontiguousarray(load_sample("hgsc_nest"))], source="hgsc_nest")
        return lambda tiles: norm.transform(to_tensor(tiles, device))
    if name == "stainfuser":
        from studio.transforms import create_tile_transform

        fuser = create_tile_transform("stainfuser", reference="hgsc_nest", device=device, seed=0,
                                      checkpoint=str(_checkpoint("stain-fuser")))
        return lambda tiles: fuser.apply(tiles, None)
    if name.startswith("vihc-"):
        from pipelines.translate_job import create_translate_transform

        ihc = create_translate_transform("her2", str(_checkpoint("virtual-ihc-her2")), model=name[5:], device=device)
        return lambda tiles: ihc.apply(tiles, None)
    if name == "segmenter":
        from pipelines.segmenter import NucleiSegmenter

        seg = NucleiSegmenter.from_pretrained(_checkpoint("nuclei-segmenter"), device=device)
        return lambda tiles: seg.predict(to_tensor(tiles))
    if name.startswith("embedding-"):
        from pipelines.generation import GenerationSettings, embedding_encoder_for, load_generation_pipeline

        steps = int(name.split("-")[1])
        folder = embedding_ldm or _checkpoint("embedding-ldm")
        settings = GenerationSettings(checkpoint=str(folder), encoder="auto", steps=steps,
                                      guidance=GUIDANCE, seed=0, scheduler="ddim", device=device)
        pipe, encoder = load_generation_pipeline(settings), embedding_encoder_for(settings)

        def generate(tiles: np.ndarray) -> object:
            h, w = tiles.shape[1:3]
            tokens = encoder.embed(to_tensor(tiles, device), grid=pipe.conditioner.grid_for(h, w))
            return pipe(tokens, height=h, width=w, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(0), output_type="pt", progress=False).images

        return generate
    if name == "mask":
        from pipelines.mask_to_image import MaskToImagePipeline
        from studio.layouts import LayoutSource

        pipe = MaskToImagePipeline.from_pretrained(_checkpoint("mask-ldm")).to(device)
        layouts: dict[tuple[int, int], list] = {}

        def paint(tiles: np.ndarray) -> object:
            key = (len(tiles), tiles.shape[1])
            if key not in layouts:  # drawn once per shape, outside the timed repeats' steady state
                source = LayoutSource("phantom", tiles.shape[1], pipe.classes, tissue="mixed")
                rng = np.random.default_rng(0)
                layouts[key] = [source.draw(rng).relabelled() for _ in range(len(tiles))]
            return pipe([(lay.inst, lay.cls) for lay in layouts[key]], num_inference_steps=20,
                        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="pt",
                        progress=False).images

        return paint
    if name == "pixcell-256":
        pipe = random_pixcell(device, pixcell)
        width = int(pipe.transformer.config.caption_channels)

        def pixcell_tiles(tiles: np.ndarray) -> object:
            # One token per tile at the native size: larger --size values are not PixCell-256's
            # operating point, so the row always times native 256 px tiles.
            tokens = torch.randn(len(tiles), 1, width, generator=torch.Generator().manual_seed(0))
            return pipe(tokens.to(device), height=PIXCELL_NATIVE, width=PIXCELL_NATIVE, num_inference_steps=20,
                        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="pt",
                        progress=False).images

        pixcell_tiles.native_size = PIXCELL_NATIVE
        return pixcell_tiles
    raise InputError("--only", f"{name!r} is not a pipeline here; choose from {', '.join(PIPELINES)}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    """Peak allocated CUDA memory since the last reset, or the process's peak RSS, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if platform.system() == "Darwin" else rss / 2**10


def measure(run: Runner, tiles: np.ndarray, device: str, repeats: int) -> dict:
    """Warm up once, then the best of ``repeats`` timed calls on one batch."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        run(tiles)
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(tiles)
            _sync(device)
            best = min(best, time.perf_counter() - start)
    b, h, w = tiles.shape[:3]
    if getattr(run, "native_size", None):
        h = w = run.native_size
    return {"batch": int(b), "size": int(h), "seconds": round(best, 4), "tiles_per_s": round(b / best, 3),
            "mpix_per_s": round(b * h * w / best / 1e6, 4), "peak_mb": round(peak_memory_mb(device), 1)}


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"Throughput on {device_name}", "",
             "| pipeline | tile | batch | tiles/s | MPix/s | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['size']}x{r['size']} | {r['batch']} | {r['tiles_per_s']:.3f} | "
                     f"{r['mpix_per_s']:.4f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise InputError(option, f"{text!r}; give positive integers separated by commas, e.g. 1,2,4,8")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--size", type=int, default=None, help="tile side in pixels (CPU 128, CUDA 512)")
    parser.add_argument("--batches", default=None, help="batch sweep, comma-separated (CPU 1,4; CUDA 1,2,4,8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (CPU 1, CUDA 3)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(PIPELINES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("docs/throughput.json"), help="JSON results file")
    parser.add_argument("--embedding-ldm", type=Path, default=None,
                        help="embedding-4/-20 rows: another embedding LDM folder (default: the shipped one)")
    parser.add_argument("--pixcell", default="full", help="pixcell-256 row: full (published size) or tiny (tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    on_gpu = device.startswith("cuda")
    size = args.size or (512 if on_gpu else 128)
    batches = _ints(args.batches, "--batches") if args.batches else ([1, 2, 4, 8] if on_gpu else [1, 4])
    repeats = args.repeats or (3 if on_gpu else 1)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else \
        [n for n in PIPELINES if on_gpu or n not in GPU_ONLY]
    unknown = [n for n in names if n not in PIPELINES]
    if unknown:
        raise InputError("--only", f"{', '.join(unknown)}: not a pipeline here; choose from {', '.join(PIPELINES)}")
    if size < 32 or size % 32:
        raise InputError("--size", f"{size}; use a multiple of 32 pixels (the models' latent and window grids)")
    if repeats < 1:
        raise InputError("--repeats", f"{repeats}; use at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_gpu:
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    tiles = sample_tiles(size, max(batches))
    rows = []
    for name in names:
        run = build(name, device, args.pixcell, args.embedding_ldm)
        for batch in batches:
            row = {"pipeline": name, **measure(run, tiles[:batch], device, repeats)}
            rows.append(row)
            print(f"{name} batch {batch}: {row['tiles_per_s']} tiles/s, {row['mpix_per_s']} MPix/s", flush=True)
        del run
        if on_gpu:
            torch.cuda.empty_cache()
    result = {"device": device, "device_name": device_name, "torch": torch.__version__, "size": size,
              "embedding_ldm": str(args.embedding_ldm or checkpoints_dir() / "embedding-ldm"),
              "batches": batches, "repeats": repeats, "rows": rows}
    print(markdown(rows, device_name))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
