"""Encoder / decoder of the paper's MNIST model (section 3).

Encoder: a DCGAN-style conv trunk (3 conv layers 5x5 stride 2, widths c/4, c/2, c with c = 64 by
default, batch norm + ReLU) shared by
  * q_D(k|x) = softmax(linear(features))                               -> logits (B, K)
  * q_C(z|k,x) = N(mu_k(x), diag(softplus(sigma_raw_k(x))^2)), one dense net per mode with two hidden
    layers of 32 units (ReLU), evaluated for all K modes at once with batched weights -> (B, K, d) x 2.
  The continuous nets read the flattened pixels by default (``qc_input="pixels"``, as the authors'
  public code does); ``qc_input="features"`` feeds them the conv features of the q_D net instead.

Decoder (deterministic): dense z -> 7x7xC, then transposed convs 5x5 stride 2 to 14x14xC/2 and
28x28xC/4, batch norm + ReLU after each, and a last 1x1 conv to one channel; C = 128 by default.
``forward`` returns logits; the mean image is their sigmoid.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Encoder(nn.Module):
    def __init__(self, K: int = 10, d: int = 10, channels: int = 64, hidden: int = 32, qc_input: str = "pixels"):
        super().__init__()
        if qc_input not in ("pixels", "features"):
            raise ValueError(f"qc_input must be 'pixels' or 'features', got {qc_input!r}")
        self.qc_input = qc_input
        c1, c2, c3 = max(channels // 4, 1), max(channels // 2, 1), channels
        self.K, self.d = K, d
        self.trunk = nn.Sequential(
            nn.Conv2d(1, c1, 5, 2, 2),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),  # 14x14
            nn.Conv2d(c1, c2, 5, 2, 2),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),  # 7x7
            nn.Conv2d(c2, c3, 5, 2, 2),
            nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),  # 4x4
            nn.Flatten(),
        )
        feat = c3 * 16
        self.logits = nn.Linear(feat, K)
        if qc_input == "pixels":
            feat = 28 * 28
        # K independent two-hidden-layer dense nets, stored as batched weights.
        self.w1 = nn.Parameter(torch.empty(K, feat, hidden))
        self.b1 = nn.Parameter(torch.zeros(K, hidden))
        self.w2 = nn.Parameter(torch.empty(K, hidden, hidden))
        self.b2 = nn.Parameter(torch.zeros(K, hidden))
        # batch norm on the hidden layers (as in the authors' code): without it the ReLUs of these small nets
        # die while they are pretrained to the constant prior moments, and q_C ignores x.
        self.bn1 = nn.BatchNorm1d(K * hidden)
        self.bn2 = nn.BatchNorm1d(K * hidden)
        self.w3 = nn.Parameter(torch.empty(K, hidden, 2 * d))
        self.b3 = nn.Parameter(torch.zeros(K, 2 * d))
        for w in (self.w1, self.w2, self.w3):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    @torch.no_grad()
    def init_to_prior(self, means: torch.Tensor, stds: torch.Tensor, weight_scale: float = 0.01) -> None:
        """Start q_C at the prior: output-layer bias = (mu0_k, softplus^-1(sigma0_k)), small output weights."""
        self.w3.mul_(weight_scale)
        self.b3[:, : self.d] = means
        self.b3[:, self.d :] = torch.log(torch.expm1(stds.clamp_min(1e-4)))

    def q_d_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Only the q_D head: x (B, 1, 28, 28) -> logits (B, K)."""
        return self.logits(self.trunk(x))

    def forward(self, x: torch.Tensor):
        h = self.trunk(x)  # (B, F)
        logits = self.logits(h)  # (B, K)
        if self.qc_input == "pixels":
            h = x.flatten(1)
        B = h.shape[0]
        a = torch.einsum("bf,kfh->bkh", h, self.w1) + self.b1
        a = F.relu(self.bn1(a.reshape(B, -1)).view_as(a))
        a = torch.einsum("bkh,khg->bkg", a, self.w2) + self.b2
        a = F.relu(self.bn2(a.reshape(B, -1)).view_as(a))
        out = torch.einsum("bkh,khg->bkg", a, self.w3) + self.b3  # (B, K, 2d)
        mu, sigma_raw = out[..., : self.d], out[..., self.d :]
        return mu.contiguous(), sigma_raw.contiguous(), logits


class Decoder(nn.Module):
    def __init__(self, d: int = 10, channels: int = 128):
        super().__init__()
        c1, c2, c3 = channels, max(channels // 2, 1), max(channels // 4, 1)
        self.c1 = c1
        self.fc = nn.Sequential(nn.Linear(d, 7 * 7 * c1), nn.BatchNorm1d(7 * 7 * c1), nn.ReLU(inplace=True))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(c1, c2, 5, 2, 2, output_padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),  # 14
            nn.ConvTranspose2d(c2, c3, 5, 2, 2, output_padding=1),
            nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),  # 28
            nn.Conv2d(c3, 1, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, d) -> logits (N, 1, 28, 28)."""
        h = self.fc(z).view(-1, self.c1, 7, 7)
        return self.net(h)


class GMModel(nn.Module):
    def __init__(
        self,
        K: int = 10,
        d: int = 10,
        enc_channels: int = 64,
        dec_channels: int = 128,
        hidden: int = 32,
        qc_input: str = "pixels",
    ):
        super().__init__()
        self.K, self.d = K, d
        self.encoder = Encoder(K, d, enc_channels, hidden, qc_input)
        self.decoder = Decoder(d, dec_channels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d) -> logits (..., 1, 28, 28)."""
        lead = z.shape[:-1]
        return self.decoder(z.reshape(-1, self.d)).view(*lead, 1, 28, 28)
