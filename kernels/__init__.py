"""Triton kernels of gmwae_fast, installed as ``gmwae_fast.kernels``.

Importing this package does not import Triton; each op module does, lazily from the launchers' callers.
"""
