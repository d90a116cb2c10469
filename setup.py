# Minimal bootstrap; the CUDA/C++ build is added by the csrc work.
from setuptools import setup

setup(
    name="gmwae_fast",
    version="0.1.0",
    packages=["gmwae_fast", "gmwae_fast.ops", "gmwae_fast.kernels"],
    package_dir={"gmwae_fast": "gmwae_fast", "gmwae_fast.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
)
