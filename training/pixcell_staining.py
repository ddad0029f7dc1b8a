"""Train PixCell virtual staining (H&E -> IHC): the flow-matching MLP and the rank-4 ``attn2`` LoRA.

    python -m training.pixcell_staining --config training/recipes/pixcell_staining_her2.yaml [--resume latest]
    accelerate launch -m training.pixcell_staining --config training/recipes/pixcell_staining_her2.yaml

The two small models of the ``pixcell-virtual-staining`` release, trained on the studio's
registered H&E / IHC pairs (:mod:`studio.data.ihc_pairs`: phantom pairs and pairs rendered
from the real labelled tile; plus any MIST / BCI folder, :mod:`studio.data.paired`), and
written in the release's layout so ``histostudio translate --model pixcell --checkpoint
OUT/final`` runs them (:mod:`pipelines.pixcell_staining` loads them):

* **flow MLP** (:class:`~pipelines.pixcell_staining.FlowMLP`, ``ckpts/mlp/<name>_mlp.safetensors``):
  rectified flow / conditional flow matching between the UNI-2h token of an H&E crop and the
  token of the same crop of its IHC twin: ``x_t = t * ihc + (1 - t) * he``, target velocity
  ``ihc - he``, timestep ``999 t``, ``t ~ U(0, 1)`` -- the convention the pipeline's Euler
  integration (t = 0 H&E -> t = 1 IHC) assumes;
* **LoRA** (``ckpts/lora/<name>_lora.safetensors``, keys ``<module>.lora_A.weight`` /
  ``<module>.lora_B.weight``): rank-``r`` matrices around the frozen ``attn2.to_q/to_k/to_v/
  to_out.0`` Linear layers of PixCell-1024 (:class:`LoRALinear`; B zero-initialised, so step 0
  is the base model), scale ``alpha / r`` with the release's alpha 4 (what
  :func:`~pipelines.pixcell_staining.merge_lora` merges). Trained with PixCell's diffusion
  objective (epsilon MSE on the first ``in_channels`` outputs; DDPM noising from the published
  scheduler config) on IHC tiles at the native size, conditioned on the UNI-2h tokens of their
  own 4x4 grid of crops, the tokens replaced by the learned null embedding with probability
  ``cond_dropout`` (classifier-free guidance at sampling time).

PixCell, the SD3.5 VAE and UNI-2h are frozen (``requires_grad_(False)``; their weights are
never touched, so the base stays bit-identical). The frozen encoders run once per training
tile: UNI-2h tokens of both sides (``orientations`` dihedral views each), and -- with
``cache_latents`` -- the VAE posterior of the IHC side; batches are a pure function of
``(seed, step)``, so ``--resume latest`` continues exactly. Checkpoints hold only what is
trained (LoRA A/B and the MLP) as safetensors, never the 2.4 GB base.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import InputError
from training.utils import (
    MetricsLog,
    common_args,
    load_config,
    map_across_processes,
    resume_training,
    save_checkpoint,
    warmup_cosine_scheduler,
)


@dataclass
class PixCellStainingConfig:
    output_dir: str = "runs/pixcell_staining_her2"
    stain: str = "her2"
    name: str | None = None  # release file stem; default the release's (mist_her2, ...)
    pixcell: str = "/models/PixCell-1024"
    uni2h: str = "/models/UNI2-h"
    vae: str | None = None  # SD3.5 VAE folder; default: found beside PixCell (pipelines.pixcell.resolve_vae)
    seed: int = 0
    # data: registered pairs at PixCell's native size (larger pairs are cropped to it)
    phantom_pairs: int = 64
    real_pairs: bool = True
    mist: str | None = None  # MIST root (<stain>/TrainValAB/trainA, trainB)
    bci: str | None = None  # BCI root (HE/train, IHC/train; HER2 only)
    orientations: int = 8  # dihedral views of each pair encoded (1 = as is)
    cache_latents: bool = True  # keep the IHC VAE posteriors in memory (off: encode each batch)
    max_steps: int = 4000  # one flow-MLP update and one LoRA update per step
    warmup_steps: int = 100
    # flow MLP (FlowMLP keyword arguments; the release: 1536 -> 1536, width 1024, 6 blocks)
    flow: dict[str, Any] | None = None
    flow_batch_size: int = 256  # token pairs
    flow_learning_rate: float = 1e-4
    # LoRA
    lora_rank: int = 4
    lora_batch_size: int = 2  # tiles
    lora_learning_rate: float = 1e-4
    cond_dropout: float = 0.1
    val_pairs: int = 8  # held-out phantom pairs (seeds training never draws): flow-MLP token agreement
    val_flow_steps: int = 20  # Euler steps of the validation integration
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    threads: int = 1
    mixed_precision: str = "no"  # "bf16" on GPU: frozen weights in bf16, trained weights fp32


# --------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + scale * B(A(x))``.

    The children are named as peft names them (``base_layer``, ``lora_A``, ``lora_B``), so the
    state-dict keys of the adapter are ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``,
    the names :func:`pipelines.pixcell_staining.lora_pairs` reads. B starts at zero: the wrapped
    layer computes exactly what the base layer does until the first update.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)  # peft's init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        return out + (self.scale * update).to(out.dtype)


def add_lora(transformer: nn.Module, rank: int) -> list[str]:
    """Wrap every ``attn2`` target Linear of ``transformer`` in :class:`LoRALinear`; the paths wrapped."""
    from pipelines.pixcell_staining import LORA_ALPHA, LORA_TARGETS

    if rank < 1:
        raise InputError("lora_rank", f"{rank}; must be at least 1")
    paths = [name for name, module in transformer.named_modules()
             if name.endswith(LORA_TARGETS) and isinstance(module, nn.Linear)]
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = transformer.get_submodule(parent)
        lora = LoRALinear(getattr(owner, child), rank, LORA_ALPHA)
        lora.to(device=lora.base_layer.weight.device)
        setattr(owner, child, lora)
    return paths


def lora_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: ``{<module>.lora_A.weight, <module>.lora_B.weight}`` as float32 on CPU."""
    return {k: v.detach().float().cpu().contiguous() for k, v in transformer.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``model``: the LoRA of a PixCell transformer, or the whole flow MLP."""
    lora = lora_state(model)
    return lora or {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- data
def release_name(cfg: PixCellStainingConfig) -> str:
    from pipelines.pixcell_staining import STAIN_FILES

    if cfg.name:
        return cfg.name
    if cfg.stain not in STAIN_FILES:
        raise InputError("stain", f"{cfg.stain!r}; choose from {', '.join(STAIN_FILES)} (or set name)")
    return STAIN_FILES[cfg.stain]


def build_pairs(cfg: PixCellStainingConfig, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """uint8 H&E and IHC tiles of every registered training pair, each at least ``size`` px."""
    from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, check_stain, hgsc_pairs, phantom_pairs

    stain = check_stain(cfg.stain)
    if cfg.seed * 100_000 + 1000 + cfg.phantom_pairs >= IHC_SEEDS_HELD_OUT:
        raise InputError("phantom_pairs", "training seeds would reach the held-out phantom pairs")
    pairs = phantom_pairs(cfg.phantom_pairs, size, stain, seed=cfg.seed * 100_000 + 1000) if cfg.phantom_pairs else []
    if cfg.real_pairs:
        pairs += hgsc_pairs(size, stain, split="train", seed=cfg.seed)
    he, ihc = [p.he for p in pairs], [p.ihc for p in pairs]
    for root, kind in ((cfg.mist, "mist"), (cfg.bci, "bci")):
        if not root:
            continue
        from studio.data.paired import MIST_STAINS, BCIDataset, MISTDataset

        if kind == "bci":
            data = BCIDataset(root, "train")
        else:
            data = MISTDataset(root, next(s for s in MIST_STAINS if s.lower() == stain))
        for i in range(len(data)):
            a, b, _ = data.read(i)
            he.append(a)
            ihc.append(b)
    if not he:
        raise InputError("config", "no training pairs: set phantom_pairs > 0, real_pairs, mist or bci")
    small = next((a.shape[:2] for a in he if min(a.shape[:2]) < size), None)
    if small is not None:
        raise InputError("pairs", f"a {small[1]}x{small[0]} pair is smaller than PixCell's native {size} px tile")
    return he, ihc


def orient(tile: np.ndarray, k: int) -> np.ndarray:
    """The ``k``-th of the 8 dihedral views (k mod 4 quarter turns, flipped for k >= 4)."""
    view = np.rot90(tile, k % 4)
    return np.ascontiguousarray(view[:, ::-1] if k >= 4 else view)


class StainingBank:
    """Every (pair, orientation) as the frozen models see it: a native-size crop of both sides,
    the UNI-2h tokens of their 4x4 (or native) grid of crops, and optionally the IHC VAE posterior."""

    def __init__(self, he: list[np.ndarray], ihc: list[np.ndarray], size: int, grid: tuple[int, int],
                 encoder: Any, pipe: Any, cfg: PixCellStainingConfig, device: torch.device,
                 accelerator: Any = None):
        """``accelerator``: with several processes each encodes a contiguous share of the views
        (:func:`~training.utils.map_across_processes`) and every rank ends with the same bank."""
        from studio.io import to_tensor

        rng = np.random.default_rng([cfg.seed, 0x57A1])
        self.ihc, self.size = ihc, size
        self.views: list[tuple[int, int, int, int]] = []  # (pair, orientation, y, x): tiles cut on demand
        for i in range(len(he)):  # crop positions first, from one rng: the same on every rank
            h, w = he[i].shape[:2]
            for k in range(max(1, min(8, cfg.orientations))):
                y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                self.views.append((i, k, y, x))

        def encode(index: int) -> tuple[torch.Tensor, ...]:
            i, k, y, x = self.views[index]
            pair = to_tensor(np.stack([orient(he[i][y:y + size, x:x + size], k),
                                       orient(ihc[i][y:y + size, x:x + size], k)]))
            tokens = encoder.embed(pair, grid=grid).cpu()
            if not cfg.cache_latents:
                return tokens[0], tokens[1]
            with torch.no_grad():
                dist = pipe.vae.encode(pair[1:].to(device, pipe.vae.dtype) * 2 - 1).latent_dist
            return tokens[0], tokens[1], dist.mean[0].float().cpu(), dist.std[0].float().cpu()

        if accelerator is None:
            encoded = [encode(i) for i in range(len(self.views))]
        else:
            encoded = map_across_processes(accelerator, len(self.views), encode, what="encoded views")
        self.he_tokens = torch.stack([e[0] for e in encoded])  # (N, T, D)
        self.ihc_tokens = torch.stack([e[1] for e in encoded])
        self.means = torch.stack([e[2] for e in encoded]) if cfg.cache_latents else None
        self.stds = torch.stack([e[3] for e in encoded]) if cfg.cache_latents else None

    def __len__(self) -> int:
        return len(self.he_tokens)

    def ihc_view(self, index: int) -> np.ndarray:
        i, k, y, x = self.views[index]
        return orient(self.ihc[i][y:y + self.size, x:x + self.size], k)

    def token_pairs(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` (H&E token, IHC token) pairs of the same crop, drawn across tiles and grid cells."""
        flat_he = self.he_tokens.reshape(-1, self.he_tokens.shape[-1])
        flat_ihc = self.ihc_tokens.reshape(-1, self.ihc_tokens.shape[-1])
        idx = torch.randint(0, len(flat_he), (n,), generator=gen)
        return flat_he[idx], flat_ihc[idx]

    def ihc_batch(self, n: int, gen: torch.Generator, pipe: Any, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` IHC tiles as PixCell latents ``(z - shift) * scaling`` and their own UNI tokens."""
        cfg = pipe.vae.config
        idx = torch.randint(0, len(self), (n,), generator=gen)
        if self.means is not None:
            z = self.means[idx] + self.stds[idx] * torch.randn(self.means[idx].shape, generator=gen)
        else:
            from studio.io import to_tensor

            tiles = to_tensor(np.stack([self.ihc_view(int(i)) for i in idx])).to(device, pipe.vae.dtype)
            with torch.no_grad():
                dist = pipe.vae.encode(tiles * 2 - 1).latent_dist
            z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean)).float().cpu()
        latents = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        return latents.to(device), self.ihc_tokens[idx].to(device)


@torch.no_grad()
def validate_flow(flow: nn.Module, val: tuple[torch.Tensor, torch.Tensor] | None, steps: int) -> dict[str, float]:
    """How close the flowed H&E tokens of held-out pairs come to their IHC tokens (mean cosine),
    beside the untouched H&E tokens' cosine: the flow MLP helps when ``val_cos`` beats ``val_cos_he``."""
    if val is None:
        return {}
    he, ihc = val
    was_training = flow.training
    flow.eval()
    moved = flow.integrate(he, steps).cpu()
    flow.train(was_training)
    return {"val_cos": F.cosine_similarity(moved, ihc, dim=-1).mean().item(),
            "val_cos_he": F.cosine_similarity(he, ihc, dim=-1).mean().item(),
            "val_mse": F.mse_loss(moved, ihc).item(), "val_mse_he": F.mse_loss(he, ihc).item()}


def held_out_tokens(cfg: PixCellStainingConfig, size: int, grid: tuple[int, int], encoder: Any
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """UNI-2h tokens of ``val_pairs`` phantom pairs from the held-out seeds, both sides."""
    from studio.data.ihc_pairs import IHC_SEEDS_HELD_OUT, phantom_pairs
    from studio.io import to_tensor

    if cfg.val_pairs <= 0:
        return None
    pairs = phantom_pairs(cfg.val_pairs, size, cfg.stain, seed=IHC_SEEDS_HELD_OUT)
    he = encoder.embed(to_tensor(np.stack([p.he for p in pairs])), grid=grid)
    ihc = encoder.embed(to_tensor(np.stack([p.ihc for p in pairs])), grid=grid)
    return he.reshape(-1, he.shape[-1]), ihc.reshape(-1, ihc.shape[-1])


# --------------------------------------------------------------------------- release
def write_release(folder: Path, name: str, transformer: nn.Module, flow: nn.Module,
                  cfg: PixCellStainingConfig) -> Path:
    """``folder/ckpts/lora/<name>_lora.safetensors`` and ``folder/ckpts/mlp/<name>_mlp.safetensors``:
    the layout of the published release, with its key names (what ``translate --model pixcell`` loads)."""
    from safetensors.torch import save_file

    lora_dir, mlp_dir = folder / "ckpts" / "lora", folder / "ckpts" / "mlp"
    lora_dir.mkdir(parents=True, exist_ok=True)
    mlp_dir.mkdir(parents=True, exist_ok=True)
    meta = {"trained_by": "histostudio training.pixcell_staining", "stain": cfg.stain, "pixcell": cfg.pixcell,
            "uni2h": cfg.uni2h, "lora_rank": str(cfg.lora_rank)}
    save_file(lora_state(transformer), str(lora_dir / f"{name}_lora.safetensors"), metadata=meta)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in flow.state_dict().items()},
              str(mlp_dir / f"{name}_mlp.safetensors"), metadata={**meta, "flow": json.dumps(dict(flow.config))})
    (folder / "training.json").write_text(json.dumps(asdict(cfg), indent=2))
    return folder


def checkpoint_hooks(accelerator: Any) -> None:
    """Keep only the trained weights in accelerate checkpoints (LoRA A/B, the flow MLP), and
    load them back by name, strict on the trained keys; the frozen base is never saved."""
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            weights[i] = trainable_state(accelerator.unwrap_model(model))

    def load_hook(models, input_dir):
        for i in range(len(models)):
            model = accelerator.unwrap_model(models[i])
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            want = set(trainable_state(model))
            if set(state) != want:
                from studio.errors import WeightsError

                raise WeightsError(path, "does not hold this recipe's trained weights (another lora_rank or flow "
                                         "size?); resume from a checkpoint this recipe wrote")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate would insist on the frozen base weights too

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------- training
def main(argv: list[str] | None = None) -> Path:
    parser = common_args(__doc__.split("\n\n")[0],
                         Path(__file__).parent / "recipes" / "pixcell_staining_her2.yaml")
    parser.add_argument("--pixcell", default=None, help="PixCell-1024 folder")
    parser.add_argument("--uni2h", default=None, help="UNI-2h folder")
    args = parser.parse_args(argv)
    cfg = load_config(PixCellStainingConfig, args.config,
                      {"max_steps": args.max_steps, "output_dir": args.output_dir, "threads": args.threads,
                       "pixcell": args.pixcell, "uni2h": args.uni2h})
    torch.set_num_threads(cfg.threads)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    from pipelines.pixcell import PixCellPipeline
    from pipelines.pixcell_staining import FlowMLP
    from pipelines.uni2h import UNI2hEncoder

    name = release_name(cfg)
    if not 0.0 <= cfg.cond_dropout < 1.0:
        raise InputError("cond_dropout", f"{cfg.cond_dropout}; must be in [0, 1)")
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_dir=str(out))
    set_seed(cfg.seed)
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)

    # 1. frozen parts: PixCell (+ SD3.5 VAE), UNI-2h
    pipe = PixCellPipeline.from_pretrained(cfg.pixcell, vae=cfg.vae, dtype=weight_dtype)
    transformer, vae = pipe.transformer, pipe.vae
    encoder = UNI2hEncoder.from_folder(cfg.uni2h, device=device)
    for module in (transformer, vae, encoder.model):
        module.eval().requires_grad_(False)
    transformer.to(device)
    vae.to(device)
    width = int(transformer.config.caption_channels)
    if encoder.dim != width:
        raise InputError(cfg.uni2h, f"gives {encoder.dim}-wide tokens; {cfg.pixcell} takes {width} (UNI-2h: 1536)")
    k = int(round(int(transformer.config.caption_num_tokens) ** 0.5))
    grid, size = (k, k), pipe.native_size

    # 2. trained parts: LoRA around attn2, the flow MLP
    add_lora(transformer, cfg.lora_rank)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    lora_params = [p for n, p in transformer.named_parameters() if ".lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    in_channels = int(transformer.config.in_channels)
    flow = FlowMLP(**{**(cfg.flow or {}), "in_channels": width, "out_channels": width}).to(device).train()
    flow_opt = torch.optim.AdamW(flow.parameters(), lr=cfg.flow_learning_rate, weight_decay=0.0)
    lora_opt = torch.optim.AdamW(lora_params, lr=cfg.lora_learning_rate, weight_decay=1e-4)
    flow_lr = warmup_cosine_scheduler(flow_opt, cfg.warmup_steps, cfg.max_steps)
    lora_lr = warmup_cosine_scheduler(lora_opt, cfg.warmup_steps, cfg.max_steps)
    flow, transformer, flow_opt, lora_opt, flow_lr, lora_lr = accelerator.prepare(
        flow, transformer, flow_opt, lora_opt, flow_lr, lora_lr)
    checkpoint_hooks(accelerator)
    start, _ = resume_training(accelerator, out, args.resume)

    # 3. data: encoded once by the frozen parts
    he, ihc = build_pairs(cfg, size)
    bank = StainingBank(he, ihc, size, grid, encoder, pipe, cfg, device, accelerator)
    val = held_out_tokens(cfg, size, grid, encoder) if accelerator.is_main_process else None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    null = accelerator.unwrap_model(transformer).caption_projection.uncond_embedding
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        accelerator.print(f"{len(he)} pairs -> {len(bank)} views, {len(bank) * k * k} token pairs; "
                          f"{len(lora_params) // 2} LoRA layers; native {size} px, grid {k}x{k}")
    log = MetricsLog(out) if accelerator.is_main_process else None

    for step in range(start, cfg.max_steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + accelerator.process_index * 7919)
        # flow matching: x_t on the straight line H&E -> IHC, velocity ihc - he
        he_tok, ihc_tok = bank.token_pairs(cfg.flow_batch_size, gen)
        t = torch.rand(len(he_tok), generator=gen)
        x_t = (t[:, None] * ihc_tok + (1 - t[:, None]) * he_tok).to(device)
        with accelerator.autocast():
            velocity = flow(x_t, (999.0 * t).to(device))
        flow_loss = F.mse_loss(velocity.float(), (ihc_tok - he_tok).to(device))
        accelerator.backward(flow_loss)
        accelerator.clip_grad_norm_(flow.parameters(), 1.0)
        flow_opt.step()
        flow_lr.step()
        flow_opt.zero_grad()

        # LoRA: PixCell's epsilon objective on IHC latents, conditioned on their own tokens
        latents, tokens = bank.ihc_batch(cfg.lora_batch_size, gen, pipe, device)
        drop = (torch.rand(len(tokens), generator=gen) < cfg.cond_dropout).view(-1, 1, 1).to(device)
        tokens = torch.where(drop, null.to(tokens).unsqueeze(0).expand_as(tokens), tokens)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps.to(device))
        with accelerator.autocast():
            pred = transformer(noisy.to(weight_dtype), encoder_hidden_states=tokens.to(weight_dtype),
                               timestep=timesteps.to(device), return_dict=False)[0]
        lora_loss = F.mse_loss(pred[:, :in_channels].float(), noise.float())
        accelerator.backward(lora_loss)
        accelerator.clip_grad_norm_(lora_params, 1.0)
        lora_opt.step()
        lora_lr.step()
        lora_opt.zero_grad()

        done = step + 1
        if log is not None and (done % cfg.log_every == 0 or done == cfg.max_steps or done == start + 1):
            log.write(step=done, flow_loss=flow_loss.item(), lora_loss=lora_loss.item(),
                      lr_flow=flow_lr.get_last_lr()[0], lr_lora=lora_lr.get_last_lr()[0])
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, out, done, cfg.keep_checkpoints)
            metrics = validate_flow(accelerator.unwrap_model(flow), val, cfg.val_flow_steps)
            if log is not None and metrics:
                log.write(step=done, **metrics)
            accelerator.print(f"step {done}: flow {flow_loss.item():.4f} lora {lora_loss.item():.4f} "
                              + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    final = out / "final"
    if accelerator.is_main_process:
        write_release(final, name, accelerator.unwrap_model(transformer), accelerator.unwrap_model(flow), cfg)
        accelerator.print(f"wrote {final} (histostudio translate --model pixcell --stain {cfg.stain} "
                          f"--checkpoint {final})")
    accelerator.wait_for_everyone()
    return final


if __name__ == "__main__":
    import sys

    from studio.errors import HistostudioError

    try:
        main()
    except HistostudioError as exc:  # a user's bad folder / recipe / pairs: one line, exit 2 (as the CLI)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
