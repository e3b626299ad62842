"""Stable Diffusion parts: loading (`components`), frozen encoders (`encoders`), LoRA (`lora`), and the
tiny offline stand-in model (`tiny`, `tokenizer`).

No re-exports here: importing `cm_lightning.models.tokenizer` should not pull in diffusers.
"""
