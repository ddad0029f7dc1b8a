"""EmbeddingToImagePipeline on tiny random components: the diffusers contract (seeds,
output types, schedulers, save/load), large images, and clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from factories import DIM, tiny_pipeline
from PIL import Image

from pipelines.conditioning import EmbeddingConditioner
from pipelines.embedding_to_image import EmbeddingToImagePipeline
from studio.errors import InputError, WeightsError

torch.set_num_threads(1)
@pytest.fixture(scope="module")
def pipe() -> EmbeddingToImagePipeline:
    return tiny_pipeline()


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(seed))


def run(pipe, emb, size=64, seed=0, **kw):
    return pipe(emb, height=size, width=size, num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                progress=False, **kw)


def test_output_types_and_grid(pipe):
    out = run(pipe, tokens(1), output_type="pil")
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (64, 64) and out.grid == (1, 1)
    arr = run(pipe, tokens(4), size=128, output_type="np").images
    assert arr.shape == (1, 128, 128, 3) and 0.0 <= arr.min() and arr.max() <= 1.0
    pt = run(pipe, tokens(4), size=128, output_type="pt").images
    assert pt.shape == (1, 3, 128, 128) and pipe.conditioner.grid_for(128, 128) == (2, 2)


def test_seeds_are_deterministic_and_distinct(pipe):
    a = run(pipe, tokens(1), seed=3, output_type="np").images
    b = run(pipe, tokens(1), seed=3, output_type="np").images
    c = run(pipe, tokens(1), seed=4, output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


def test_condition_changes_the_output(pipe):
    a = run(pipe, tokens(1, seed=1), output_type="np").images
    b = run(pipe, tokens(1, seed=2), output_type="np").images
    assert np.abs(a - b).mean() > 1e-4


def test_save_load_round_trip_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert {"vae", "unet", "conditioner", "scheduler"} <= set(index)
    assert list((tmp_path / "p" / "unet").glob("*.safetensors"))
    again = EmbeddingToImagePipeline.from_pretrained(tmp_path / "p")
    # The same 8-bit images; float outputs agree to float32 rounding (reloaded tensors sit
    # at other addresses, so BLAS may take other vector paths: ~1e-8 noise per matmul).
    for a, b in zip(run(pipe, tokens(4), size=128).images, run(again, tokens(4), size=128).images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(run(pipe, tokens(1), output_type="np").images,
                               run(again, tokens(1), output_type="np").images, atol=1e-4)


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_any_diffusers_scheduler(pipe, scheduler_cls):
    other = EmbeddingToImagePipeline(vae=pipe.vae, unet=pipe.unet, conditioner=pipe.conditioner,
                                     scheduler=scheduler_cls.from_config(pipe.scheduler.config))
    out = run(other, tokens(1), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_large_image_uses_windows_on_one_canvas(pipe):
    emb = tokens(16)  # 4x4 grid for 256x256
    calls = []
    original = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(tuple(sample.shape[-2:]))
        return original(sample, *args, **kwargs)

    pipe.unet.forward = counting
    try:
        whole = run(pipe, emb, size=256, window=64, output_type="np").images  # window covers the canvas
        n_whole = len(calls)
        windowed = run(pipe, emb, size=256, window=32, overlap=0.5, output_type="np").images
    finally:
        pipe.unet.forward = original
    assert whole.shape == windowed.shape == (1, 256, 256, 3)
    assert n_whole == 3 and set(calls[:n_whole]) == {(64, 64)}
    assert set(calls[n_whole:]) == {(32, 32)} and len(calls) - n_whole == 3 * 9  # 3x3 windows per step


def test_bad_inputs_and_folders(pipe, tmp_path):
    with pytest.raises(InputError, match="dimension 8, but this model was trained on 16"):
        run(pipe, torch.randn(1, 1, 8))
    with pytest.raises(InputError, match="do not fit a 2x2 grid"):
        run(pipe, tokens(3), size=128)
    with pytest.raises(InputError, match="multiples of 4"):
        pipe(tokens(1), height=66, width=64, num_inference_steps=1, progress=False)
    with pytest.raises(WeightsError, match="no such pipeline folder"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path / "missing")
    pipe.save_pretrained(tmp_path / "p")
    for f in (tmp_path / "p" / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(WeightsError, match="only pickled weights"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "conditioner")
    with pytest.raises(WeightsError, match="missing: model_index.json lists component 'conditioner'"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path / "p")
    bad = EmbeddingToImagePipeline(vae=pipe.vae, unet=pipe.unet,
                                   conditioner=EmbeddingConditioner(embed_dim=DIM, cross_attention_dim=16,
                                                                    map_channels=3),
                                   scheduler=pipe.scheduler)
    with pytest.raises(InputError, match="input channels"):
        run(bad, tokens(1))


def test_fp16_shipping_loads_as_float32(pipe, tmp_path):
    from pipelines.loading import save_fp16

    save_fp16(pipe, tmp_path / "half")
    sizes = sum(f.stat().st_size for f in (tmp_path / "half").rglob("*.safetensors"))
    pipe.save_pretrained(tmp_path / "full")
    assert sizes < 0.6 * sum(f.stat().st_size for f in (tmp_path / "full").rglob("*.safetensors"))
    loaded = EmbeddingToImagePipeline.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}
    assert next(pipe.unet.parameters()).dtype == torch.float32  # the original is untouched
    a = run(pipe, tokens(1), output_type="np").images
    b = run(loaded, tokens(1), output_type="np").images
    assert np.abs(a - b).max() < 0.02  # fp16 rounding of the weights only
