"""GM-WAE / GM-VAE trainer on MNIST (Gaujac, Feige, Barber, ACML 2019): ``python -m gmwae_fast.train``."""

from .cli import build_parser, main  # noqa: F401
