"""Pipeline parallelism: the model's layers split into consecutive stages, one per process, on
`torch.distributed.pipelining`.

    processes = data_parallel x pipeline stages         (rank = dp_rank * pp + stage)
    first stage      embeddings and its share of the transformer blocks
    middle stages    their share of the blocks
    last stage       its share of the blocks; the head and the loss run in the schedule's loss function

Each micro-batch of the loop (per_device_train_batch_size sequences) is cut into
`training.pipeline_micro_batches` pieces that flow through the stages under the 1F1B (or GPipe)
schedule. The loss of a piece is its sum over the item count of the whole optimizer step (every
piece, micro-batch and data-parallel group; `scale_grads=False`), so the gradients are the unsplit
run's, not a mean of per-piece means. The head (final norm, vocabulary projection) belongs to the last
stage but runs in the loss function, so that MLM projects only the masked positions, as one process
does (the positions are the target's: the schedule first runs each stage on made-up activations to
learn their shapes, and the target is the one real tensor then). A weight used on two stages (word embeddings tied to the
decoder) lives on both; its gradients are summed over those stages before the step, so the copies
take the same step and stay tied. Each process keeps only its stage's weights (the others are
released to the meta device) and builds its optimizer over them.

Checkpoints hold one file per stage (its weights and optimizer state), so a run resumes under the
same layout; the final folder is gathered into an ordinary full-size `save_pretrained` folder.
What an objective's model looks like in stages is the objective's to say (`Objective.pipeline_split`
returns a `Split`); objectives that return none are refused before training.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from toolkit.engine.parallel import Layout
from toolkit.errors import ToolkitError

SHARDS_DIR = "pipeline_stages"  # inside a checkpoint: stage-<i>.pt, each stage's weights and optimizer state
SCHEDULES = ("1f1b", "gpipe")


@dataclass
class Split:
    """An objective's model cut into stages. Activations travel between stages as a tuple
    `(hidden, *extras)`: the extras (an attention mask) pass through the blocks untouched."""

    blocks: nn.ModuleList  # the transformer blocks, divided among the stages in order
    first: list[nn.Module]  # run by the first stage before its blocks (embeddings)
    last: list[nn.Module]  # the last stage's, run by `loss` after its blocks (final norm, head)
    inputs: Callable[[dict], tuple[tuple, torch.Tensor]]  # batch -> (first stage's tensors, the loss's target)
    embed: Callable[..., tuple]  # first stage: its tensors -> (hidden, *extras)
    block_kwargs: Callable[..., dict]  # (hidden, *extras) -> keyword arguments of every block (the mask)
    loss: Callable[[torch.Tensor, torch.Tensor], tuple[dict, dict]]  # (last hidden, target) -> summed losses, stats


def micro_batches(t) -> int:
    """Pieces each micro-batch is cut into: training.pipeline_micro_batches, or (unset) the largest number
    up to 4 x the stages that divides per_device_train_batch_size."""
    if t.pipeline_micro_batches is not None:
        return t.pipeline_micro_batches
    return max(d for d in range(1, 4 * t.pipeline_parallel_size + 1) if t.per_device_train_batch_size % d == 0)


def check_training(t) -> None:
    """Rules on the training section alone (called by TrainingArgs.validate)."""
    pp = t.pipeline_parallel_size
    if pp < 1:
        raise ToolkitError(f"training.pipeline_parallel_size must be at least 1 (got {pp})")
    if t.pipeline_schedule not in SCHEDULES:
        raise ToolkitError(f"training.pipeline_schedule='{t.pipeline_schedule}' is not one of {', '.join(SCHEDULES)}")
    if t.pipeline_micro_batches is not None and t.pipeline_micro_batches < 1:
        raise ToolkitError(f"training.pipeline_micro_batches must be at least 1 (got {t.pipeline_micro_batches})")
    if pp == 1:
        return
    key = f"training.pipeline_parallel_size={pp}"
    if t.tensor_parallel_size > 1:
        raise ToolkitError(
            f"{key} cannot be combined with training.tensor_parallel_size={t.tensor_parallel_size}: set one of them to 1"
        )
    for name, bad, fix in (
        ("training.mixed_precision=fp16", t.mixed_precision == "fp16", "use bf16 or no"),
        ("training.torch_compile", t.torch_compile, "set training.torch_compile=false"),
    ):
        if bad:
            raise ToolkitError(f"{key} cannot be combined with {name}: {fix}")
    n, batch = micro_batches(t), t.per_device_train_batch_size
    if batch % n:
        raise ToolkitError(
            f"training.pipeline_micro_batches={n} does not divide training.per_device_train_batch_size={batch}: "
            "choose a number of pieces that divides the micro-batch"
        )
    if t.pipeline_schedule == "1f1b" and n < pp:
        raise ToolkitError(
            f"the 1f1b schedule needs at least as many pieces as stages, and the micro-batch is cut into {n} for "
            f"{pp} stages: set training.pipeline_micro_batches to at least {pp} (raising per_device_train_batch_size "
            "if needed) or training.pipeline_schedule=gpipe"
        )


def check_layout(t, world: int, engine: str) -> None:
    """A pipeline the launch can hold, under an engine it combines with (called when the accelerator is made)."""
    pp = t.pipeline_parallel_size
    if pp == 1:
        return
    if engine not in ("single", "ddp"):
        raise ToolkitError(
            f"training.pipeline_parallel_size={pp} cannot be combined with {engine}: launch plain processes "
            "(recipes/accelerate/multi-cpu.yaml or multi-gpu.yaml) or set training.pipeline_parallel_size=1"
        )
    if world % pp:
        raise ToolkitError(
            f"training.pipeline_parallel_size={pp} does not divide the {world} launched process(es): launch a "
            f"multiple of {pp} processes (--num_processes {pp}, {2 * pp}, ...) or change the size"
        )


def check_stages(blocks: int, pp: int, name: str = "the model") -> None:
    if pp > blocks:
        raise ToolkitError(
            f"training.pipeline_parallel_size={pp} asks for more stages than {name}'s {blocks} layers: use at most "
            f"{blocks} stages"
        )


def bounds(blocks: int, pp: int, stage: int) -> tuple[int, int]:
    """The blocks [lo, hi) of a stage: an even share, the first `blocks % pp` stages one more."""
    share, extra = divmod(blocks, pp)
    lo = stage * share + min(stage, extra)
    return lo, lo + share + (stage < extra)


class Stage(nn.Module):
    """One stage's modules and its forward: (hidden, *extras) in, (hidden, *extras) out (the last stage: hidden)."""

    def __init__(self, split: Split, index: int, count: int):
        super().__init__()
        self.split, self.is_first, self.is_last = split, index == 0, index == count - 1
        lo, hi = bounds(len(split.blocks), count, index)
        self.blocks = nn.ModuleList(split.blocks[lo:hi])
        self.first = nn.ModuleList(split.first if self.is_first else [])
        self.last = nn.ModuleList(split.last if self.is_last else [])
        self.span = (lo, hi)

    def forward(self, *activations):
        if self.is_first:
            activations = self.split.embed(*activations)
        hidden, *extras = activations
        kwargs = self.split.block_kwargs(hidden, *extras)  # once per stage, not per block
        for block in self.blocks:
            hidden = block(hidden, **kwargs)
        return hidden if self.is_last else (hidden, *extras)


def unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class Pipeline(nn.Module):
    """This process's stage of the objective, and the schedules that run it.

    Called like the objective (`pipe(batch) -> (losses, stats)`, forward only) for evaluation; `step`
    runs the forward and backward of a training micro-batch. Both return the whole micro-batch's summed
    losses and statistics on every stage (the last stage computes them and shares them)."""

    def __init__(self, objective, layout: Layout, t, accelerator):
        super().__init__()
        import torch.distributed as dist

        split = objective.pipeline_split()
        if split is None:
            raise ToolkitError(
                f"training.pipeline_parallel_size={layout.pp}: objective '{objective.name}' cannot split its model "
                f"({getattr(objective.model.config, 'model_type', 'unknown type')}) into stages (mlm splits bert, "
                "clm splits gpt2): set training.pipeline_parallel_size=1"
            )
        check_stages(len(split.blocks), layout.pp)
        self.objective_ref = [objective]  # a list: not a sub-module (the stage alone is this module's)
        self.split, self.layout, self.index = split, layout, layout.rank % layout.pp
        self.pieces, self.schedule_name = micro_batches(t), t.pipeline_schedule
        self.weights = dict(objective.loss_weights)
        self.device = accelerator.device
        self.pp_group = layout.mesh.get_group("pp")
        self.stage = Stage(split, self.index, layout.pp)
        # which stages hold each parameter: a tied weight (embeddings / decoder) is held by two
        holders: dict[int, list[int]] = {}
        for s in range(layout.pp):
            for p in unique(Stage(split, s, layout.pp).parameters()):
                holders.setdefault(id(p), []).append(s)
        named = dict(objective.named_parameters())
        stray = [n for n, p in named.items() if id(p) not in holders]
        if stray:  # a Split that forgot a module: its weights would be lost from the saved model
            raise RuntimeError(f"pipeline parallelism: no stage holds the parameters {', '.join(stray[:3])}")
        mine = {id(p) for p in self.stage.parameters()}
        self.names = {id(p): n for n, p in named.items() if id(p) in mine}
        self.counted = {i for i in mine if holders[i][0] == self.index}  # a tied weight's norm counts once
        # one process group per set of stages sharing weights, per data-parallel copy (every process creates each)
        self.ties = []
        for shared in sorted({tuple(h) for h in holders.values() if len(h) > 1}):
            params = [p for p in self.stage.parameters() if holders[id(p)] == list(shared)]
            for d in range(layout.dp):
                group = dist.new_group([d * layout.pp + s for s in shared])
                if d == layout.dp_rank and self.index in shared:
                    self.ties.append((group, unique(params)))
        # the other stages' weights leave this process (shapes stay for counting FLOPs)
        for p in unique(objective.parameters()):
            if id(p) not in mine:
                torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device="meta")))
        self.stage.to(self.device)
        # mixed precision: the stage and the head (which runs in the loss function) under autocast
        self.autocast = accelerator.autocast if accelerator.mixed_precision != "no" else contextlib.nullcontext
        if accelerator.mixed_precision != "no":
            self.stage.forward = accelerator.autocast()(self.stage.forward)
        self.runners: dict = {}
        self.tally: list = []
        self.norm: dict[str, float] = {}
        self.scale = 1.0

    def describe(self) -> str:
        spans = [bounds(len(self.split.blocks), self.layout.pp, s) for s in range(self.layout.pp)]
        return (
            f"pipeline parallel {self.layout.pp} stages x data parallel {self.layout.dp} ({self.schedule_name}, "
            f"{self.pieces} micro-batches per batch; layers per stage {' + '.join(str(hi - lo) for lo, hi in spans)})"
        )

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """The objective's parameter groups, restricted to this stage's weights."""
        groups = self.objective_ref[0].optimizer_groups(weight_decay)
        return [{**g, "params": [p for p in g["params"] if id(p) in self.names]} for g in groups]

    # ---- running the schedule --------------------------------------------------------------------
    def loss_fn(self, hidden, target):
        """A piece's head and loss: its sums over the whole step's counts (pieces add up to the unsplit loss)."""
        with self.autocast():
            losses, stats = self.split.loss(hidden, target)
        self.tally.append(({k: v.detach() for k, v in losses.items()}, {k: v.detach() for k, v in stats.items()}))
        return sum(self.weights[k] * losses[k] / self.norm[k] for k in losses) * self.scale

    def runner(self, args: tuple, train: bool):
        """The schedule for this shape of input (built once per shape: a stage fixes its buffers' shapes)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        key = (train, tuple(tuple(a.shape) for a in args))
        if key not in self.runners:
            stage = PipelineStage(self.stage, self.index, self.layout.pp, self.device, group=self.pp_group)
            if train:
                schedule = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
                self.runners[key] = schedule(stage, self.pieces, loss_fn=self.loss_fn, scale_grads=False)
            else:  # evaluation batches vary in size (the last one): forward only, whole
                self.runners[key] = ScheduleGPipe(stage, 1, loss_fn=self.loss_fn)
        return self.runners[key]

    def run(self, batch: dict, train: bool) -> tuple[dict, dict]:
        args, target = self.split.inputs(batch)
        # every stage cuts the batch the same way: the first feeds the inputs, the last the target
        schedule = self.runner(args, train)
        self.tally = []
        call = functools.partial(schedule.step, return_outputs=False) if train else schedule.eval
        if self.stage.is_first:
            call(*args)
        elif self.stage.is_last:
            call(target=target)
        else:
            call()
        return self.share(self.pieces if train else 1)

    def share(self, pieces: int) -> tuple[dict, dict]:
        """The micro-batch's summed losses and statistics, from the last stage to every stage.
        (The schedule also calls the loss once on its first step, to learn the shapes: the last
        `pieces` calls are the real ones.)"""
        import torch.distributed as dist

        found = None
        if self.stage.is_last:
            found = ({}, {})
            for piece in self.tally[-pieces:]:
                for total, values in zip(found, piece):
                    for k, v in values.items():
                        total[k] = total.get(k, 0) + v.cpu()
        box = [found]
        dist.broadcast_object_list(box, group=self.pp_group, group_src=self.layout.pp - 1, device=self.device)
        losses, stats = box[0]
        return {k: v.to(self.device) for k, v in losses.items()}, {k: v.to(self.device) for k, v in stats.items()}

    def forward(self, batch: dict) -> tuple[dict, dict]:
        self.norm, self.scale = dict.fromkeys(self.weights, 1.0), 1.0
        return self.run(batch, train=False)

    def step(self, batch: dict, counts: dict[str, float], scale: float) -> tuple[dict, dict]:
        """Forward and backward of one micro-batch; gradients accumulate as under `loss.backward()` of
        `scale x sum_k w_k loss_sum_k / counts_k` (scale: the data-parallel copies, which are averaged)."""
        self.norm, self.scale = counts, scale
        return self.run(batch, train=True)

    # ---- the optimizer step ----------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Tied copies: the sum of their stages' gradients. Data-parallel copies: the average."""
        import torch.distributed as dist

        for group, params in self.ties:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if self.layout.dp > 1:
            grads = [p.grad for p in unique(self.stage.parameters()) if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.layout.mesh.get_group("dp"))
            flat /= self.layout.dp
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: each stage's squares summed over the stages,
        a tied weight counted on one of them."""
        import torch.distributed as dist

        params = [p for p in unique(parameters) if p.grad is not None]
        counted = [p.grad for p in params if id(p) in self.counted]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        if counted:
            squares = squares + torch.nn.utils.get_total_norm(counted).double() ** 2
        dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt().float()
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # ---- checkpoints -----------------------------------------------------------------------------
    def state(self, optimizer) -> dict:
        return {
            "model": {self.names[id(p)]: p.detach().cpu() for p in unique(self.stage.parameters())},
            "optimizer": optimizer.state_dict(),
        }

    def save(self, optimizer, folder: Path) -> None:
        """This stage's weights and optimizer state (the first data-parallel copy writes; collective)."""
        if self.layout.dp_rank == 0:
            out = Path(folder) / SHARDS_DIR
            out.mkdir(parents=True, exist_ok=True)
            torch.save(self.state(optimizer), out / f"stage-{self.index}.pt")

    def load(self, optimizer, folder: Path) -> None:
        path = Path(folder) / SHARDS_DIR / f"stage-{self.index}.pt"
        if not path.is_file():
            raise ToolkitError(
                f"cannot resume from '{folder}': it holds no pipeline stage {self.index} ({SHARDS_DIR}/{path.name}); "
                "it was written with training.pipeline_parallel_size=1: resume with that, or start a new output_dir"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        params = {n: p for n, p in self.objective_ref[0].named_parameters() if id(p) in self.names}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved["model"][name])
        optimizer.load_state_dict(saved["optimizer"])


def full_state_dict(objective: nn.Module, layout: Layout) -> dict:
    """The full-size state dict, from every stage's weights (collective; every process gets it). The names
    of a tied weight map to one tensor again (save_pretrained writes it once)."""
    import torch.distributed as dist

    local = {n: v.detach().cpu().clone() for n, v in objective.state_dict().items() if v.device.type != "meta"}
    parts: list = [None] * layout.pp
    dist.all_gather_object(parts, local, group=layout.mesh.get_group("pp"))
    out: dict = {}
    for part in parts:
        for name, value in part.items():
            out.setdefault(name, value)
    ids: dict[int, str] = {}
    for name, p in objective.state_dict(keep_vars=True).items():
        if name not in out:
            raise RuntimeError(f"pipeline parallelism: no stage returned {name}")
        if id(p) in ids:
            out[name] = out[ids[id(p)]]
        else:
            ids[id(p)] = name
    return out
