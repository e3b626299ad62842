"""MCD's segment edge rules: how many solver grid points each segment holds.

iCD's rule (I = ceil(N/K)) can leave the top segment with one grid point: K = 8, N = 50 gives edges up to 979, so
the segment [979, 999] trains only the pair 999 -> 979, whose target is x_lo itself, and the sampler spends one of
its 8 calls on a 20-timestep jump. PCM's rule (floor(N j / K)) spreads the points evenly (sizes differ by at most
one); the quality table's MCD-8 uses it (docs/design.md).
"""

import pytest
import torch

from cm_lightning.diffusion.grid import edge_jump_timesteps, segment_edges, solver_grid


def points_per_segment(grid: torch.Tensor, edges: torch.Tensor) -> list[int]:
    """How many grid points t (each a pair's t_hi) have their pair's boundary in each segment [e_i, e_{i+1})."""
    skip = int(grid[0]) + 1
    t_lo = (grid - skip).clamp(min=0)
    owner = (edges[None, :] <= t_lo[:, None]).sum(dim=1) - 1
    return torch.bincount(owner, minlength=len(edges)).tolist()


def test_icd_leaves_a_one_point_top_segment_at_k8_and_pcm_does_not():
    grid = solver_grid(1000, 50)
    icd = segment_edges(grid, 8, "icd")
    assert icd.tolist() == [0, 139, 279, 419, 559, 699, 839, 979]
    assert points_per_segment(grid, icd)[-1] == 1  # only t = 999
    pcm = segment_edges(grid, 8, "pcm")
    assert pcm.tolist() == [0, 119, 239, 359, 499, 619, 739, 859]
    assert points_per_segment(grid, pcm) == [6, 6, 6, 7, 6, 6, 6, 7]
    assert edge_jump_timesteps(pcm, 1000).tolist() == [999, 859, 739, 619, 499, 359, 239, 119]


@pytest.mark.parametrize("num_steps", [20, 25, 50])
def test_pcm_segments_are_balanced_for_every_k(num_steps):
    grid = solver_grid(1000, num_steps)
    for k in range(1, num_steps + 1):
        edges = segment_edges(grid, k, "pcm")
        sizes = points_per_segment(grid, edges)
        assert len(edges) == k and max(sizes) - min(sizes) <= 1 and sum(sizes) == num_steps, (k, sizes)
