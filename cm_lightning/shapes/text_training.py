"""Training the shapes teacher's text encoder to state its scene (SD1.5 ships CLIP; our world needs its own).

A CLIPTextModel with random weights tells the world's words apart, but a few-million-parameter UNet then has
to learn from pixels alone which colour belongs to which shape at which place, and it does not in a short
training run (benchmarks/teacher.md: wrong captions raised the teacher's loss by only 5-20 %). CLIP's own
embeddings come from contrastive training against images; ours come from supervised training against the
generator's labels: linear heads read the whole scene (background, and per grid cell: occupied, shape,
colour, size) from the hidden state at the end-of-text token and at every padding position after it, which
the causal encoder lets see the whole caption. The heads are thrown away; the encoder is then frozen, as
SD's is, and the UNet's cross-attention reads a scene code instead of a riddle.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .world import caption_of, sample_scene
from .judge import CELL_HEADS, HEADS, NUM_CELLS, compare_scenes, scene_targets

log = logging.getLogger(__name__)


class SceneHeads(nn.Module):
    """Linear read-out of a scene from one hidden state [.., D]: logits per head (cell heads [.., 9, K])."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.background = nn.Linear(hidden_size, len(HEADS["background"]))
        self.cells = nn.ModuleDict({h: nn.Linear(hidden_size, NUM_CELLS * len(HEADS[h])) for h in CELL_HEADS})

    def forward(self, hidden: Tensor) -> dict[str, Tensor]:
        out = {"background": self.background(hidden)}
        for h, head in self.cells.items():
            out[h] = head(hidden).unflatten(-1, (NUM_CELLS, len(HEADS[h])))
        return out


def scene_loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Summed cross-entropy over the heads; logits may carry extra leading positions [B, P, ...]."""
    total = logits["background"].new_zeros(())
    for h, target in targets.items():
        pred = logits[h]
        while target.ndim < pred.ndim - 1:  # broadcast targets over the positions axis
            target = target.unsqueeze(1)
        target = target.expand(pred.shape[:-1])
        total = total + F.cross_entropy(pred.flatten(0, -2), target.flatten(), ignore_index=-1)
    return total


def _captions(n: int, split: str, seed: int) -> tuple[list[str], dict[str, Tensor]]:
    rng = np.random.default_rng(seed)
    specs = [sample_scene(rng, split=split) for _ in range(n)]
    return [caption_of(s) for s in specs], scene_targets(specs)


def _tokenize(tokenizer, captions: list[str]) -> tuple[Tensor, Tensor]:
    """Token ids [N, 77] and the position of each caption's end-of-text token [N]."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids, (ids == tokenizer.eos_token_id).float().argmax(1)


def _summary_states(text_encoder, ids: Tensor, eos: Tensor, positions: int) -> Tensor:
    """Hidden states at the end-of-text token and the next ``positions - 1`` padding positions [B, P, D]."""
    hidden = text_encoder(ids)[0]
    index = (eos.unsqueeze(1) + torch.arange(positions, device=ids.device)).clamp(max=ids.shape[1] - 1)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@torch.no_grad()
def scene_accuracy(text_encoder, heads: SceneHeads, tokenizer, captions: list[str],
                   targets: dict[str, Tensor], batch_size: int = 512) -> dict[str, float]:
    """Accuracy of reading each attribute back from the end-of-text state (object heads at asked cells only)."""
    device = next(text_encoder.parameters()).device
    preds: dict[str, list[Tensor]] = {h: [] for h in HEADS}
    for i in range(0, len(captions), batch_size):
        ids, eos = _tokenize(tokenizer, captions[i:i + batch_size])
        logits = heads(_summary_states(text_encoder, ids.to(device), eos.to(device), 1)[:, 0])
        for h in HEADS:
            preds[h].append(logits[h].argmax(-1).cpu())
    accuracy = compare_scenes({h: torch.cat(v) for h, v in preds.items()}, targets)
    return {h: accuracy[h] for h in HEADS}


def train_text_encoder(
    text_encoder, tokenizer, *, steps: int, batch_size: int = 256, lr: float = 1e-3, num_captions: int = 20000,
    positions: int = 8, seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
) -> dict[str, float]:
    """Train ``text_encoder`` in place to state the scene of shapes captions; return its read-out accuracy on
    held-out captions (shape-colour pairs never seen in training). ``positions``: how many states from the
    end-of-text token on carry the scene (the UNet's cross-attention can find it in any of them)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    captions, targets = _captions(num_captions, "train", seed)
    ids, eos = _tokenize(tokenizer, captions)
    text_encoder.to(device).train().requires_grad_(True)
    heads = SceneHeads(text_encoder.config.hidden_size).to(device)
    params = [*text_encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="text encoder", disable=not progress)
    for _ in bar:
        batch = torch.randint(0, num_captions, (batch_size,))
        states = _summary_states(text_encoder, ids[batch].to(device), eos[batch].to(device), positions)
        loss = scene_loss(heads(states), {h: t[batch].to(device) for h, t in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    text_encoder.eval().requires_grad_(False)
    held_captions, held_targets = _captions(2000, "heldout", seed + 1)
    accuracy = scene_accuracy(text_encoder, heads, tokenizer, held_captions, held_targets)
    log.info("text encoder: final loss %.4f; held-out read-out accuracy %s", loss.item(),
             " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return {"final_loss": loss.item(), "heldout_accuracy": accuracy}
