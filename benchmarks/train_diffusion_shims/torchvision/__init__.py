"""A minimal stand-in for torchvision, for the diffusion training benchmark only (it is put on the peer
process's PYTHONPATH by benchmarks/train_diffusion.py, never installed): diffusers' train_text_to_image.py
imports `torchvision.transforms` for its PIL image pipeline, and PyPI's torchvision does not load beside our
CPU torch build. `transforms` reproduces what torchvision does to a PIL image, so the peer trains on the same
pixels it would with the real package."""

__version__ = "0.0.0+train-diffusion-shim"
