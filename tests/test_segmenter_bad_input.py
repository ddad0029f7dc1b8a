"""The segmenter's training path against a user's own labelled folder: what it accepts
(non-contiguous instance ids) and what it refuses before the first step, in one line
naming the file (classes outside the table, labels of another size, another model as
``init_from``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from studio.data.base import NucleiSample
from studio.data.folder import write_folder
from studio.data.samples import load_hgsc_nest_labels
from studio.errors import InputError
from training.segmenter import SegmenterConfig, train

torch.set_num_threads(1)


def real_tiles(n: int = 2, size: int = 96) -> list[NucleiSample]:
    image, inst, cls = load_hgsc_nest_labels()
    out = []
    for k in range(n):
        y, x = 40 + 120 * k, 60
        out.append(NucleiSample(np.ascontiguousarray(image[y:y + size, x:x + size]),
                                inst[y:y + size, x:x + size].astype(np.int32),
                                cls[y:y + size, x:x + size].astype(np.uint8), {"source": "real"}))
    assert all(s.inst.max() > 0 for s in out)
    return out


def config(tmp_path: Path, folder: Path, **changes) -> SegmenterConfig:
    base = dict(output_dir=str(tmp_path / "run"), sources=({"path": str(folder), "weight": 1.0},),
                stride=256, val_tiles=1, crop_size=64, batch_size=2, max_steps=1, warmup_steps=1,
                checkpoint_every=1, validate_every=1, log_every=1, widths=(8, 16, 16), decoder_scale=1.0)
    return SegmenterConfig(**{**base, **changes})


def hand_made(folder: Path, tiles: list[NucleiSample]) -> Path:
    """A folder as a user builds it: images/ and labels/ written directly (not validated)."""
    from studio.io import write_image

    for i, s in enumerate(tiles):
        write_image(folder / "images" / f"t{i}.png", s.image)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        np.save(folder / "labels" / f"t{i}.npy", np.stack([s.inst, s.cls.astype(np.int32)], -1).astype(np.int32))
    return folder


def test_non_contiguous_instance_ids_train(tmp_path):
    tiles = real_tiles()
    for s in tiles:  # ids 7, 107, 207, ...: gaps everywhere, as exported annotation tools write them
        s.inst[:] = np.where(s.inst > 0, s.inst * 100 + 7, 0)
    folder = write_folder(tmp_path / "gappy", tiles, source="real")
    final = train(config(tmp_path, folder))
    assert (final / "config.json").is_file()


def test_a_class_outside_the_table_is_refused_before_the_first_step(tmp_path):
    tiles = real_tiles(3)
    tiles[1].cls[tiles[1].cls > 0] = 9  # PanNuke has classes 1..5
    folder = hand_made(tmp_path / "bad", tiles)
    with pytest.raises(InputError) as info:
        train(config(tmp_path, folder))
    message = str(info.value)
    assert "t1.npy" in message and "class 9" in message and "1 of 3 tiles" in message and "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_labels_of_another_size_than_their_image_are_refused(tmp_path):
    tiles = real_tiles(2)
    folder = hand_made(tmp_path / "bad", tiles)
    lab = np.load(folder / "labels" / "t0.npy")
    np.save(folder / "labels" / "t0.npy", lab[:80])
    with pytest.raises(InputError, match=r"t0\.npy.*labels are 80x96 but image t0\.png is 96x96"):
        train(config(tmp_path, folder))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_a_folder_of_another_model_is_one_line(tmp_path):
    from pipelines.virtual_ihc import IHCGenerator, VirtualIHCPipeline

    folder = write_folder(tmp_path / "ok", real_tiles(), source="real")
    other = tmp_path / "virtual-ihc"
    VirtualIHCPipeline(generator=IHCGenerator(widths=(8, 16))).save_pretrained(other)
    for wrong, kind in ((other, "VirtualIHCPipeline"), (other / "generator", "IHCGenerator")):
        with pytest.raises(InputError) as info:
            train(config(tmp_path, folder, init_from=str(wrong)))
        message = str(info.value)
        assert message.startswith("init_from") and f"holds a {kind}, not a nuclei segmenter" in message
        assert "\n" not in message and not (tmp_path / "run" / "checkpoints").exists()
