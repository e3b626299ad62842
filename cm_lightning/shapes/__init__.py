"""The shapes world: a procedural text-to-image world for measuring quality without SD1.5 weights.

It serves the core and imports it; nothing in the core imports it. ``world`` (the generator and its template
captions, a :class:`~cm_lightning.data.sources.CaptionedImageSource`), ``captions`` (captions back to scenes),
``judge`` / ``train_judge`` (a CNN that reads a scene out of an image), ``metrics`` and ``table`` (prompt fidelity,
judge-feature FD, the quality table), the teacher's builders (``text_training``, ``vae_training``, ``teacher`` with
:class:`~cm_lightning.shapes.teacher.TeacherTraining`) and the entry points ``build_teacher``, ``evaluate`` and
``demo`` (``python -m cm_lightning.shapes.demo``).
"""
