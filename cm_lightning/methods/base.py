"""The training loop CT, CD and MCD share; each method fills in only where its maths differs.

One training step (docs/algorithms.md): draw a solver pair t_hi > t_lo and noise, make x_hi from the data,
make x_lo one solver step earlier (:meth:`previous_point`: the teacher's guided DDIM step, or CT's oracle),
and pull the student's consistency output at x_hi towards the stop-gradient target at x_lo. The consistency
function (:meth:`consistency`) and the boundary a pair maps to (:meth:`boundary`) are the other two seams.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch

from ..diffusion.denoiser import Denoiser
from ..diffusion.grid import sample_training_pairs, solver_grid
from ..diffusion.losses import make_loss
from ..diffusion.parameterization import Prediction
from ..diffusion.samplers import Conditioning
from ..diffusion.schedule import NoiseSchedule
from ..models.attention import check_sdpa_choice, prefer_sdpa
from ..errors import check_switch
from ..models.compilation import compile_unet_blocks, compiles_blocks, eager_blocks
from ..models.lora import LORA_FORWARDS, adapters_disabled, add_lora, cast_for_training, use_merged_lora_forward
from .ema import EmaWeights
from .latent_module import LatentTrainingModule
from .cuda_graphs import CudaGraphNetwork, GraphedStudent
from .sampling import SamplerKind, generate_latents, unet_network

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]

_HALF_DTYPES = {"16": torch.float16, "bf16": torch.bfloat16}
ROLES = ("student", "teacher", "target")  # the three ways a training step calls the UNet
# the attention kernel each role prefers (models/attention.py): torch's own order, the fastest training step
# measured on an H200 (benchmarks/speed.md, session 6: cuDNN first for teacher and target and flash for the student
# made the CD step 11 ms slower, though an eager calibration of the UNet alone had favoured them)
SDPA_BACKENDS = {"student": "default", "teacher": "default", "target": "default"}
# gradient_checkpointing='auto' switches it off on GPUs this large: SD1.5 at batch 8 trains in about 16 GiB without
# it (benchmarks/speed.md), and recomputing every block costs about a third of the step.
AUTO_CHECKPOINTING_GIB = 40


def outside_autocast(net: Callable) -> Callable:
    """``net`` run with autocast switched off: its inputs go in at the frozen weights' dtype (``unet_network``)."""

    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return net(x, t, context)

    return call


class ConsistencyModule(LatentTrainingModule):
    """Base LightningModule: a LoRA student on a frozen UNet, trained towards its own stop-gradient target.

    Args:
        unet: the diffusers UNet2DConditionModel (frozen weights; LoRA adapters are added here).
        schedule: the model's noise schedule (read from its scheduler config).
        lora: ``{rank, alpha, dropout, target_modules}`` for :func:`add_lora`.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        lr_scheduler: ``optimizer -> LRScheduler`` or None; stepped every optimizer step.
        num_solver_steps: N, the DDIM solver grid size (skip k = T // N).
        loss: 'pseudo_huber' (c = ``huber_c``), 'pseudo_huber_norm' (iCT) or 'l2'.
        target: 'student' (the student itself under no-grad, as LCM-LoRA) or 'ema' (an EMA of the LoRA weights).
        gradient_checkpointing: trade compute for memory in the UNet: True, False, or 'auto' (on unless the
            GPU has at least ``AUTO_CHECKPOINTING_GIB`` of memory; off on the CPU, where memory is not the limit).
        lora_forward: 'merged_fused' (each LoRA layer runs as one op on W' = W + scale B A, W' rebuilt by one GEMM
            in the weights' dtype: same function and gradients, about half the time of peft's at SD1.5 size; the
            backward takes A's and B's gradients through the rank-r factors), 'merged' (as 'merged_fused', W' from a
            float32 B A, a scale, a cast and an add: see ``use_merged_lora_forward``),
            'merged_dense_backward' (the same forward, autograd's full-size gradient of W' folded into A and B) or
            'peft' (peft's own unmerged forward).
        compile_blocks: ``torch.compile`` each transformer and ResNet block of the UNet (regional compilation:
            blocks of one shape share their compiled code, so compiling takes far less than the whole UNet): True,
            False, or 'auto' (on one GPU for runs of at least ``AUTO_COMPILE_MIN_STEPS`` planned steps whose UNet
            calls are CUDA graphs: the compile costs minutes before the first step, the step is ~18 % faster).
        cuda_graphs: on GPUs, replay the teacher, the target and the student's forward and backward from CUDA
            graphs (the eager UNet at SD1.5 size and batch 8 is bound by the host, not the GPU). Off under gradient
            checkpointing (memory first) and an EMA target; anywhere else it falls back to eager by itself.
        half_precision_roles: the UNet roles ('teacher', 'target', 'student') that run in the frozen weights' half
            dtype outside autocast under a mixed-precision trainer, as inference runs the UNet (the LoRA weights
            and their optimizer stay float32). Autocast upcasts every GroupNorm / LayerNorm to float32 and back:
            at SD1.5 size and batch 8 the CD step took 305 ms with every role under autocast and 244 ms with none
            (benchmarks/speed.md). Empty: every role under autocast.
        channels_last: the UNet's convolutions in channels-last memory format (cuDNN's tensor-core layout): True,
            False, or 'auto' (with compiled blocks only: eager channels-last loses its gain to GroupNorm's copies).
        sdpa_backends: the attention kernel each role tries first ('default' (torch's order), 'cudnn', 'flash',
            'efficient', 'math'; roles left out keep ``SDPA_BACKENDS``'s): a kernel that does not take a shape falls
            back to torch's next one.
        flat_parameters: the LoRA weights as views of one flat buffer, which the optimizer, the gradient clip and the
            non-finite guard handle as one tensor instead of 556 at SD1.5 size (their per-tensor host work holds up
            the graphed step); the same updates, and checkpoints of either layout resume in the other.
        sample_steps: default number of steps for this method's sampler.
    """

    sampler_kind: SamplerKind = "multistep"

    def __init__(
        self,
        unet: torch.nn.Module,
        schedule: NoiseSchedule,
        *,
        lora: dict,
        optimizer: OptimizerFactory,
        lr_scheduler: Callable | None = None,
        num_solver_steps: int = 50,
        loss: str = "pseudo_huber",
        huber_c: float | None = 0.001,
        target: str = "student",
        ema_decay: float = 0.95,
        gradient_checkpointing: bool | str = "auto",
        lora_forward: str = "merged_fused",
        compile_blocks: bool | str = "auto",
        cuda_graphs: bool = True,
        half_precision_roles: Sequence[str] = ROLES,
        channels_last: bool | str = "auto",
        sdpa_backends: dict | None = None,
        flat_parameters: bool = True,
        sample_steps: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["unet", "schedule", "optimizer", "lr_scheduler"])
        if target not in ("student", "ema"):
            raise ValueError(f"method.target={target!r} is not one of 'student', 'ema'")
        if lora_forward not in LORA_FORWARDS:
            raise ValueError(f"method.lora_forward={lora_forward!r} is not one of {', '.join(LORA_FORWARDS)}")
        self.unet = unet
        self.schedule = schedule
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.grid = solver_grid(schedule.num_train_timesteps, num_solver_steps)
        self.loss_fn = make_loss(loss, huber_c)
        self.num_trainable = add_lora(unet, **lora)
        # listed once: walking the UNet's ~2,000 modules for them costs milliseconds of host time every step
        self._trainable = [p for p in unet.parameters() if p.requires_grad]
        if lora_forward != "peft":
            use_merged_lora_forward(unet, low_rank_backward=lora_forward != "merged_dense_backward",
                                    fused_merge=lora_forward == "merged_fused")
        check_switch(compile_blocks, "method.compile_blocks")
        check_switch(channels_last, "method.channels_last")
        self.compile_blocks = compile_blocks
        self.cuda_graphs = cuda_graphs
        if not isinstance(flat_parameters, bool):
            raise ValueError(f"method.flat_parameters={flat_parameters!r} is not true or false")
        self.flat_parameters = flat_parameters
        unknown = set(half_precision_roles) - set(ROLES)
        if unknown:
            raise ValueError(f"method.half_precision_roles: {sorted(unknown)} not among {', '.join(ROLES)}")
        self.half_precision_roles = frozenset(half_precision_roles)
        self.channels_last = channels_last
        self.sdpa_backends = {**SDPA_BACKENDS, **(sdpa_backends or {})}
        for role, choice in self.sdpa_backends.items():
            if role not in ROLES:
                raise ValueError(f"method.sdpa_backends: {role!r} is not among {', '.join(ROLES)}")
            check_sdpa_choice(choice, f"method.sdpa_backends.{role}")
        self.networks: dict[str, Callable] = {}  # per role (student, teacher, target): graph-replayed UNet calls
        check_switch(gradient_checkpointing, "method.gradient_checkpointing")
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing is True:
            unet.enable_gradient_checkpointing()
        self.ema = EmaWeights(self.trainable_parameters(), ema_decay) if target == "ema" else None
        self._ema_step = 0  # the optimizer step the EMA last saw
        self.null_context: torch.Tensor | None = None  # the empty prompt's embedding, from the datamodule
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        self.step_profiler = None  # set by profiling.StepProfiler while it times a run

    def phase(self, name: str):
        """Marks a phase of the training step for the step profiler (a no-op unless one is attached)."""
        return nullcontext() if self.step_profiler is None else self.step_profiler.phase(name)

    # ------------------------------------------------------------------ the three seams of a method
    def previous_point(
        self, x0: torch.Tensor, noise: torch.Tensor, x_hi: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """x_lo, one solver step before x_hi (no grad): the teacher's guided DDIM step or CT's oracle."""
        raise NotImplementedError

    def consistency(self, x_t: torch.Tensor, t: torch.Tensor, pred: Prediction, boundary: torch.Tensor) -> torch.Tensor:
        """The consistency function f(x_t, t) given the network's prediction at x_t."""
        raise NotImplementedError

    def boundary(self, t_lo: torch.Tensor) -> torch.Tensor:
        """The boundary each pair maps to (0 for single-boundary CT/CD; the segment's left edge for MCD)."""
        return torch.zeros_like(t_lo)

    # ------------------------------------------------------------------ shared pieces
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._trainable

    def network(self, role: str) -> Callable:
        """The UNet as ``net(x_t, t, context)`` for ``role`` ('student', 'teacher', 'target'): a CUDA-graph replay
        when :meth:`on_fit_start` set one up, else the plain call (outside autocast for a half-precision role)."""
        if role in self.networks:
            return self.networks[role]
        net = prefer_sdpa(unet_network(self.unet), self.sdpa_backends[role])
        if role in self.half_precision_roles:
            return outside_autocast(net)
        return net

    def student(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, role: str = "student") -> Prediction:
        return Denoiser(self.network(role), self.schedule)(x_t, t, context)

    @torch.no_grad()
    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance_scale) -> Prediction:
        """The frozen base model (adapters switched off: no second copy of the weights), with CFG."""
        with adapters_disabled(self.unet):
            return Denoiser(self.network("teacher"), self.schedule)(
                x_t, t, context, guidance_scale=guidance_scale, null_context=self.null_context
            )

    def training_context(self, context: torch.Tensor) -> torch.Tensor:
        """The text context the student sees; CT overrides it to drop captions."""
        return context

    def pair_weights(self, t_hi: torch.Tensor, t_lo: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights, or None for uniform (iCT weighting in CT)."""
        return None

    def training_grid(self) -> torch.Tensor:
        """The solver grid at the current step (CT's curriculum changes it)."""
        return self.grid

    def pair_index_weights(self, grid: torch.Tensor) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def target(self, x_lo: torch.Tensor, t_lo: torch.Tensor, context: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
        """Stop-gradient target f(x_lo, t_lo); exactly x_lo where t_lo is already on the boundary."""

        def evaluate() -> torch.Tensor:
            return self.consistency(x_lo, t_lo, self.student(x_lo, t_lo, context, role="target"), boundary)

        if self.ema is not None:
            with self.ema.swapped():
                f = evaluate()
        else:
            f = evaluate()
        on_boundary = (t_lo == boundary).view(-1, *([1] * (x_lo.ndim - 1)))
        return torch.where(on_boundary, x_lo, f)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        super().setup(stage)  # the empty prompt's embedding
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        half = _HALF_DTYPES.get(precision.split("-")[0])
        if half is not None:  # frozen weights in the run's half dtype; LoRA stays float32 for the optimizer
            cast_for_training(self.unet, half)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if self.gradient_checkpointing == "auto" and self._trainer is not None:
            if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < AUTO_CHECKPOINTING_GIB * 2**30:
                self.unet.enable_gradient_checkpointing()
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        one_device = self._trainer is None or self.trainer.world_size == 1
        compiling = compiles_blocks(self.compile_blocks, device.type, max_steps, self.graphs_usable() and one_device)
        if self.channels_last is True or (self.channels_last == "auto" and compiling):
            self.unet.to(memory_format=torch.channels_last)
        if compiling:
            if self.compile_blocks == "auto":
                log.info("compiling the UNet's blocks (method.compile_blocks=auto: %d steps planned): the first step "
                         "compiles them, minutes on a cold Inductor cache; compile_blocks=false skips it", max_steps)
            compile_unet_blocks(self.unet)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # schedule and empty prompt to the device
        if self.ema is not None:
            self.ema.shadow = [s.to(self.device) for s in self.ema.shadow]
        self._ema_step = self.global_step  # the step the EMA last saw (a resumed run's, on resume)
        self.networks = self.graphed_networks()

    def graphs_usable(self) -> bool:
        """Whether the UNet calls can be replayed from CUDA graphs on a GPU (see ``cuda_graphs``)."""
        return self.cuda_graphs and self.ema is None and not self.unet.is_gradient_checkpointing

    def backward_reuses_buffers(self) -> bool:
        return isinstance(self.networks.get("student"), GraphedStudent)  # its backward is a graph's replay

    def graphed_networks(self) -> dict[str, Callable]:
        """CUDA-graph replays of the three UNet roles, where they are safe (see ``cuda_graphs``), else none."""
        # DDP is fine: its all-reduce hooks sit on the LoRA weights' gradient accumulators, which run after the
        # student's graphed backward returns the gradients (partial-network capture; no collective is captured)
        if not (self.device.type == "cuda" and self.graphs_usable()):
            return {}
        half = _HALF_DTYPES.get(str(self.trainer.precision).split("-")[0])

        def autocast_dtype(role: str) -> torch.dtype | None:  # None: captured outside autocast
            return None if role in self.half_precision_roles else half

        def replayed(role: str) -> CudaGraphNetwork:
            return CudaGraphNetwork(prefer_sdpa(unet_network(self.unet), self.sdpa_backends[role]), autocast_dtype(role))

        return {"teacher": replayed("teacher"), "target": replayed("target"),
                "student": GraphedStudent(self.unet, autocast_dtype("student"), self.sdpa_backends["student"])}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"].float()
        context = batch["text_embeds"].float()
        grid = self.training_grid().to(self.device)
        t_hi, t_lo = sample_training_pairs(grid, x0.shape[0], index_weights=self.pair_index_weights(grid))
        noise = torch.randn_like(x0)
        x_hi = self.schedule.add_noise(x0, noise, t_hi)
        boundary = self.boundary(t_lo)
        with self.phase("teacher"):
            x_lo = self.previous_point(x0, noise, x_hi, t_hi, t_lo, context)
        student_context = self.training_context(context)
        with self.phase("student_forward"):
            pred = self.consistency(x_hi, t_hi, self.student(x_hi, t_hi, student_context), boundary)
        with self.phase("target"):
            target = self.target(x_lo, t_lo, student_context, boundary)
        per_sample = self.loss_fn(pred, target)
        weights = self.pair_weights(t_hi, t_lo)
        loss = per_sample.mean() if weights is None else (per_sample * weights).sum() / weights.sum()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # once per optimizer step: under accumulate_grad_batches=k this hook runs k times per step
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep the LoRA weights only: the frozen UNet is reloaded from the model, not stored 860 M times over.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.ema is not None:
            checkpoint["ema"] = [s.cpu() for s in self.ema.state_dict()]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # the optimizer state in this run's layout (flat or not)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    # ------------------------------------------------------------------ sampling
    def sampler_options(self) -> dict:
        """Options of this method's sampler (the sampler table's names): the solver grid size; MCD adds its edges."""
        return {"num_solver_steps": int(self.grid.numel())}

    def default_sample_steps(self) -> int:
        return self.hparams.sample_steps

    @torch.no_grad()
    def sample_latents(
        self, noise: torch.Tensor, context: torch.Tensor, *, steps: int | None = None, guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample with this method's own sampler (CT/CD multistep, MCD edge jumps) from ``noise``."""
        cond = Conditioning(context, self.null_context, guidance_scale)
        with eager_blocks():
            return generate_latents(
                self.unet, self.schedule, self.sampler_kind, noise, cond, steps=steps or self.default_sample_steps(),
                generator=generator, **self.sampler_options(),
            )

    @contextmanager
    def weights_for_export(self) -> Iterator[None]:
        """The LoRA weights to export: the EMA values when the target is an EMA (its averaged student), else as is."""
        if self.ema is None:
            yield
        else:
            with self.ema.swapped():
                yield
