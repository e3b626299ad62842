"""Mutation testing with a curated list: every plausible wrong formula must fail a named fast test.

``python tools/mutants.py [--out docs/mutants.md] [--jobs 2] [--only NAME ...]`` (``make mutants``): copies the
working tree's package, configs and tests into a temporary folder, checks that the named tests pass there, then
applies each mutant (one exact text replacement in one file) and runs the tests named to catch it (``pytest -x``,
the fast suite's marker). Prints the table mutant | file | caught by | result and exits non-zero if any mutant
survives, or if a mutant's text is not found exactly once (the code moved on: update the list).

Mutants are the field's known slips (guidance w vs g, square roots of alpha-bar, off-by-one grids, boundary
scalings, lora_alpha, CFG halves, the empty prompt) and the ones issue 15 found the suite blind to.
Not imported by the package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("cm_lightning", "conf", "tests", "pyproject.toml")

DIFF = "tests/unit/test_diffusion.py::"
STEPS = "tests/unit/test_method_steps.py::"
OPTIONS = "tests/unit/test_training_options.py::"
EXPORT = "tests/unit/test_export_grids.py::"
PARITY = "tests/integration/test_export_parity.py::"
COMPILE = "tests/unit/test_compile_blocks.py::"
FLAT = "tests/unit/test_flat_parameters.py::"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids in `make test` expected to fail on the mutant


MUTANTS = [
    # ---- the eight
    Mutant("LCM timestep_scaling 10 -> 1", "cm_lightning/diffusion/parameterization.py",
           "timestep_scaling: float = 10.0", "timestep_scaling: float = 1.0",
           (DIFF + "test_lcm_scalings_match_lcm_scheduler",)),
    Mutant("DDIM's last step with alpha-bar instead of its square root", "cm_lightning/diffusion/samplers.py",
           "    return abar.sqrt(), (1 - abar).sqrt()", "    return abar, (1 - abar).sqrt()",
           (DIFF + "test_sample_ddim_matches_ddim_scheduler",)),
    Mutant("lora_alpha dropped on export (no adapter metadata)", "cm_lightning/models/lora.py",
           "        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),\n", "",
           (PARITY + "test_cd_export_reproduces_our_multistep_sampler_with_lcm_scheduler",)),
    Mutant("teacher step lands on t_hi instead of t_lo", "cm_lightning/methods/cd.py",
           "guidance), t_lo, self.schedule)", "guidance), t_hi, self.schedule)",
           (STEPS + "test_teacher_step_is_ddim_scheduler_step_on_guided_teacher",)),
    Mutant("MCD boundary always 0", "cm_lightning/methods/mcd.py",
           "return boundary_of(t_lo, self.edges)", "return torch.zeros_like(t_lo)",
           (STEPS + "test_mcd_boundary_is_the_left_edge_of_the_pairs_segment",)),
    Mutant("exported scheduler without original_inference_steps", "cm_lightning/methods/sampler_table.py",
           'return {"original_inference_steps": options.get("num_solver_steps", 50)}',
           "return {}",
           (EXPORT + "test_cd_export_on_a_25_step_grid_reproduces_our_sampler_with_guidance",)),
    Mutant("guidance drawn as w (LCM's form) instead of g = w + 1", "cm_lightning/methods/cd.py",
           ".uniform_(self.guidance_min, self.guidance_max)", ".uniform_(self.guidance_min - 1, self.guidance_max - 1)",
           (STEPS + "test_drawn_guidance_is_diffusers_g_within_its_range",)),
    Mutant("CT's oracle x_lo noised at t_hi", "cm_lightning/methods/ct.py",
           "return self.schedule.add_noise(x0, noise, t_lo)", "return self.schedule.add_noise(x0, noise, t_hi)",
           (STEPS + "test_ct_previous_point_is_the_forward_process_at_t_lo_with_the_same_noise",)),
    # ---- the training step itself
    Mutant("x_hi noised at t_lo", "cm_lightning/methods/base.py",
           "x_hi = self.schedule.add_noise(x0, noise, t_hi)", "x_hi = self.schedule.add_noise(x0, noise, t_lo)",
           (STEPS + "test_training_step_loss_is_pseudo_huber_between_student_at_x_hi_and_target_at_x_lo",)),
    Mutant("boundary taken from t_hi (the student's segment, not the pair's)", "cm_lightning/methods/base.py",
           "boundary = self.boundary(t_lo)", "boundary = self.boundary(t_hi)",
           (STEPS + "test_training_step_loss_is_pseudo_huber_between_student_at_x_hi_and_target_at_x_lo",)),
    Mutant("target evaluated at t_hi", "cm_lightning/methods/base.py",
           "target = self.target(x_lo, t_lo, student_context, boundary)",
           "target = self.target(x_lo, t_hi, student_context, boundary)",
           (STEPS + "test_training_step_loss_is_pseudo_huber_between_student_at_x_hi_and_target_at_x_lo",)),
    # ---- guidance and the empty prompt
    Mutant("CFG halves swapped (cond first)", "cm_lightning/diffusion/denoiser.py",
           "uncond, cond = output.chunk(2)", "cond, uncond = output.chunk(2)",
           (STEPS + "test_teacher_step_is_ddim_scheduler_step_on_guided_teacher",
            DIFF + "test_guidance_runs_one_batched_pass_with_same_result")),
    Mutant("guidance formula in w form applied to g: c + g (c - u)", "cm_lightning/diffusion/parameterization.py",
           "return uncond + guidance_scale * (cond - uncond)", "return cond + guidance_scale * (cond - uncond)",
           (STEPS + "test_teacher_step_is_ddim_scheduler_step_on_guided_teacher",
            DIFF + "test_sample_ddim_matches_ddim_scheduler")),
    Mutant("teacher's unconditional half fed the caption, not the empty prompt", "cm_lightning/diffusion/denoiser.py",
           "torch.cat([null.to(context.dtype), context])", "torch.cat([context, context])",
           (STEPS + "test_teacher_step_is_ddim_scheduler_step_on_guided_teacher",)),
    Mutant("empty-prompt embedding replaced by zeros when sampling", "cm_lightning/pipeline.py",
           'self._null_context = self.encoders.encode_prompts([""]).to(self.device, self.dtype)',
           'self._null_context = torch.zeros_like(self.encoders.encode_prompts([""])).to(self.device, self.dtype)',
           (EXPORT + "test_cd_export_on_a_25_step_grid_reproduces_our_sampler_with_guidance",)),
    Mutant("empty-prompt embedding replaced by zeros in the latent cache", "cm_lightning/data/cache.py",
           'null = self.encoders.encode_prompts([""])[0].to("cpu", torch.float16).contiguous()',
           'null = torch.zeros_like(self.encoders.encode_prompts([""])[0]).to("cpu", torch.float16).contiguous()',
           ("tests/unit/test_cache.py::test_build_loads_everything_then_reuses_without_encoding",)),
    Mutant("unguided teacher (g = 1) but guidance drawn anyway", "cm_lightning/methods/cd.py",
           "return 1.0 if self.guidance_min == self.guidance_max == 1.0 else scale", "return scale",
           (STEPS + "test_unguided_teacher_step_is_the_conditional_teacher_alone",)),
    Mutant("teacher run with the student's adapters on", "cm_lightning/methods/base.py",
           "        with adapters_disabled(self.unet):\n            return Denoiser(",
           "        if True:\n            return Denoiser(",
           (STEPS + "test_teacher_step_is_ddim_scheduler_step_on_guided_teacher",)),
    Mutant("CT caption dropout inverted (drops 1 - p)", "cm_lightning/diffusion/parameterization.py",
           "device=context.device) < probability", "device=context.device) > probability",
           (STEPS + "test_ct_caption_dropout_swaps_in_the_empty_prompt",)),
    # ---- square roots of alpha-bar and the parameterizations
    Mutant("sigma_t = 1 - alpha-bar (square root dropped)", "cm_lightning/diffusion/schedule.py",
           "return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)",
           "return abar.sqrt().view(shape), (1 - abar).view(shape)",
           (DIFF + "test_split_prediction_matches_ddim_step",)),
    Mutant("x0_hat divided by alpha-bar instead of its square root", "cm_lightning/diffusion/parameterization.py",
           "return Prediction((x_t - s * output) / a, output)", "return Prediction((x_t - s * output) / a**2, output)",
           (DIFF + "test_split_prediction_matches_ddim_step",)),
    Mutant("v-prediction's x0 with the wrong sign", "cm_lightning/diffusion/parameterization.py",
           "return Prediction(a * x_t - s * output, a * output + s * x_t)",
           "return Prediction(a * x_t + s * output, a * output + s * x_t)",
           (DIFF + "test_split_prediction_matches_ddim_step",)),
    # ---- boundary scalings and consistency functions
    Mutant("LCM c_out with CM's sigma_data factor", "cm_lightning/diffusion/parameterization.py",
           "c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5", "c_out = sigma_data * scaled / (scaled**2 + sigma_data**2) ** 0.5",
           (DIFF + "test_lcm_scalings_match_lcm_scheduler",)),
    Mutant("LCM consistency with c_skip and c_out swapped", "cm_lightning/diffusion/parameterization.py",
           "return c_skip.view(shape).to(x_t.dtype) * x_t + c_out.view(shape).to(x_t.dtype) * pred.x0",
           "return c_skip.view(shape).to(x_t.dtype) * pred.x0 + c_out.view(shape).to(x_t.dtype) * x_t",
           (STEPS + "test_cd_consistency_and_target_use_lcm_scalings",)),
    Mutant("MCD consistency jumps to t itself, not the segment's edge", "cm_lightning/methods/mcd.py",
           "return edge_jump_consistency(pred, boundary, self.schedule)",
           "return edge_jump_consistency(pred, t, self.schedule)",
           (STEPS + "test_mcd_consistency_jumps_to_the_edge_and_target_is_x_lo_on_an_edge",)),
    Mutant("pseudo-Huber with c instead of c^2 under the root", "cm_lightning/diffusion/losses.py",
           "return (torch.sqrt(diff + c * c) - c)", "return (torch.sqrt(diff + c) - c)",
           (DIFF + "test_losses_are_per_sample",)),
    # ---- grids off by one
    Mutant("solver grid starts at 0 (0, 20, ..., 980)", "cm_lightning/diffusion/grid.py",
           "return torch.arange(1, num_steps + 1) * skip - 1", "return torch.arange(0, num_steps) * skip",
           (DIFF + "test_solver_grid_edges_and_timesteps",)),
    Mutant("training pair's neighbour one timestep off", "cm_lightning/diffusion/grid.py",
           "skip = int(grid[0]) + 1\n    if index_weights is None:", "skip = int(grid[0])\n    if index_weights is None:",
           (DIFF + "test_training_pairs_are_solver_neighbours",)),
    Mutant("iCD edges one grid point high", "cm_lightning/diffusion/grid.py",
           "inner = grid[torch.arange(interval, n, interval) - 1]", "inner = grid[torch.arange(interval, n, interval)]",
           (STEPS + "test_mcd_boundary_is_the_left_edge_of_the_pairs_segment",)),
    Mutant("a pair on an edge maps to the edge below (strict in training)", "cm_lightning/diffusion/grid.py",
           "else (edges[None, :] <= t[:, None])", "else (edges[None, :] < t[:, None])",
           (STEPS + "test_mcd_boundary_is_the_left_edge_of_the_pairs_segment",)),
    Mutant("LCM inference timesteps from linspace(0, N - 1, n)", "cm_lightning/diffusion/grid.py",
           "torch.linspace(0, reversed_grid.numel(), num_steps + 1)[:-1]",
           "torch.linspace(0, reversed_grid.numel() - 1, num_steps)",
           (DIFF + "test_lcm_timesteps_match_lcm_scheduler",)),
    Mutant("PCM edges at ceil(N j / K)", "cm_lightning/diffusion/grid.py",
           "[n * j // num_segments for j in range(1, num_segments)]",
           "[-(-n * j // num_segments) for j in range(1, num_segments)]",
           ("tests/unit/test_edge_rules.py::test_icd_leaves_a_one_point_top_segment_at_k8_and_pcm_does_not",)),
    Mutant("multistep sampler re-noises to the current t", "cm_lightning/diffusion/samplers.py",
           "next_t = torch.full_like(t_batch, steps[i + 1])", "next_t = t_batch",
           (DIFF + "test_sample_multistep_matches_lcm_scheduler",)),
    Mutant("MCD exported with LCMScheduler", "cm_lightning/methods/sampler_table.py",
           'scheduler="TCDScheduler", records=("num_solver_steps", "edges")',
           'scheduler="LCMScheduler", records=("num_solver_steps", "edges")',
           (PARITY + "test_mcd_export_reproduces_our_edge_jumps_with_tcd_scheduler",)),
    # ---- LoRA
    Mutant("lora_alpha ignored in training (scale 1)", "cm_lightning/models/lora.py",
           "        lora_alpha=alpha,", "        lora_alpha=rank,",
           ("tests/unit/test_lora_scale.py::test_every_adapted_layer_scales_by_alpha_over_rank",)),
    Mutant("LoRA A's gradient without the alpha / rank scale (rank-r backward, convolutions)", "cm_lightning/models/lora.py",
           "grad_a = torch.nn.grad.conv2d_weight(x, lora_a.shape, v, stride, padding, dilation) * scale",
           "grad_a = torch.nn.grad.conv2d_weight(x, lora_a.shape, v, stride, padding, dilation)",
           ("tests/unit/test_fast_paths.py::test_merged_lora_forward_gives_peft_outputs_and_gradients",)),
    Mutant("fused LoRA merge without the alpha / rank scale (lora_forward=merged_fused)", "cm_lightning/models/lora.py",
           "alpha=scale).reshape(weight.shape)", "alpha=1.0).reshape(weight.shape)",
           ("tests/unit/test_fast_paths.py::test_merged_lora_forward_gives_peft_outputs_and_gradients",)),
    # ---- checkpoints and the cache build (session 7)
    Mutant("last.ckpt never written after training (stale when training stopped between step checkpoints)",
           "cm_lightning/train.py", "    if not last_checkpoint_is_final(trainer, run_state, last):", "    if False:",
           ("tests/integration/test_train.py::test_last_checkpoint_is_the_final_step_written_once",)),
    Mutant("cache build: a crash drops the batch before it (and its finished shard)", "cm_lightning/data/cache.py",
           "                    if pending is not None:  # keep what was encoded: its shard is written if this batch "
           "was its last\n                        finish(*pending)\n", "",
           ("tests/unit/test_cache.py::test_interrupted_build_resumes_to_identical_contents",)),
    Mutant("cache build: the last batch never finished", "cm_lightning/data/cache.py",
           "            if pending is not None:\n                finish(*pending)\n        bound", "        bound",
           ("tests/unit/test_cache.py::test_build_loads_everything_then_reuses_without_encoding",)),
    Mutant("cache build leaves cuDNN's autotuner off", "cm_lightning/data/cache.py",
           "        torch.backends.cudnn.benchmark = autotune", "        torch.backends.cudnn.benchmark = False",
           ("tests/unit/test_cache.py::test_build_runs_without_cudnn_autotuner_and_restores_it",)),
    # ---- the compiled VAE encode of the cache build (session 8)
    Mutant("compiled encoder: a partial batch compiles again", "cm_lightning/models/encoders.py",
           "if self._compiled_encode is None or self._compiled_shape not in (None, pixels.shape):",
           "if self._compiled_encode is None:",
           ("tests/unit/test_fast_paths.py::test_compiled_image_encoder_encodes_what_the_eager_one_does",)),
    Mutant("compiled encoder: a failed compile fails the build", "cm_lightning/models/encoders.py",
           "        except Exception as error:  # e.g. no C compiler", "        except ImportError as error:  # e.g. no C compiler",
           ("tests/unit/test_fast_paths.py::test_a_failed_encoder_compile_leaves_the_eager_encode",)),
    Mutant("compile_image_encoder=auto ignores the resolution", "cm_lightning/data/cache.py",
           "pixels_in_512px_images = images * (resolution / 512) ** 2", "pixels_in_512px_images = images",
           ("tests/unit/test_cache.py::test_auto_compiles_the_image_encoder_for_large_builds_on_a_gpu",)),
    Mutant("compile_image_encoder=true never reaches the encoders", "cm_lightning/data/cache.py",
           "            self.encoders.compile_image_encoder()\n", "",
           ("tests/unit/test_cache.py::test_compile_image_encoder_compiles_once_before_the_first_batch",)),
    Mutant("compile_blocks=auto compiles a run one step short of its threshold", "cm_lightning/models/compilation.py",
           "max_steps >= AUTO_COMPILE_MIN_STEPS", "max_steps >= AUTO_COMPILE_MIN_STEPS - 1",
           (COMPILE + "test_compile_blocks_auto_compiles_long_gpu_runs_only",)),
    Mutant("channels_last=auto ignores the compile decision", "cm_lightning/methods/base.py",
           "(self.channels_last == \"auto\" and compiling)", "(self.channels_last == \"auto\")",
           (COMPILE + "test_setup_compiles_and_goes_channels_last_as_the_switches_say",)),
    Mutant("compiled blocks fall back to one symbolic-shape graph", "cm_lightning/models/compilation.py",
           "        block.compile(dynamic=False)", "        block.compile()",
           (COMPILE + "test_the_compiled_regions_are_whole_transformers_and_resnet_blocks_with_static_shapes",)),
    Mutant("a compiled run's sample grids compile every block again", "cm_lightning/methods/base.py",
           "        with eager_blocks():\n            return generate_latents(", "        if True:\n            return generate_latents(",
           (COMPILE + "test_a_runs_sampling_runs_its_blocks_eagerly",)),
    # ---- the LoRA weights in one flat buffer (method.flat_parameters)
    Mutant("flat layout leaves the layers' gradients to accumulate across steps", "cm_lightning/methods/latent_module.py",
           "            self._flat.zero_grad()  # the layers' own", "            pass  # the layers' own",
           (FLAT + "test_flat_training_equals_parameter_by_parameter_training_and_resumes_across_layouts",)),
    Mutant("an older checkpoint's AdamW moments zeroed when flattened", "cm_lightning/methods/optim.py",
           "merged[key] = torch.cat([entry[key].reshape(-1) for entry in per_param])",
           "merged[key] = torch.zeros(sum(numels))",
           (FLAT + "test_optimizer_state_converts_between_the_layouts",)),
    Mutant("accumulated gradients left as a graphed backward's reused output buffers", "cm_lightning/methods/latent_module.py",
           "        accumulating = self._trainer is not None and self.trainer.accumulate_grad_batches > 1",
           "        accumulating = False",
           (FLAT + "test_accumulated_gradients_survive_a_backward_that_reuses_its_output_buffers",)),
    Mutant("a nested adapters_disabled exit switches the adapters back on", "cm_lightning/models/lora.py",
           "            layer._disable_adapters = flag", "            layer._disable_adapters = False",
           ("tests/unit/test_lora.py::test_adapters_come_back_after_an_exception_and_nesting_keeps_them_off",)),
    # ---- options: EMA and curriculum
    Mutant("target EMA updated every micro-batch", "cm_lightning/methods/base.py",
           "if self.ema is not None and self.global_step != self._ema_step:", "if self.ema is not None:",
           (OPTIONS + "test_consistency_ema_updates_once_per_optimizer_step",)),
    Mutant("teacher EMA updated every micro-batch", "cm_lightning/shapes/teacher.py",
           "if self.global_step == self._ema_step:\n            return", "if False:\n            return",
           (OPTIONS + "test_teacher_ema_updates_once_per_optimizer_step",)),
    Mutant("EMA moves by decay instead of 1 - decay", "cm_lightning/methods/ema.py",
           "[p.detach() for p in self.params], 1.0 - decay)", "[p.detach() for p in self.params], decay)",
           (OPTIONS + "test_ema_moves_a_fraction_one_minus_decay_towards_the_weights",)),
    Mutant("EMA swap in place on the autograd-tracked weights", "cm_lightning/methods/ema.py",
           "            param.data.copy_(shadow)", "            param.detach().copy_(shadow)",
           (OPTIONS + "test_ema_target_trains_and_starts_as_the_student_target",)),
    Mutant("curriculum floors log2(end / start)", "cm_lightning/diffusion/grid.py",
           "while start * 2**doublings < end:", "while start * 2 ** (doublings + 1) <= end:",
           (OPTIONS + "test_curriculum_reaches_every_stage_and_its_end_in_equal_shares",)),
]


def copy_tree(destination: Path) -> None:
    """The working tree as it is (edited files included), minus caches: package, configs, tests, pyproject."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        else:
            shutil.copy2(source, destination / name)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "CM_LIGHTNING_CACHE": str(tree / ".cache"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else done.stderr.strip().splitlines()[-1:]


def apply(tree: Path, mutant: Mutant) -> str | None:
    """Write the mutated file into ``tree``; returns the original text, or None if ``old`` is not there once."""
    path = tree / mutant.path
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return None
    path.write_text(text.replace(mutant.old, mutant.new))
    return text


def check(tree: Path, mutant: Mutant) -> tuple[str, str]:
    original = apply(tree, mutant)
    if original is None:
        return "NOT APPLIED", "old text not found exactly once"
    try:
        code, summary = run_tests(tree, mutant.tests)
    finally:
        (tree / mutant.path).write_text(original)
    if code == 1:  # a test failed: caught
        return "caught", summary
    if code == 0:
        return "SURVIVED", summary
    return f"ERROR (pytest exit {code})", summary  # collection error, no test selected, ...


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (one tree copy each)")
    parser.add_argument("--only", nargs="*", help="only mutants whose name contains one of these")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or any(o in m.name for o in args.only)]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cm_mutants_") as scratch:
        trees = [Path(scratch) / f"tree{i}" for i in range(max(1, args.jobs))]
        for tree in trees:
            copy_tree(tree)
        named = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, summary = run_tests(trees[0], named)  # the unmutated code must pass every named test
        print(f"baseline ({len(named)} tests, unmutated): {summary}", flush=True)
        if code != 0:
            print("the named tests fail without any mutant: fix them first", file=sys.stderr)
            return 2
        free = list(trees)

        def job(mutant: Mutant) -> tuple[str, str]:
            tree = free.pop()
            try:
                result, summary = check(tree, mutant)
                print(f"  {mutant.name}: {result} ({summary})", flush=True)  # progress: the table comes at the end
                return result, summary
            finally:
                free.append(tree)

        with ThreadPoolExecutor(max_workers=len(trees)) as pool:
            results = list(pool.map(job, mutants))
    rows = ["| mutant | file | caught by | result |", "|---|---|---|---|"]
    for mutant, (result, summary) in zip(mutants, results):
        tests = "<br>".join(f"`{t.split('::')[0].removeprefix('tests/')}::{t.split('::')[1]}`" for t in mutant.tests)
        rows.append(f"| {mutant.name} | `{mutant.path.removeprefix('cm_lightning/')}` | {tests} | {result} ({summary}) |")
    survivors = sum(result != "caught" for result, _ in results)
    table = "\n".join(rows)
    footer = (f"\n{len(mutants) - survivors} of {len(mutants)} mutants caught by fast tests "
              f"({time.time() - started:.0f} s, {args.jobs} jobs).")
    print(table + footer)
    if args.out:
        import torch  # only for the header: the version the table was measured with

        command = " ".join(["python", "tools/mutants.py", *sys.argv[1:]])
        header = ("# Mutants: every wrong formula fails a fast test\n\n"
                  "Written by `make mutants` (`tools/mutants.py`): each row is one exact text replacement in the "
                  "package, and the fast tests (in `make test`) named to catch it; *caught* means they fail on the "
                  "mutant (and pass without it). The pytest summary of the mutated run is in brackets.\n\n"
                  f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
                  f"python {sys.version.split()[0]}, command `{command}`.\n\n")
        args.out.write_text(header + table + "\n" + footer.strip() + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
