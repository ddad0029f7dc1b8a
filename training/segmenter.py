"""Train the nucleus segmenter (:class:`pipelines.segmenter.HoVerNetLite`).

    python -m training.segmenter --config training/recipes/segmenter.yaml            # start
    python -m training.segmenter --config training/recipes/segmenter.yaml --resume latest

In the style of the other training scripts (``training/vae.py``): a YAML recipe into a
dataclass config, an ``Accelerator`` (devices, mixed precision, checkpoint state), an EMA
of the weights (optional), validation during training, ``save_pretrained`` at the end.

**Data.** Any mix of nuclei datasets, each one entry of ``sources`` with a ``weight``:

* ``{name: hgsc_nest}``: 256x256 crops of the shipped real tile whose pixels lie in its
  *train* region (:mod:`studio.data.splits`: the left three quarters), stride ``stride``;
* ``{name: phantom, n: 96, seed: 1000}``: procedural tiles with exact labels
  (:func:`studio.data.phantom_dataset.phantom_samples`);
* ``{path: /data/pannuke, layout: pannuke, source: real}``: any folder
  :func:`studio.data.registry.open_dataset` reads (PanNuke, CoNIC, the studio's folder
  layout); ``layout`` and ``source`` are optional.

The parts are concatenated (:class:`~studio.data.base.ConcatNucleiDataset`, which refuses
class tables that differ) and drawn with :meth:`~studio.data.base.ConcatNucleiDataset.sampling_weights`,
so part k fills ``weight_k / sum(weights)`` of the batches whatever its size: that is the
real : synthetic ratio. Every sample keeps its ``meta["source"]``; the loop never looks at
it except to log how many tiles of each source each batch had.

Batches are a pure function of ``(seed, step)`` (random crop of ``crop_size``, rot90,
flip, then :class:`~studio.stain.augment.StainAugment`), so a resumed run sees exactly the
batches of an uninterrupted one. Targets follow HoVer-Net: NP = nucleus pixels, HV =
:func:`studio.nuclei.hv_targets` of the *augmented* instance map, TP = class map.

**Loss** (HoVer-Net's, with its weights, all 1): NP cross-entropy + soft Dice, HV MSE +
MSGE (the MSE of 5x5 Sobel-like gradients of the HV maps, over nuclear pixels only), TP
cross-entropy + soft Dice. Dice terms are summed over classes as in the reference.

**Validation**: PQ (CoNIC binary PQ, averaged over tiles) and mPQ+ (per-class statistics
summed over tiles) of the EMA weights on held-out tiles -- by default the six 256x256
crops of hgsc_nest's held-out band (x >= 1125, never seen in training) -- plus a contact
sheet of outlines (truth / prediction).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.errors import InputError
from studio.scanner import random_scanner_degrade
from training.utils import MetricsLog, ema_weights, load_config, resume_path, save_checkpoint, warmup_cosine_scheduler

HGSC_TRAIN_REGION = (0, 1500, 0, 1125 - 256 + 1)  # crop origins whose 256 px crops stay in the train split
HGSC_HELDOUT_REGION = (0, 1500, 1125, 1500)


@dataclass
class SegmenterConfig:
    output_dir: str = "runs/segmenter"
    seed: int = 0
    # data
    sources: tuple[dict[str, Any], ...] = ({"name": "hgsc_nest", "weight": 0.7},
                                           {"name": "phantom", "n": 96, "seed": 1000, "weight": 0.3})
    stride: int = 128
    val: str = "hgsc_nest"  # "hgsc_nest" (held-out band) or a dataset folder
    val_tiles: int = 6
    crop_size: int = 128
    batch_size: int = 8
    stain_jitter: bool = True
    class_balance: float = 0.0  # share of crops centred on a class-balanced nucleus (BatchSampler)
    scale_jitter: tuple[float, float] | None = None  # resample crops to a random mpp in this range, e.g. [0.4, 0.6]
    degrade: float = 0.0  # share of crops given scanner blur, sensor noise and JPEG (BatchSampler)
    # optimisation
    init_from: str | None = None  # fine-tune: a segmenter folder whose weights start the run
    max_steps: int = 1200
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    use_ema: bool = True
    ema_decay: float = 0.995
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validate_every: int = 200
    log_every: int = 10
    threads: int = 1
    mixed_precision: str = "no"
    # loss weights (HoVer-Net's)
    np_ce: float = 1.0
    np_dice: float = 1.0
    hv_mse: float = 1.0
    hv_msge: float = 1.0
    tp_ce: float = 1.0
    tp_dice: float = 1.0
    # model
    widths: tuple[int, ...] = (24, 48, 96, 192)
    depth: int = 1
    decoder_scale: float = 0.5
    mpp: float = 0.5


# --------------------------------------------------------------------------- data
def _hgsc(region: tuple[int, int, int, int], stride: int, cover_edges: bool = False):
    from studio.data.crops import hgsc_nest_dataset

    return hgsc_nest_dataset(256, stride, region=region, cover_edges=cover_edges)


def open_source(spec: Mapping[str, Any], cfg: SegmenterConfig):
    """One ``sources`` entry -> a :class:`~studio.data.base.NucleiDataset`."""
    spec = dict(spec)
    spec.pop("weight", None)
    if "path" in spec:
        from studio.data.registry import open_dataset

        path = spec.pop("path")
        layout = spec.pop("layout", None)
        kwargs = {"source": spec.pop("source")} if "source" in spec else {}
        if spec:
            raise InputError("sources", f"unknown keys {sorted(spec)} for dataset {path}")
        return check_every_sample(open_dataset(path, layout, **kwargs), path)
    name = spec.pop("name", None)
    if name == "hgsc_nest":
        if spec:
            raise InputError("sources", f"unknown keys {sorted(spec)} for hgsc_nest")
        return _hgsc(HGSC_TRAIN_REGION, cfg.stride)
    if name == "phantom":
        from studio.data.base import ArrayNucleiDataset
        from studio.data.phantom_dataset import phantom_samples
        from studio.data.samples import PANNUKE_CLASSES

        n = int(spec.pop("n", 64))
        seed = int(spec.pop("seed", 1000))
        size = int(spec.pop("size", 256))
        tissue = spec.pop("tissue", None)
        class_mix = spec.pop("class_mix", None)
        if spec:
            raise InputError("sources", f"unknown keys {sorted(spec)} for phantom")
        samples = phantom_samples(n, seed=seed, size=size, tissue=tissue, class_mix=class_mix)
        return ArrayNucleiDataset(samples, PANNUKE_CLASSES, name="phantom")
    raise InputError("sources", f"entry {dict(spec, name=name)} needs 'path' or name 'hgsc_nest' / 'phantom'")


#: Datasets up to this many tiles are read in full before the first step (a few seconds).
PREFLIGHT_LIMIT = 4096


def check_every_sample(data, path: str | Path, limit: int = PREFLIGHT_LIMIT):
    """Read every tile of a user's dataset once before training, so that a bad label file
    (a class outside the table, labels of another size than their image, a truncated image)
    is one error naming it now, not a crash at whatever step first draws it. Larger datasets
    (PanNuke folds) are left to the same checks at read time."""
    if len(data) > limit:
        return data
    bad: list[str] = []
    for i in range(len(data)):
        try:
            data.read(i)
        except InputError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(path, f"{len(bad)} of {len(data)} tiles cannot be trained on; first: {bad[0]}{more}. "
                               f"Fix or remove them")
    return data


def build_training_data(cfg: SegmenterConfig):
    """``(ConcatNucleiDataset, per-sample probabilities)`` from ``cfg.sources``."""
    from studio.data.base import ConcatNucleiDataset

    if not cfg.sources:
        raise InputError("sources", "is empty; give at least one training dataset")
    parts = [open_source(s, cfg) for s in cfg.sources]
    weights = [float(s.get("weight", 1.0)) for s in cfg.sources]
    data = ConcatNucleiDataset(parts)
    p = data.sampling_weights(weights).numpy()
    return data, p / p.sum()


def build_validation_data(cfg: SegmenterConfig):
    if cfg.val == "hgsc_nest":
        return _hgsc(HGSC_HELDOUT_REGION, 256, cover_edges=True)
    from studio.data.registry import open_dataset

    return check_every_sample(open_dataset(cfg.val), cfg.val)


def resample_plane(plane: np.ndarray, size: int, *, labels: bool) -> np.ndarray:
    """A square crop resampled to ``size`` px: area/bicubic for the image, nearest for labels.

    Why: a 0.6 um/px scan shows a nucleus in fewer pixels than a 0.4 um/px one; resampling
    real crops over that range teaches the segmenter the scales users' scanners give.
    """
    from PIL import Image

    if labels:
        img = Image.fromarray(np.ascontiguousarray(plane).astype(np.int32 if plane.dtype != np.bool_ else np.uint8))
        out = np.asarray(img.resize((size, size), Image.Resampling.NEAREST))
        return out.astype(plane.dtype)
    shrink = plane.shape[0] > size
    img = Image.fromarray(np.ascontiguousarray(plane))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC))




class BatchSampler:
    """Augmented training batches, a pure function of ``(seed, step)``.

    Args:
        class_balance: share of crops centred on one nucleus of a class drawn uniformly
            from the classes present in the chosen sample (the rest are placed uniformly).
            Uniform crops show each class at its tissue frequency, so a model that learns
            from them sees a scarce class (connective nuclei in a tumour nest) in a few
            percent of its crops; centring on a class-balanced nucleus gives every class
            present an equal share while keeping the nucleus in its real surroundings.
            0 keeps the random stream of earlier runs unchanged (shipped checkpoints stay
            reproducible).
    """

    def __init__(self, data, probabilities: np.ndarray, crop_size: int, *, stain: Any = None, seed: int = 0,
                 class_balance: float = 0.0, scale_jitter: Sequence[float] | None = None, degrade: float = 0.0,
                 mpp: float = 0.5):
        if not 0.0 <= class_balance <= 1.0:
            raise InputError("class_balance", f"{class_balance}; must be in [0, 1]")
        if not 0.0 <= degrade <= 1.0:
            raise InputError("degrade", f"{degrade}; must be in [0, 1]")
        if scale_jitter is not None:
            lo, hi = (float(v) for v in scale_jitter)
            if not 0.05 <= lo <= hi <= 20:
                raise InputError("scale_jitter", f"{list(scale_jitter)}; give [low, high] microns per pixel")
            if round(crop_size * hi / mpp) < 8:
                raise InputError("scale_jitter", f"{list(scale_jitter)} is too coarse for {crop_size} px crops")
            scale_jitter = (lo, hi)
        self.scale_jitter = scale_jitter
        self.degrade = degrade
        self.mpp = mpp
        self.data = data
        self.p = probabilities
        self.crop = crop_size
        self.stain = stain
        self.seed = seed
        self.class_balance = class_balance

    def _origin(self, s, rng: np.random.Generator, crop: int | None = None) -> tuple[int, int]:
        """Top-left corner of one crop of sample ``s``: uniform, or centred on a class-balanced nucleus."""
        h, w = s.inst.shape
        size = self.crop if crop is None else crop
        if self.class_balance > 0 and rng.random() < self.class_balance:
            cls, inst = np.asarray(s.cls), np.asarray(s.inst)
            present = np.unique(cls[(cls > 0) & (inst > 0)])
            if present.size:
                code = present[int(rng.integers(present.size))]
                ys, xs = np.nonzero((cls == code) & (inst > 0))
                ids = inst[ys, xs]
                nid = rng.choice(np.unique(ids))
                cy, cx = ys[ids == nid].mean(), xs[ids == nid].mean()
                jitter = rng.integers(-size // 4, size // 4 + 1, size=2)
                y = int(np.clip(round(cy) - size // 2 + jitter[0], 0, h - size))
                x = int(np.clip(round(cx) - size // 2 + jitter[1], 0, w - size))
                return y, x
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world: int = 1) -> dict[str, Any]:
        """Batch ``step``: ``batch_size`` crops per process, ``rank``'s share of a global batch.

        The global batch (``batch_size * world`` crops) is drawn from ``(seed, step)`` alone,
        and process ``rank`` keeps crops ``rank, rank + world, ...``: the processes of a
        distributed run see disjoint parts of the batch a single process of batch
        ``batch_size * world`` would see (with ``world == 1`` the stream of earlier runs).
        """
        from studio.nuclei import hv_targets

        if not 0 <= rank < world:
            raise InputError("rank", f"{rank} of {world} processes")
        rng = np.random.default_rng([self.seed, step])
        images, insts, classes, ignores, sources = [], [], [], [], []
        total = batch_size * world
        for idx in rng.choice(len(self.data), size=total, p=self.p):
            s = self.data.read(int(idx))
            h, w = s.inst.shape
            source_mpp = float(s.meta.get("mpp") or self.mpp)
            src = self.crop
            if self.scale_jitter is not None:
                src = round(self.crop * float(rng.uniform(*self.scale_jitter)) / source_mpp)
            if min(h, w) < max(self.crop, src):
                raise InputError(str(s.meta.get("name", idx)),
                                 f"is {h}x{w}, smaller than the {max(self.crop, src)} px crop it needs")
            y, x = self._origin(s, rng, src)
            k = int(rng.integers(4))
            flip = bool(rng.random() < 0.5)
            arrays = []
            planes = (s.image, s.inst, s.cls, s.ignore if s.ignore is not None else np.zeros((h, w), bool))
            for j, a in enumerate(planes):
                a = np.asarray(a)[y:y + src, x:x + src]
                if src != self.crop:
                    a = resample_plane(a, self.crop, labels=j > 0)
                a = np.rot90(a, k)
                arrays.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
            if self.degrade > 0 and rng.random() < self.degrade:
                arrays[0] = random_scanner_degrade(arrays[0], rng)
            images.append(arrays[0])
            insts.append(arrays[1])
            classes.append(arrays[2])
            ignores.append(arrays[3])
            sources.append(str(s.meta.get("source", "")))
        from studio.io import to_tensor

        tiles = to_tensor(np.stack(images))
        if self.stain is not None:
            tiles = self.stain(tiles, torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        mine = slice(rank, total, world)
        tiles, inst = tiles[mine], np.stack(insts[mine])
        ignore = np.stack(ignores[mine])
        out = {
            "image": tiles,
            "np": torch.from_numpy((inst > 0).astype(np.int64)),
            "hv": torch.from_numpy(np.stack([hv_targets(i) for i in inst])),
            "tp": torch.from_numpy(np.stack(classes[mine]).astype(np.int64)),
            "inst": inst,
            "sources": sources[mine],
        }
        if ignore.any():
            out["valid"] = torch.from_numpy(~ignore)
        return out


# --------------------------------------------------------------------------- loss
def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-3,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """HoVer-Net's soft Dice: ``sum_c 1 - (2 |P_c T_c| + s) / (|P_c| + |T_c| + s)``, over ``valid`` pixels."""
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob)
    if valid is not None:
        keep = valid.unsqueeze(1).to(prob)
        prob, onehot = prob * keep, onehot * keep
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    total = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).sum()


def _gradient_kernels(size: int = 5, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    denom = xx * xx + yy * yy + 1e-15
    return (xx / denom).view(1, 1, size, size), (yy / denom).view(1, 1, size, size)


def msge_loss(pred: torch.Tensor, target: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """HoVer-Net's mean squared gradient error: horizontal map differentiated along x,
    vertical along y (5x5 kernels), squared error averaged over nuclear pixels."""
    kx, ky = _gradient_kernels(5, pred.device)

    def grads(hv: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.conv2d(hv[:, :1], kx, padding=2), F.conv2d(hv[:, 1:], ky, padding=2)], dim=1)

    f = focus.unsqueeze(1).to(pred)
    err = (grads(pred) - grads(target)) ** 2 * f
    return err.sum() / (2 * f.sum() + 1e-8)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    keep = valid.to(values)
    while keep.ndim < values.ndim:
        keep = keep.unsqueeze(1)
    keep = keep.expand_as(values)
    return (values * keep).sum() / keep.sum().clamp_min(1.0)


def hovernet_loss(out, batch: Mapping[str, Any], cfg: SegmenterConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """HoVer-Net's loss; pixels outside ``batch["valid"]`` (unknown labels) count in no term.

    A pseudo-labelled tile marks the nuclei its teacher was unsure of as unknown: taught
    as background they would teach the student to miss exactly the hard nuclei.
    """
    valid = batch.get("valid")
    if valid is None:
        parts = {
            "np_ce": F.cross_entropy(out.np_logits, batch["np"]),
            "np_dice": dice_loss(out.np_logits, batch["np"]),
            "hv_mse": F.mse_loss(out.hv, batch["hv"]),
            "hv_msge": msge_loss(out.hv, batch["hv"], batch["np"]),
        }
        if out.tp_logits is not None:
            parts["tp_ce"] = F.cross_entropy(out.tp_logits, batch["tp"])
            parts["tp_dice"] = dice_loss(out.tp_logits, batch["tp"])
    else:
        parts = {
            "np_ce": _masked_mean(F.cross_entropy(out.np_logits, batch["np"], reduction="none"), valid),
            "np_dice": dice_loss(out.np_logits, batch["np"], valid=valid),
            "hv_mse": _masked_mean((out.hv - batch["hv"]) ** 2, valid),
            "hv_msge": msge_loss(out.hv, batch["hv"], batch["np"] * valid),
        }
        if out.tp_logits is not None:
            parts["tp_ce"] = _masked_mean(F.cross_entropy(out.tp_logits, batch["tp"], reduction="none"), valid)
            parts["tp_dice"] = dice_loss(out.tp_logits, batch["tp"], valid=valid)
    loss = sum(getattr(cfg, k) * v for k, v in parts.items())
    return loss, {k: round(float(v.item()), 5) for k, v in parts.items()}


# --------------------------------------------------------------------------- validation
def validate(model, val_data, n_tiles: int, out_png: Path | None = None) -> dict[str, Any]:
    """PQ / mPQ+ / NP Dice of ``model`` on the first ``n_tiles`` validation tiles."""
    from pipelines.segmenter import NucleiSegmenter
    from studio.metrics import binary_pq_dataset, dice, multi_pq_plus

    seg = NucleiSegmenter(model)
    true_i, true_c, pred_i, pred_c, images = [], [], [], [], []
    for i in range(min(n_tiles, len(val_data))):
        s = val_data.read(i)
        inst, cls, _ = seg.segment(np.ascontiguousarray(s.image))
        true_i.append(np.asarray(s.inst))
        true_c.append(np.asarray(s.cls))
        pred_i.append(inst)
        pred_c.append(cls)
        images.append(np.asarray(s.image))
    pq = binary_pq_dataset(true_i, pred_i)
    metrics: dict[str, Any] = {"val_pq": round(pq["pq"], 4), "val_dq": round(pq["dq"], 4),
                               "val_sq": round(pq["sq"], 4),
                               "val_np_dice": round(float(np.mean([dice(t, p) for t, p in zip(true_i, pred_i,
                                                                                               strict=True)])), 4),
                               "val_nuclei_true": int(sum(int(t.max()) for t in true_i)),
                               "val_nuclei_pred": int(sum(int(p.max()) for p in pred_i))}
    k = int(model.config.num_classes)
    if k:
        m = multi_pq_plus(true_i, true_c, pred_i, pred_c, k)
        metrics["val_mpq_plus"] = round(m["mpq_plus"], 4)
        metrics["val_pq_per_class"] = [round(float(v), 4) for v in m["pq"]]
    if out_png is not None:
        from studio.report import contact_sheet, overlay_labels, save_png

        shown = range(min(4, len(images)))
        save_png(contact_sheet([("held-out truth", [(f"tile {i}", overlay_labels(images[i], true_i[i], true_c[i]))
                                                    for i in shown]),
                                (f"prediction (PQ {metrics['val_pq']:.3f})",
                                 [(f"tile {i}", overlay_labels(images[i], pred_i[i], pred_c[i])) for i in shown])],
                               cell=192), out_png)
    return metrics


# --------------------------------------------------------------------------- loop
def build_model(cfg: SegmenterConfig, num_classes: int, class_names: Sequence[str]):
    from pipelines.segmenter import HoVerNetLite

    return HoVerNetLite(num_classes=num_classes, widths=tuple(cfg.widths), depth=cfg.depth,
                        decoder_scale=cfg.decoder_scale, mpp=cfg.mpp, class_names=tuple(class_names))


def _folder_class(folder: Path) -> str | None:
    """The diffusers class a folder declares (a pipeline's or a model's), if any."""
    for name in ("model_index.json", "config.json"):
        try:
            return str(json.loads((folder / name).read_text())["_class_name"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def init_weights(model, folder: str | Path) -> None:
    """Start ``model`` from a trained segmenter folder (fine-tuning), refusing any other architecture.

    The weights come through :func:`pipelines.encoders.load_model_folder` (local folder,
    safetensors only); a different width, depth or class table is an error naming a
    differing tensor, not a silent partial load.
    """
    from pipelines.encoders import load_model_folder
    from pipelines.segmenter import HoVerNetLite

    folder = Path(folder)
    kind = _folder_class(folder)
    if kind is not None and kind != HoVerNetLite.__name__:
        raise InputError("init_from", f"{folder} holds a {kind}, not a nuclei segmenter ({HoVerNetLite.__name__}); "
                                      f"give a segmenter folder such as checkpoints/nuclei-segmenter")
    source = load_model_folder(HoVerNetLite, folder)
    if tuple(source.config.class_names) != tuple(model.config.class_names):
        raise InputError("init_from", f"{folder} types {list(source.config.class_names)}, this recipe's data "
                                      f"{list(model.config.class_names)}")
    ours, theirs = model.state_dict(), source.state_dict()
    mismatched = sorted(k for k in ours.keys() | theirs.keys()
                        if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    if mismatched:
        raise InputError("init_from", f"{folder} does not match this recipe's model ({len(mismatched)} "
                                      f"tensors differ, e.g. {mismatched[0]}); use the same widths/depth/classes")
    model.load_state_dict(theirs)


def train(cfg: SegmenterConfig, resume: str | None = None) -> Path:
    """Run (or resume) training; returns the ``final`` model folder."""
    torch.set_num_threads(cfg.threads)

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    from pipelines.segmenter import HoVerNetLite
    from studio.stain.augment import StainAugment

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    # Every process runs all max_steps steps on its own shard (BatchSampler rank/world), so the
    # schedule advances once per step; accelerate's default would step it num_processes times.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out),
                              step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)
    data, probabilities = build_training_data(cfg)
    val_data = build_validation_data(cfg)
    if dict(val_data.classes) != dict(data.classes):
        raise InputError("val", f"class table {dict(val_data.classes)} differs from the training data's "
                                f"{dict(data.classes)}")
    names = [data.classes[c] for c in sorted(data.classes)]
    model = build_model(cfg, data.num_classes, names)
    if cfg.init_from:
        init_weights(model, cfg.init_from)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, floor=0.05)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = None
    if cfg.use_ema:
        unwrapped = accelerator.unwrap_model(model)
        ema = EMAModel(unwrapped.parameters(), decay=cfg.ema_decay, model_cls=HoVerNetLite,
                       model_config=unwrapped.config)

    start = 0
    checkpoint = resume_path(out, resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if ema is not None:
            ema_loaded = EMAModel.from_pretrained(str(checkpoint / "ema"), model_cls=HoVerNetLite)
            ema.load_state_dict(ema_loaded.state_dict())
        start = json.loads((checkpoint / "step.json").read_text())["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start}")

    sampler = BatchSampler(data, probabilities, cfg.crop_size, stain=StainAugment() if cfg.stain_jitter else None,
                           seed=cfg.seed, class_balance=cfg.class_balance, scale_jitter=cfg.scale_jitter,
                           degrade=cfg.degrade, mpp=cfg.mpp)
    log = MetricsLog(out)
    model.train()
    for step in range(start, cfg.max_steps):
        batch = sampler.batch(step, cfg.batch_size, rank=accelerator.process_index,
                              world=accelerator.num_processes)
        tensors = {k: v.to(accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with accelerator.accumulate(model):
            output = model(tensors["image"])
            loss, parts = hovernet_loss(output, tensors, cfg)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).parameters())
        done = step + 1
        if (done % cfg.log_every == 0 or done == cfg.max_steps) and accelerator.is_main_process:
            log.write(step=done, loss=round(loss.item(), 5), lr=scheduler.get_last_lr()[0], **parts,
                      sources=dict(Counter(batch["sources"])), processes=accelerator.num_processes)
        if (done % cfg.validate_every == 0 or done == cfg.max_steps) and accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            with ema_weights(ema, unwrapped):
                metrics = validate(unwrapped, val_data, cfg.val_tiles, out / "validation" / f"step_{done:06d}.png")
            log.write(step=done, **metrics)
            accelerator.print(f"step {done}: loss {loss.item():.4f} {metrics}")
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints,
                            extra=(lambda path: ema.save_pretrained(str(path / "ema"))) if ema is not None else None)

    final = out / "final"
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(unwrapped.parameters())
    unwrapped.eval()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(final, safe_serialization=True)
    accelerator.wait_for_everyone()
    accelerator.print(f"wrote {final}")
    return final


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).parent / "recipes" / "segmenter.yaml")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = load_config(SegmenterConfig, args.config, {"max_steps": args.max_steps, "output_dir": args.output_dir,
                                                     "threads": args.threads})
    return train(cfg, args.resume)


if __name__ == "__main__":
    main()
