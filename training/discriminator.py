"""A small PatchGAN discriminator and the hinge losses of the SD autoencoders' adversarial term.

The Stable Diffusion VAEs (taming-transformers' ``LPIPSWithDiscriminator``) restore the
micro-texture a pixel loss averages away with a patch discriminator: it scores every
~40 px window of a tile as real or reconstructed, so the decoder is pushed towards
sharp nuclear chromatin and fibre edges, not towards a global colour statistic.

Ours is small (three strided 4x4 convs, ~170 k parameters): the tile VAE trains on
64 px crops on one CPU thread. Spectral norm on every conv (Miyato et al. 2018) keeps the
discriminator Lipschitz without batch statistics, which is what lets a hinge GAN train
stably at batch 16; its power-iteration vectors are buffers, so they are checkpointed
with the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """Logit map ``(B, 1, H/8, W/8)`` for images in [-1, 1] (the VAE's pixel range).

    Args:
        in_channels: image channels.
        width: channels of the first conv; doubled by each of the next two strided convs.
        strided: how many stride-2 4x4 convs (each halves the map); the receptive field is
            22 px for 3, plus 16 px from the final 3x3 conv.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, strided: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        chans = in_channels
        for i in range(strided):
            out = width * 2 ** min(i, 2)
            layers += [spectral_norm(nn.Conv2d(chans, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            chans = out
        layers.append(spectral_norm(nn.Conv2d(chans, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (taming-transformers' ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's score of reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """``|grad rec| / |grad g|`` at the decoder's last layer (Esser et al. 2021, the SD VAEs'
    ``calculate_adaptive_weight``): the adversarial gradient is scaled to the size of the
    reconstruction gradient, so one ``adversarial_weight`` works whatever the two losses' scales."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
