"""Turn finished training runs into the shipped demo checkpoints (fp16 safetensors).

    python scripts/export_checkpoints.py vae            # runs/vae/final            -> checkpoints/tile-vae
    python scripts/export_checkpoints.py ssl-encoder    # runs/ssl_encoder/final    -> checkpoints/ssl-encoder
    python scripts/export_checkpoints.py ssl-encoder-oriented  # runs/ssl_encoder_oriented/final -> ...-oriented
    python scripts/export_checkpoints.py embedding-ldm  # runs/ldm/final (+ sampler) -> checkpoints/embedding-ldm
    python scripts/export_checkpoints.py segmenter      # runs/segmenter/final      -> checkpoints/nuclei-segmenter
    python scripts/export_checkpoints.py virtual-ihc-her2  # runs/virtual_ihc_her2[_diffusion]/final -> ...-her2
    python scripts/export_checkpoints.py stain-fuser    # runs/stain_fuser/final    -> checkpoints/stain-fuser
    python scripts/export_checkpoints.py stain-fuser-regressor  # runs/stain_fuser_regressor/final -> ...-regressor
    python scripts/export_checkpoints.py stain-fuser --run runs/stain_fuser_prior   # another run folder
    python scripts/export_checkpoints.py mask-ldm       # runs/controlnet/final     -> checkpoints/mask-ldm

Each exported folder gets ``training.json``: the recipe, the exact command, the seed, the
step count and the run's last validation metrics, so every shipped weight can be
reproduced and audited. Weights are stored as fp16 (half the size in git) and load as
float32. The LDM's ``vae`` folder is a symlink to ``../tile-vae`` (one copy on disk) and
its ``encoder.json`` names the shipped ``builtin`` encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CKPT = ROOT / "checkpoints"
COMMANDS: list[str] | None = None  # set from --command: how the run was really made
RECIPE: str | None = None  # set from --recipe: the recipe file, when it is not training/recipes/<run name>.yaml


def last_validation(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    rows = [json.loads(line) for line in lines]
    val = [r for r in rows if any(k.startswith("val") for k in r)]
    return {"last_step": max((r.get("step", 0) for r in rows), default=0), "validation": val[-1] if val else {}}


def provenance(run: Path, module: str, recipe: str, extra: dict | None = None) -> dict:
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    recipe_path = RECIPE or f"training/recipes/{recipe}"
    if not (ROOT / recipe_path).is_file():
        raise SystemExit(f"{recipe_path}: no such recipe; pass --recipe with the file the run was trained from")
    return {"command": f"python -m training.{module} --config {recipe_path}",
            "recipe": recipe_path, "seed": config.get("seed"), "config": config,
            **({"commands": COMMANDS} if COMMANDS else {}), **last_validation(run), **(extra or {})}


def fine_tune_origin(run: Path, key: str) -> dict:
    """``{"fine_tuned_from": <its training.json>}`` when the run's config ``key`` names a
    checkpoint it started from (read before that checkpoint folder is replaced), else ``{}``."""
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    init = config.get(key)
    if init and (ROOT / init / "training.json").is_file():
        return {"fine_tuned_from": json.loads((ROOT / init / "training.json").read_text())}
    return {}


def replace_folder(dst: Path) -> None:
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)


def export_model(cls, src: Path, dst: Path, info: dict) -> Path:
    from pipelines.encoders import load_model_folder
    from pipelines.loading import save_fp16

    model = load_model_folder(cls, src)
    replace_folder(dst)
    save_fp16(model, dst)
    (dst / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return dst


def export_ldm(run: Path) -> Path:
    from pipelines.embedding_sampler import fit_on_real_tiles
    from pipelines.embedding_to_image import EmbeddingToImagePipeline
    from pipelines.encoders import load_encoder
    from pipelines.loading import latent_ddim

    pipe = EmbeddingToImagePipeline.from_pretrained(run / "final")
    pipe.scheduler = latent_ddim(pipe.scheduler.config)  # the sampler the model is reliable with
    encoder = load_encoder("builtin")
    trained_with = json.loads((run / "final" / "encoder.json").read_text())
    if trained_with.get("identity") != encoder.identity:
        raise SystemExit(f"the LDM was trained with encoder {trained_with.get('identity')}, but the shipped "
                         f"builtin encoder is {encoder.identity}: export the encoder it was trained with first")
    dst = ship_pipeline(pipe, CKPT / "embedding-ldm")  # its vae: the same weights as checkpoints/tile-vae
    (dst / "encoder.json").write_text(json.dumps({"encoder": "builtin", "embed_dim": encoder.dim,
                                                  "identity": encoder.identity}, indent=2) + "\n")
    sampler = fit_on_real_tiles(encoder, pipe.conditioner.grid_for(256, 256))
    sampler.save(dst / "embedding-sampler")
    (dst / "training.json").write_text(json.dumps(provenance(run, "ldm", "ldm.yaml", {
        "embedding_sampler": "pipelines.embedding_sampler.fit_on_real_tiles(builtin encoder, 4x4 grid), "
                             f"labels {sampler.labels}"}), indent=2) + "\n")
    return dst


def export_virtual_ihc(runs: Path, stain: str, diff_run: Path | None = None,
                       diffusion_strength: float | None = None) -> Path:
    """runs/virtual_ihc_<stain> (fast) and, when finished, the diffusion run (default
    runs/virtual_ihc_<stain>_diffusion; ``--run`` e.g. runs/virtual_ihc_her2_residual) -> one
    pipeline folder holding both translators (its vae is the diffusion run's: a symlink to
    ../tile-vae only when it is byte-identical to it). A refiner of the fast model
    (``diffusion_prior="fast"`` or ``"residual"``) ships with the fast generator it was trained on;
    when the fast run's folder is gone, the fast translator (and its provenance) is taken from
    the shipped checkpoint. ``diffusion_strength`` overrides the sampling default (a value
    chosen after training, recorded as such)."""
    import torch

    from pipelines.loading import latent_ddim
    from pipelines.virtual_ihc import VirtualIHCPipeline

    fast_run = runs / f"virtual_ihc_{stain}"
    shipped = CKPT / f"virtual-ihc-{stain}"
    diff_run = diff_run or runs / f"virtual_ihc_{stain}_diffusion"
    if (fast_run / "final").is_dir():
        fast = VirtualIHCPipeline.from_pretrained(fast_run / "final")
        info = {"fast": provenance(fast_run, "virtual_ihc", f"virtual_ihc_{stain}.yaml")}
    elif (shipped / "training.json").is_file():
        fast = VirtualIHCPipeline.from_pretrained(shipped)  # read before the folder is replaced
        info = {"fast": json.loads((shipped / "training.json").read_text())["fast"]}
    else:
        raise SystemExit(f"no fast translator: neither {fast_run}/final nor a shipped {shipped}")
    if fast.generator is None:
        raise SystemExit(f"{fast_run} / {shipped} holds no fast translator")
    parts = {"generator": fast.generator}
    if (diff_run / "final").is_dir():
        diff = VirtualIHCPipeline.from_pretrained(diff_run / "final")
        strength = diff.config.diffusion_strength if diffusion_strength is None else diffusion_strength
        parts.update(vae=diff.vae, unet=diff.unet, scheduler=latent_ddim(diff.scheduler.config),
                     diffusion_prior=diff.diffusion_prior, diffusion_strength=strength,
                     residual_scale=diff.config.get("residual_scale", 1.0))
        if diff.diffusion_prior != "none":
            # Compared at the shipped precision: the refiner trained on the fp16-exported fast
            # generator, so its float32 copy differs in bytes from the fast run's own weights.
            same = all(torch.equal(a.half(), b.half()) for a, b in zip(diff.generator.state_dict().values(),
                                                                       fast.generator.state_dict().values(),
                                                                       strict=True))
            if not same:
                raise SystemExit(f"{diff_run} refines another fast generator than {fast_run}/final; export refused")
        info["diffusion"] = provenance(diff_run, "virtual_ihc", f"{diff_run.name}.yaml")
        if diffusion_strength is not None:
            info["diffusion"]["sampling"] = {"diffusion_strength": diffusion_strength,
                                             "trained_default": diff.config.diffusion_strength,
                                             "chosen_on": "the training run's validation pairs, not the bench's"}
    dst = ship_pipeline(VirtualIHCPipeline(stain=stain, **parts), CKPT / f"virtual-ihc-{stain}")
    vae_run = Path(info.get("diffusion", {}).get("config", {}).get("vae", "")).parent
    if (dst / "vae").is_dir() and not (dst / "vae").is_symlink() and (vae_run / "config.json").is_file():
        # Its own autoencoder (the tile VAE fine-tuned on H&E + IHC): record how it was made too.
        info["vae"] = provenance(vae_run, "vae", f"{vae_run.name}.yaml")
    (dst / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return dst


def link_shipped_vae(dst: Path) -> bool:
    """Replace an exported ``vae`` folder by a symlink to ../tile-vae (one copy of the weights in
    git) when it *is* the tile VAE: same weights bytes and the same config apart from local
    paths. A VAE fine-tuned for the pipeline (the latent IHC translator's H&E + IHC VAE) is
    kept as its own folder; linking it would silently swap in a VAE the model never saw."""
    from pipelines.encoders import weights_digest

    ours, shipped = dst / "vae", CKPT / "tile-vae"
    if not ours.is_dir() or ours.is_symlink():
        return False
    if not (shipped / "config.json").is_file() or weights_digest(ours) != weights_digest(shipped):
        print(f"{ours}: not the shipped tile-vae (weights or config differ); kept as its own folder")
        return False
    shutil.rmtree(ours)
    os.symlink(os.path.relpath(shipped, dst), ours)
    return True


def ship_pipeline(pipe, dst: Path) -> Path:
    """Write ``pipe`` to ``dst`` as shipped: fp16 weights, ``vae`` a symlink to ../tile-vae when
    it is the tile VAE, no local paths in its configs."""
    from pipelines.loading import save_fp16

    replace_folder(dst)
    save_fp16(pipe, dst)
    link_shipped_vae(dst)
    scrub_local_paths(dst)
    return dst


def export_stain_fuser(run: Path, name: str) -> Path:
    """runs/stain_fuser[_regressor]/final -> checkpoints/<name> (its vae a symlink to ../tile-vae)."""
    from pipelines.stain_fuser import StainFuserPipeline

    dst = ship_pipeline(StainFuserPipeline.from_pretrained(run / "final"), CKPT / name)
    (dst / "training.json").write_text(json.dumps(provenance(run, "stain_fuser", f"{run.name}.yaml"), indent=2)
                                       + "\n")
    return dst


def scrub_local_paths(dst: Path) -> None:
    """Drop diffusers' ``_name_or_path`` (the training machine's run folder) from every
    exported component config (not through symlinks to other shipped folders): it leaks a
    local path and makes identical components differ."""
    configs = [dst / "model_index.json", *(d / "config.json" for d in [dst, *dst.iterdir()]
                                              if d.is_dir() and not d.is_symlink())]
    for config in configs:
        if config.is_file() and not config.is_symlink():
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def link_identical(dst: Path, part: str, shipped: Path) -> bool:
    """Replace ``dst/part`` by a symlink to ``shipped`` when every file in it is byte-identical
    (a frozen base exported twice is one copy in git); leave it alone otherwise."""
    ours, theirs = dst / part, shipped
    if not (ours.is_dir() and theirs.is_dir()):
        return False
    names = sorted(f.name for f in ours.iterdir())
    if names != sorted(f.name for f in theirs.iterdir()) or any(
            (ours / n).read_bytes() != (theirs / n).read_bytes() for n in names):
        return False
    shutil.rmtree(ours)
    os.symlink(os.path.relpath(theirs, dst), ours)
    return True


def export_mask_ldm(run: Path) -> Path:
    """runs/controlnet/final (or ``--run``, e.g. runs/controlnet_balanced) -> checkpoints/mask-ldm.
    The base UNet and conditioner were frozen during training, so they are symlinks to
    ../embedding-ldm when identical (checked bytewise). A run fine-tuned from a shipped
    checkpoint (``init_controlnet``) records that checkpoint's own provenance, so the chain of
    commands that made the weights stays reproducible."""
    from pipelines.mask_to_image import MaskToImagePipeline

    extra: dict = fine_tune_origin(run, "init_controlnet")
    dst = ship_pipeline(MaskToImagePipeline.from_pretrained(run / "final"), CKPT / "mask-ldm")
    linked = [part for part in ("unet", "conditioner") if link_identical(dst, part, CKPT / "embedding-ldm" / part)]
    (dst / "training.json").write_text(json.dumps(provenance(run, "controlnet", f"{run.name}.yaml", {
        "shared_with_embedding_ldm": linked, **extra}), indent=2) + "\n")
    return dst


def export_segmenter(run: Path) -> Path:
    """A segmenter run -> checkpoints/nuclei-segmenter. A run fine-tuned from a shipped
    checkpoint (``init_from``) records that checkpoint's provenance (read before it is
    replaced), so the whole chain of training commands stays reproducible."""
    from pipelines.segmenter import HoVerNetLite

    return export_model(HoVerNetLite, run / "final", CKPT / "nuclei-segmenter",
                        provenance(run, "segmenter", f"{run.name}.yaml", fine_tune_origin(run, "init_from")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["vae", "ssl-encoder", "ssl-encoder-oriented", "embedding-ldm", "segmenter",
                                         "virtual-ihc-her2",
                                         "virtual-ihc-ki67", "stain-fuser", "stain-fuser-regressor",
                                         "mask-ldm"])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--run", type=Path, default=None,
                        help="segmenter, stain-fuser*, mask-ldm, virtual-ihc-*: the run folder (default "
                             "runs/segmenter, runs/stain_fuser[_regressor], runs/controlnet, "
                             "runs/virtual_ihc_<stain>_diffusion; e.g. runs/segmenter_balanced, "
                             "runs/stain_fuser_prior, runs/controlnet_balanced, runs/virtual_ihc_her2_residual)")
    parser.add_argument("--command", action="append", default=None, dest="commands",
                        help="the exact training commands, in order, when the run was not one plain recipe run "
                             "(e.g. resumed with a different --max-steps); repeatable")
    parser.add_argument("--recipe", default=None,
                        help="the recipe the run was trained from, relative to the repository (default "
                             "training/recipes/<run folder name>.yaml)")
    parser.add_argument("--diffusion-strength", type=float, default=None,
                        help="virtual-ihc-*: the diffusion translator's sampling default, when chosen after training")
    args = parser.parse_args()
    global COMMANDS, RECIPE
    COMMANDS, RECIPE = args.commands, args.recipe
    CKPT.mkdir(exist_ok=True)
    if args.what == "vae":
        from diffusers import AutoencoderKL

        out = export_model(AutoencoderKL, args.runs / "vae" / "final", CKPT / "tile-vae",
                           provenance(args.runs / "vae", "vae", "vae.yaml"))
    elif args.what.startswith("ssl-encoder"):
        from pipelines.encoders import PatchEncoder

        name = args.what.replace("-", "_")
        out = export_model(PatchEncoder, args.runs / name / "final", CKPT / args.what,
                           provenance(args.runs / name, "ssl_encoder", f"{name}.yaml"))
    elif args.what == "segmenter":
        out = export_segmenter(args.run or args.runs / "segmenter")
    elif args.what == "mask-ldm":
        out = export_mask_ldm(args.run or args.runs / "controlnet")
    elif args.what.startswith("stain-fuser"):
        out = export_stain_fuser(args.run or args.runs / args.what.replace("-", "_"), args.what)
    elif args.what.startswith("virtual-ihc-"):
        out = export_virtual_ihc(args.runs, args.what.removeprefix("virtual-ihc-"), args.run, args.diffusion_strength)
    else:
        out = export_ldm(args.runs / "ldm")
    scrub_local_paths(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
    print(f"exported {out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
