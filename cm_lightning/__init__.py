"""cm_lightning: consistency training and distillation (CT, CD, MCD) for Stable Diffusion 1.5."""
__version__ = "0.1.0"
