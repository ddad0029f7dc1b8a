"""The CUDA path of every pipeline against the CPU's float32 (run with ``pytest -m gpu`` on a GPU).

On CUDA the pipelines run their model calls under :func:`studio.devices.autocast_context`
(bf16, or fp16 on cards without bf16) with torch SDPA or xformers attention. Outputs must keep
the CPU's layout exactly (shapes, dtypes, files) and stay close in value: label maps equal on
more than 99 % of pixels, images within a few grey levels. Skipped where torch sees no GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.data.samples import load_sample
from studio.info import checkpoints_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _tile(size: int = 256, name: str = "hgsc_nest") -> np.ndarray:
    return np.ascontiguousarray(load_sample(name)[:size, :size])


def _grey_levels(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and 99th-percentile absolute difference of two uint8 images, in grey levels."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), float(np.percentile(diff, 99))


def test_the_policy_on_this_gpu():
    from studio.devices import autocast_context, inference_dtype, resolve_device

    device = resolve_device("auto")
    assert device == "cuda"
    want = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    assert inference_dtype(device) == want
    layer = torch.nn.Linear(8, 8).to(device)
    with autocast_context(device):
        assert layer(torch.randn(2, 8, device=device)).dtype == want


def test_segmenter_maps_on_cuda_match_the_cpu():
    from pipelines.segmenter import NucleiSegmenter

    folder = checkpoints_dir() / "nuclei-segmenter"
    image = _tile()
    on_cpu = NucleiSegmenter.from_pretrained(folder, device="cpu").segment(image)
    on_gpu = NucleiSegmenter.from_pretrained(folder, device="cuda").segment(image)
    for ref, got in zip(on_cpu[:2], on_gpu[:2], strict=True):  # instance map, class map
        assert got.shape == ref.shape and got.dtype == ref.dtype
    inst_cpu, cls_cpu = on_cpu[0], on_cpu[1]
    inst_gpu, cls_gpu = on_gpu[0], on_gpu[1]
    assert ((inst_cpu > 0) == (inst_gpu > 0)).mean() > 0.99  # nucleus pixels
    assert (cls_cpu == cls_gpu).mean() > 0.99  # class map
    n_cpu, n_gpu = len(np.unique(inst_cpu)) - 1, len(np.unique(inst_gpu)) - 1
    assert abs(n_cpu - n_gpu) <= max(2, 0.05 * n_cpu)


def test_stainfuser_tile_on_cuda_is_within_a_few_grey_levels():
    from pipelines.stain_fuser import create_tile_transform

    tiles = _tile()[None]
    on_cpu = create_tile_transform(reference="skin", device="cpu").apply(tiles)
    gpu = create_tile_transform(reference="skin", device="auto")
    assert gpu.pipe.device.type == "cuda"
    on_gpu = gpu.apply(tiles)
    assert on_gpu.shape == on_cpu.shape and on_gpu.dtype == on_cpu.dtype == np.uint8
    mean, p99 = _grey_levels(on_cpu, on_gpu)
    assert mean < 2.0 and p99 <= 8, (mean, p99)


@pytest.mark.parametrize("model", ["fast", "diffusion"])
def test_virtual_ihc_on_cuda_is_close_to_the_cpu(model):
    from pipelines.virtual_ihc import load_virtual_ihc

    pipe_cpu = load_virtual_ihc("her2", checkpoints_dir(), device="cpu")
    if model not in pipe_cpu.models:
        pytest.skip(f"the shipped her2 checkpoint has no {model} translator")
    pipe_gpu = load_virtual_ihc("her2", checkpoints_dir(), device="cuda")
    he = _tile(128)[None]

    def run(pipe):
        images = pipe(he, model=model, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        return (images * 255 + 0.5).astype(np.uint8)

    ref, got = run(pipe_cpu), run(pipe_gpu)
    assert got.shape == ref.shape == (1, 128, 128, 3)
    mean, p99 = _grey_levels(ref, got)
    limit = (2.0, 8) if model == "fast" else (4.0, 16)  # sampling compounds rounding over the steps
    assert mean < limit[0] and p99 <= limit[1], (mean, p99)


def test_rare_generation_on_cuda_keeps_the_dataset_layout(tmp_path):
    import json

    from pipelines.rare_generation import RareRequest, generate_rare
    from studio.data.registry import open_dataset

    common = {"labels": "hgsc_nest", "classes": "dead", "count": 2, "per_patch": 1, "size": 64, "steps": 4,
              "min_agreement": 0.0, "checkpoint": str(checkpoints_dir() / "mask-ldm")}
    generate_rare(RareRequest(out=str(tmp_path / "cpu"), device="cpu", **common), log=lambda _: None)
    generate_rare(RareRequest(out=str(tmp_path / "gpu"), device="auto", **common), log=lambda _: None)
    assert json.loads((tmp_path / "gpu" / "provenance.json").read_text())["device"] == "cuda"
    assert sorted(p.name for p in (tmp_path / "cpu").iterdir()) == sorted(p.name for p in (tmp_path / "gpu").iterdir())
    cpu, gpu = open_dataset(tmp_path / "cpu"), open_dataset(tmp_path / "gpu")
    assert len(cpu) == len(gpu) == 2
    for i in range(2):
        a, b = cpu.read(i), gpu.read(i)
        assert np.array_equal(a.inst, b.inst) and np.array_equal(a.cls, b.cls)  # labels are the conditioning maps
        assert a.image.shape == b.image.shape and a.image.dtype == b.image.dtype
        mean, _ = _grey_levels(a.image, b.image)
        assert mean < 10.0, mean  # same seed and layout: the same picture, up to reduced-precision drift


def test_embedding_generation_on_cuda_picks_fast_attention_and_keeps_the_layout():
    from pipelines.generation import GenerationSettings, generate, load_generation_pipeline

    folder = str(checkpoints_dir() / "embedding-ldm")
    tokens = None
    images = {}
    for device in ("cpu", "cuda"):
        settings = GenerationSettings(checkpoint=folder, encoder="auto", steps=4, device=device)
        pipe = load_generation_pipeline(settings)
        if tokens is None:
            tokens = pipe.conditioner.null_embedding.detach().float().cpu().reshape(1, 1, -1)
        images[device] = generate(pipe, tokens, 64, 64, None, settings, seed=0)
    assert images["cuda"].shape == images["cpu"].shape == (1, 64, 64, 3)
    assert images["cuda"].dtype == np.uint8
    mean, _ = _grey_levels(images["cpu"], images["cuda"])
    assert mean < 10.0, mean
