"""Timestep grids: the DDIM solver grid used in training, segment edges (MCD) and inference schedules.

All functions return integer timesteps in 0..T-1 as ``torch.long`` tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

from .schedule import ve_sigmas

EdgeRule = Literal["icd", "pcm"]


def solver_grid(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """The N-step DDIM grid ``[k-1, 2k-1, ..., T-1]`` with skip ``k = T // N`` (N = 50: 19, 39, ..., 999)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"solver.num_timesteps={num_steps} must be in 1..{num_train_timesteps}")
    skip = num_train_timesteps // num_steps
    return torch.arange(1, num_steps + 1) * skip - 1


def sample_training_pairs(
    grid: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    index_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``t_hi = grid[i]`` and its solver neighbour ``t_lo = t_hi - k`` (clamped at 0).

    i ~ U{0..N-1}, or ~ ``index_weights`` [N] when given (iCT's lognormal choice).
    Returns (t_hi, t_lo), each [batch_size] long, on ``grid``'s device.
    """
    skip = int(grid[0]) + 1
    if index_weights is None:
        index = torch.randint(0, grid.numel(), (batch_size,), generator=generator)
    else:
        index = torch.multinomial(index_weights.cpu(), batch_size, replacement=True, generator=generator)
    index = index.to(grid.device)
    t_hi = grid[index]
    return t_hi, (t_hi - skip).clamp(min=0)


def segment_edges(grid: torch.Tensor, num_segments: int, rule: EdgeRule = "icd") -> torch.Tensor:
    """Left edges ``[0 = e_0 < e_1 < ... < e_{K-1}]`` of K segments of the trajectory (MCD).

    ``icd`` (Invertible CD): I = ceil(N/K), E = [0] + grid[arange(I, N, I) - 1]; K = 4, N = 50 -> [0, 259, 519, 779].
    ``pcm`` (Phased CM): E = [0] + grid[floor(N/K * j) - 1] for j = 1..K-1;        K = 4 -> [0, 239, 499, 739].
    K = 1 is a single boundary at 0: the whole trajectory is one segment, as in CD.
    """
    n = grid.numel()
    if not 1 <= num_segments <= n:
        raise ValueError(f"boundaries={num_segments} must be in 1..{n} (the number of solver steps)")
    if rule == "icd":
        interval = -(-n // num_segments)
        inner = grid[torch.arange(interval, n, interval) - 1]
    elif rule == "pcm":
        positions = torch.tensor([n * j // num_segments for j in range(1, num_segments)], dtype=torch.long)
        inner = grid[positions - 1]
    else:
        raise ValueError(f"edge rule {rule!r} is not one of 'icd', 'pcm'")
    edges = torch.cat([torch.zeros(1, dtype=torch.long), inner.to(torch.long).cpu()])
    return edges.unique()  # sorted; icd gives fewer than K edges when K does not divide N evenly


def boundary_of(t: torch.Tensor, edges: torch.Tensor, *, strict: bool = False) -> torch.Tensor:
    """The segment edge each timestep jumps to: ``max{e : e <= t}`` (training), or ``e < t`` if ``strict`` (sampling)."""
    edges = edges.to(t.device)
    below = (edges[None, :] < t[:, None]) if strict else (edges[None, :] <= t[:, None])
    # edges are sorted ascending and edges[0] = 0, so the last True is the largest admissible edge
    position = below.long().cumsum(dim=1).argmax(dim=1)
    return edges[position]


def lcm_timesteps(grid: torch.Tensor, num_steps: int) -> torch.Tensor:
    """LCMScheduler's inference timesteps: ``num_steps`` evenly spaced indices into the reversed solver grid.

    N = 50, 4 steps -> [999, 759, 499, 259].
    """
    reversed_grid = grid.flip(0)
    if not 1 <= num_steps <= reversed_grid.numel():
        raise ValueError(f"steps={num_steps} must be in 1..{reversed_grid.numel()} (the solver grid size)")
    index = torch.floor(torch.linspace(0, reversed_grid.numel(), num_steps + 1)[:-1]).long()
    return reversed_grid[index]


def edge_jump_timesteps(edges: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """MCD's deterministic schedule: start at T-1 and stop once at each nonzero edge, descending.

    K = 4 (icd) -> [999, 779, 519, 259]; the last jump goes from the lowest nonzero edge to timestep 0.
    """
    inner = edges[edges > 0].flip(0)
    return torch.cat([torch.tensor([num_train_timesteps - 1]), inner]).long()


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, *, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """DDIMScheduler's inference timesteps (descending) for the spacings SD-family configs use.

    SD1.5 (``leading``, offset 1): 50 steps -> [981, 961, ..., 1]; 4 steps -> [751, 501, 251, 1].
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps={num_steps} must be in 1..{num_train_timesteps}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = torch.arange(0, num_steps) * ratio + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        steps = torch.round(torch.arange(num_train_timesteps, 0, -ratio)).long().flip(0) - 1
    elif spacing == "linspace":
        steps = torch.linspace(0, num_train_timesteps - 1, num_steps).round().long()
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of 'leading', 'trailing', 'linspace'")
    return steps.flip(0).long()


def curriculum_num_steps(step: int, total_steps: int, start: int, end: int) -> int:
    """iCT's step-doubling curriculum: the solver grid size at training ``step``, doubling from ``start`` to ``end``.

    The stages are start, 2 start, 4 start, ... and finally ``end`` (the last doubling capped at it): ``d + 1``
    stages for the d doublings that reach ``end``, d = ceil(log2(end / start)), and training time is split evenly
    among them. 10 -> 50 over 400 steps: 10, 20, 40, 50 from steps 0, 100, 200, 300. With end / start a power of
    two this is iCT's K' = floor(K / (log2(s1/s0) + 1)) exactly; flooring the log instead would reach a
    non-power-of-two end only on the very last step.
    """
    if start >= end:
        return end
    doublings = 0
    while start * 2**doublings < end:  # exact integer ceil(log2(end / start))
        doublings += 1
    stage_length = max(1, total_steps // (doublings + 1))
    return min(start * 2 ** (step // stage_length), end)


def lognormal_step_weights(
    schedule_alphas_cumprod: torch.Tensor, grid: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0
) -> torch.Tensor:
    """iCT's lognormal choice of noise levels, as probabilities over grid indices i (pairs grid[i] -> grid[i] - k).

    In VE terms sigma_t = s_t / a_t; p(i) is proportional to the lognormal mass between sigma(t_lo) and sigma(t_hi):
    ``erf((log sigma_hi - P_mean) / (sqrt(2) P_std)) - erf((log sigma_lo - P_mean) / (sqrt(2) P_std))``.
    """
    sigma = ve_sigmas(schedule_alphas_cumprod.double())
    skip = int(grid[0]) + 1
    t_lo = (grid - skip).clamp(min=0)
    # the first pair ends at t = 0, SD's lowest level (sigma 0.029): the mass below it is dropped, as iCT's sigma_min does
    sigma_hi, sigma_lo = sigma[grid], sigma[t_lo]

    def cdf(s: torch.Tensor) -> torch.Tensor:
        return torch.erf((s.clamp(min=1e-12).log() - p_mean) / (2**0.5 * p_std))

    mass = (cdf(sigma_hi) - cdf(sigma_lo)).clamp(min=0)
    return (mass / mass.sum()).float()
