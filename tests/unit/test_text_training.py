"""The shapes teacher's text encoder learns to state its caption's scene, held-out shape-colour pairs included."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from cm_lightning.shapes.world import scene_at
from cm_lightning.shapes.judge import HEADS, scene_targets
from cm_lightning.shapes.text_training import SceneHeads, scene_loss, train_text_encoder
from cm_lightning.models.tiny import build_tiny_sd


def test_scene_loss_ignores_empty_cells_and_broadcasts_over_positions():
    targets = scene_targets([scene_at(i) for i in range(4)])
    heads = SceneHeads(16)
    for module in heads.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.bias)
    logits = heads(torch.zeros(4, 3, 16))  # 3 positions, all-zero logits = uniform
    expected = sum(torch.log(torch.tensor(float(len(HEADS[h])))) for h in HEADS)
    assert torch.allclose(scene_loss(logits, targets), expected, atol=1e-5)


def test_training_makes_the_scene_readable(tmp_path):
    folder = build_tiny_sd(tmp_path / "m", image_size=16, text_hidden_size=32)
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    before = [p.clone() for p in encoder.parameters()]
    metrics = train_text_encoder(encoder, tokenizer, steps=150, batch_size=64, lr=3e-3, num_captions=1000,
                                 progress=False)
    accuracy = metrics["heldout_accuracy"]
    # chance: 1/3 for the background, 1/6 for a colour (a longer run reads every attribute: benchmarks/teacher.md)
    assert accuracy["background"] > 0.95 and accuracy["colour"] > 0.3, accuracy
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen afterwards, as SD's CLIP is
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
