"""cm_lightning: consistency training and distillation (CT, CD, MCD) for Stable Diffusion 1.5.

The Python API (imported on first use, so ``import cm_lightning`` does not import torch)::

    import cm_lightning
    run = cm_lightning.train_from_config(["experiment=quickstart"])      # as python -m cm_lightning.train ...
    pipe = cm_lightning.load_pipeline(run)                                # diffusers pipeline: LoRA + scheduler
    image = pipe("a red circle", **cm_lightning.sampling_kwargs(run)).images[0]
    cm_lightning.export_lora(run, "my_lora")                              # Hub-ready folder (card, grid)
    cfg = cm_lightning.compose_config("train", ["method=mcd"])            # any entry point's composed config
"""

__version__ = "0.1.0"

_API = ("compose_config", "train_from_config", "load_pipeline", "sampling_kwargs", "export_lora")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cm_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
