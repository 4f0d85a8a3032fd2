"""The training loop, shared by every objective.

    for each optimizer step:
        fetch gradient_accumulation_steps micro-batches and count their loss items on all processes
        forward/backward each (DDP syncs on the last), loss = sum_k w_k * loss_sum_k / global_count_k
        clip, optimizer step, schedule step (both skipped on a nan/inf loss or an fp16 overflow)
        log / evaluate / checkpoint when due

Normalising by the *global* item count of the whole step (not a mean per micro-batch) makes one
process with batch 2b, one with batch b and 2 accumulation steps, and two processes with batch b
compute the same loss and gradients. The data position is a pure function of the step, so a resume
continues exactly where the checkpoint was taken. The same loop runs under every launch (one process,
DDP, DeepSpeed ZeRO 1-3, FSDP): `engine.distributed` checks the launch and fills DeepSpeed's config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.data.loader import GlobalBatchSampler, ShardSampler, make_loader
from toolkit.engine import checkpoint, distributed, flops, parallel, pipeline
from toolkit.engine.memory import enable_gradient_checkpointing
from toolkit.engine.optim import innermost_optimizer, make_optimizer, make_scheduler, optimizer_name
from toolkit.engine.precision import SkippedSteps, upcast_trainable_params
from toolkit.engine.tracking import MetricsLog
from toolkit.errors import ToolkitError
from toolkit.objectives.base import Objective


@dataclass
class Job:
    """Everything one training run needs, whatever the objective."""

    objective: torch.nn.Module  # an toolkit.objectives.Objective
    tokenizer: object
    train_data: object  # datasets.Dataset of packed blocks
    eval_data: object | None
    training: object  # TrainingArgs
    output_dir: Path
    write_extras: Callable[[Path], None] = lambda folder: None  # recipe + tokenizer beside checkpoints
    tracker_config: dict = field(default_factory=dict)
    name: str = "pretrain"  # progress bar and tracker run name


def reset_accelerate_state() -> None:
    """Accelerate keeps one global state per process, but the Python API may run several jobs in
    one process (a comparison of fine-tuning modes, say), each with its own precision and
    accumulation. Clear it before each job; the process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def make_accelerator(t, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ToolkitError("training.mixed_precision=fp16 needs a CUDA GPU: use bf16 or no on this machine")
    distributed.check_deepspeed_file()
    reset_accelerate_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=[r for r in t.report_to] or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        # several processes on CPU talk over gloo (DeepSpeed under accelerate needs to be told so)
        **distributed.accelerator_kwargs(),
    )
    distributed.check_launch(accelerator)  # N processes asked, N joined; FSDP/DeepSpeed asked, got
    distributed.fill_deepspeed(accelerator, t)  # a DeepSpeed file contradicting the recipe stops here
    # tensor or pipeline parallelism: a dp x tp or dp x pp mesh over the launched processes (checked here)
    pipeline.check_layout(t, accelerator.num_processes, distributed.engine_name(accelerator))
    accelerator.toolkit_layout = parallel.make_layout(accelerator, t, distributed.engine_name(accelerator))
    distributed.honor_zero3_init_flag(accelerator)
    return accelerator


def total_steps(t, batches_per_epoch: int) -> int:
    if t.max_steps > 0:
        return t.max_steps
    if t.num_train_epochs == 0:  # an evaluation-only run (zero-shot); the recipe class allows it or not
        return 0
    return max(1, math.ceil(t.num_train_epochs * batches_per_epoch / t.gradient_accumulation_steps))


def budget_steps(job: Job, accelerator, sampler, loader, collator) -> int:
    """Optimizer steps that training.max_flops buys, for the schedule and the progress bar: the
    budget over the mean FLOPs of the first steps (at most 8; their micro-batches are collated and
    counted on every process, nothing runs). The run itself stops when the budget is spent, so a
    schedule sized from steps that differ from the rest (examples of varying length) ends a little
    before or after it; with fixed-length blocks the two meet within a step."""
    accum = job.training.gradient_accumulation_steps
    probe = MicroBatches(sampler, loader, collator, start=0)
    steps = min(8, len(sampler) // accum)
    local = torch.tensor(
        sum(job.objective.flops(next(probe)) for _ in range(steps * accum)) / steps, dtype=torch.float64
    )
    return flops.schedule_steps(job.training.max_flops, reduce_totals(accelerator, {"flops": local})["flops"])


class MicroBatches:
    """Endless stream of this process's micro-batches, starting at any position (for resume)."""

    def __init__(self, sampler: GlobalBatchSampler, loader, collator, start: int):
        self.sampler, self.loader, self.collator = sampler, loader, collator
        self.dataset = loader.dataset
        self.epoch, self.offset = divmod(start, len(sampler))
        self.iterator = None

    def __next__(self):
        if self.iterator is None:
            self.sampler.set_epoch(self.epoch, start=self.offset)
            self.collator.epoch = self.epoch
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch, self.offset, self.iterator = self.epoch + 1, 0, None
            return next(self)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


_FLOPS = "\0flops"  # the step's FLOPs beside the loss counts in one reduction (no loss has this name)


def reduce_totals(accelerator, totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum a dict of scalar tensors over processes in one collective (each batch counted once: the
    processes of a tensor-parallel group compute the same sums)."""
    if not totals:
        return {}
    keys = sorted(totals)
    packed = torch.stack([totals[k].detach().double().reshape(()) for k in keys]).to(accelerator.device)
    packed = accelerator.reduce(packed, reduction="sum") / parallel.layout_of(accelerator).copies
    return dict(zip(keys, packed.tolist()))


def any_process(accelerator, flag: torch.Tensor) -> bool:
    """Whether `flag` is true on at least one process (one small collective)."""
    return bool(accelerator.reduce(flag.detach().float().reshape(1), reduction="sum").item() > 0)


def add_into(totals: dict, prefix: str, values: dict) -> None:
    for k, v in values.items():
        key = f"{prefix}{k}"
        v = v.detach().double().reshape(())
        totals[key] = totals[key] + v if key in totals else v


@torch.no_grad()
def evaluate(model, objective, loader, accelerator, examples_out: dict | None = None) -> dict[str, float]:
    """Metrics over a loader. Sums (losses, counts, stats) are reduced over processes; entries of the
    objective's stats named `example/<key>` are per-example tensors (predictions, labels) that are
    gathered from every process in dataset order for metrics that need all of them (F1, correlations);
    pass `examples_out` to receive them."""
    was_training = model.training
    model.eval()
    totals: dict = {}
    examples: dict[str, list] = {}
    for batch in loader:
        batch = to_device(batch, accelerator.device)
        losses, stats = model(batch)
        per_example = {k[len("example/") :]: stats.pop(k) for k in [k for k in stats if k.startswith("example/")]}
        if per_example:
            per_example["idx"] = batch["idx"]
            for k, v in per_example.items():
                examples.setdefault(k, []).append(v.detach())
        add_into(totals, "loss/", losses)
        add_into(totals, "count/", objective.counts(batch))
        add_into(totals, "", stats)
    model.train(was_training)
    metrics = objective.metrics(reduce_totals(accelerator, totals))
    if examples:
        gathered = gather_examples(accelerator, examples)
        metrics.update(objective.example_metrics(gathered))
        if examples_out is not None:
            examples_out.update(gathered)
    return metrics


def gather_examples(accelerator, parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-example tensors from every process, in dataset order (`idx`), each example once.
    The evaluation shards differ in length by up to one batch, so each process pads to the longest
    before the all-gather and the padding is cut off again from the known lengths."""
    local = {k: torch.cat(v) for k, v in parts.items()}
    if accelerator.num_processes > 1:
        sizes = accelerator.gather(torch.tensor([len(local["idx"])], device=accelerator.device)).tolist()
        padded = accelerator.pad_across_processes({k: v.to(accelerator.device) for k, v in local.items()}, dim=0)
        full = accelerator.gather(padded)
        longest = max(sizes)
        copies = parallel.layout_of(accelerator).copies  # one process per tensor-parallel group
        keep = torch.cat([torch.arange(r * longest, r * longest + n) for r, n in enumerate(sizes) if r % copies == 0])
        local = {k: v[keep.to(v.device)] for k, v in full.items()}
    order = local["idx"].argsort()
    return {k: v[order].cpu() for k, v in local.items()}


def eval_loader(job: Job, accelerator, seed: int, max_batches: int | None = None):
    """This process's share of the evaluation set; `max_batches` (of per_device_eval_batch_size) caps the
    *global* set before it is split, so the figures do not depend on the number of processes."""
    if job.eval_data is None:
        return None
    collator = job.objective.make_collator(job.tokenizer, seed, salt="eval")
    dataset = job.objective.make_dataset(job.eval_data, split="eval")
    layout = parallel.layout_of(accelerator)  # tensor-parallel groups share one shard of the data
    batch, world = job.training.per_device_eval_batch_size, layout.dp
    limit = None if max_batches is None else max_batches * batch
    size = len(dataset) if limit is None else min(len(dataset), limit)
    if size < world:  # a process with nothing to evaluate would leave the others waiting in the reduce
        raise ToolkitError(
            f"the evaluation set has {size} examples, fewer than the {world} processes that share it: "
            "raise training.max_eval_batches or add validation data"
        )
    sampler = ShardSampler(len(dataset), batch, world, layout.dp_rank, limit=limit)
    return make_loader(dataset, sampler, collator)


def resumed_history(state: dict, output_dir: Path) -> dict:
    """What a resumed run knows of its past: the initial evaluation (from the checkpoint, or the step-0
    line of metrics.jsonl for checkpoints written before it was kept there) and the last training
    metrics logged up to the checkpoint (a run recovered at its final step trains no more)."""
    from toolkit.engine.tracking import read_metrics

    logged = [m for m in read_metrics(output_dir) if m.get("step", 0) <= state["step"]]
    past: dict = {}
    initial = state.get("initial_eval") or {
        k[len("eval_") :]: v for m in logged if m["step"] == 0 for k, v in m.items() if k.startswith("eval_")
    }
    if initial:
        past["initial"] = initial
    trained = [m for m in logged if "loss" in m and m["step"] > 0]
    if trained:
        past["train"] = {k: v for k, v in trained[-1].items() if k != "step"}
    return past


def train(job: Job, accelerator, resume: Path | None = None):
    t, objective = job.training, job.objective
    layout = parallel.layout_of(accelerator)
    world, rank = layout.dp, layout.dp_rank  # data-parallel groups read different batches
    tensor_parallel, pipelined = layout.tp > 1, layout.pp > 1
    accum = t.gradient_accumulation_steps
    main = accelerator.is_main_process

    # ---- data: global batches sliced per process, masking seeded per example -------------------
    streamed = getattr(job.train_data, "streaming", False)  # read on the fly: toolkit.data.streaming
    if streamed:
        dataset = job.train_data.open(world, rank)
    else:
        dataset = objective.make_dataset(job.train_data, split="train")
        lengths = dataset.lengths() if t.group_by_length and hasattr(dataset, "lengths") else None
        sampler = GlobalBatchSampler(len(dataset), t.per_device_train_batch_size, world, rank, t.seed, lengths=lengths)
    if not streamed and len(sampler) < accum:
        raise ToolkitError(
            f"the training data has {len(dataset)} examples, fewer than one optimizer step needs "
            f"({t.per_device_train_batch_size} x {world} processes x {accum} accumulation steps): add text or "
            "lower training.per_device_train_batch_size / gradient_accumulation_steps"
        )
    collator = objective.make_collator(job.tokenizer, t.seed)
    if not streamed:
        loader = make_loader(dataset, sampler, collator, t.dataloader_num_workers)
    counts_flops = type(objective).flops is not Objective.flops  # the objective counts its FLOPs
    if t.max_flops is not None and not counts_flops:
        raise ToolkitError(
            f"training.max_flops needs the FLOPs of a step, which objective '{objective.name}' does not count: "
            "use training.max_steps or num_train_epochs"
        )
    if t.max_flops is None:
        steps = total_steps(t, 0 if streamed else len(sampler))
    else:  # a FLOP budget: the schedule's length estimated from the first steps' batches
        steps = budget_steps(job, accelerator, sampler, loader, collator)
    evals = eval_loader(job, accelerator, t.seed, t.max_eval_batches)

    # ---- model, optimizer and schedule, wrapped for the launch (DDP, DeepSpeed, FSDP) ----------
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(objective)
    upcast_trainable_params(objective, t.mixed_precision)  # fp32 master weights under autocast
    ds_config = distributed.fill_deepspeed(accelerator, t, objective)
    distributed.prepare_fsdp(objective)
    if tensor_parallel:  # split before the optimizer is built over the (now sharded) parameters
        plan = parallel.parallelize(objective, layout)
    if pipelined:  # this process keeps its stage's weights; the optimizer is built over them alone
        model = pipeline.Pipeline(objective, layout, t, accelerator)
    optimizer = make_optimizer(model if pipelined else objective, t, accelerator.device, ds_config)
    if tensor_parallel:  # no DDP wrapper: DTensor runs the layers, the loop averages data-parallel copies
        model = parallel.prepare(objective, accelerator)
    elif not pipelined:
        model, optimizer = accelerator.prepare(objective, optimizer)
    # The schedule drives the optimizer that does the update (DeepSpeed may have built it), once per step.
    scheduler = make_scheduler(innermost_optimizer(optimizer), t, steps)
    accelerator.register_for_checkpointing(scheduler)
    deepspeed = ds_config is not None
    if t.torch_compile:
        model = torch.compile(model)

    # ---- resume: the whole run state, then the data position that follows from the step --------
    step, tokens_seen, elapsed, saves = 0, 0, 0.0, 0
    skips = SkippedSteps(t.max_consecutive_nonfinite_steps)
    run_facts = {
        "world_size": accelerator.num_processes,
        "engine": distributed.engine_name(accelerator),
        "tensor_parallel_size": layout.tp,
        "pipeline_parallel_size": layout.pp,
        "optimizer": t.optimizer,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": accum,
        "seed": t.seed,
        "train_examples": "streamed" if streamed else len(dataset),
    }
    if resume is not None:
        state = checkpoint.read_state(resume)
        changed = [f"{k} ({state.get(k)} -> {v})" for k, v in run_facts.items() if state.get(k, v) != v]
        if changed:
            raise ToolkitError(
                f"cannot resume from '{resume}': it was written with different settings: {', '.join(changed)}; "
                "resume with the same settings, number of processes and launch config (a ZeRO checkpoint resumes "
                "under the same stage), or start a new output_dir"
            )
        accelerator.load_state(str(resume))
        if streamed:  # the stream's own position: a seek, not a replay
            from toolkit.data.streaming import restore_position

            restore_position(dataset, resume)
        if tensor_parallel:
            parallel.load_shards(model, optimizer, resume)
        if pipelined:
            model.load(optimizer, resume)
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state.get("train_seconds", 0.0)
        skips.restore(state.get("skipped_steps", {}))
        saves = state.get("save_sequence", 0)
        planned = state.get("total_steps", steps)
        if main and planned != steps:
            print(
                f"note: the run was planned for {planned} steps and now runs to {steps}: the learning-rate schedule "
                f"({t.lr_scheduler_type}) is recomputed over {steps} steps, so at step {step} the learning rate is "
                f"{scheduler.get_last_lr()[0]:.3g}"
            )
    if main:  # checkpoints not in this run's history (newer than the resumed one, invalid) go aside
        checkpoint.set_aside(job.output_dir, resume)
    # ---- compute: model FLOPs per step (None if the objective does not count them), mfu --------
    if counts_flops:
        peak, peak_source = flops.device_peak(accelerator.device, t.peak_flops)
        if peak is None and main:
            print(f"mfu: not logged ({peak_source}): set training.peak_flops to the device's peak FLOP/s")
        meter = flops.FlopMeter(
            peak, accelerator.num_processes, total=state.get("train_flops", 0.0) if resume is not None else 0.0
        )
    if accelerator.trackers == [] and t.report_to:
        accelerator.init_trackers(job.name, config=job.tracker_config)
    log = MetricsLog(job.output_dir, accelerator, resume_step=step if resume is not None else None)
    if streamed:
        from toolkit.data.streaming import StreamBatches

        stream = StreamBatches(dataset, t.per_device_train_batch_size, collator)
    else:
        stream = MicroBatches(sampler, loader, collator, start=step * accum)

    def epoch_at(step: int) -> float:  # a stream counts passes over its files, not fractions
        return float(stream.epoch) if streamed else step * accum / len(sampler)

    if main:
        print(
            f"training: {steps} steps, {distributed.describe(accelerator)}, "
            + (f"{layout.describe()} ({parallel.describe_plan(plan)} layers), " if tensor_parallel else "")
            + (f"{model.describe()}, " if pipelined else "")
            + f"{optimizer_name(optimizer)}, global batch "
            f"{t.per_device_train_batch_size * world * accum} x "
            + (
                f"{job.train_data.data.max_seq_length} tokens, streamed"
                if streamed
                else f"{objective.describe_example(job.train_data)}, {len(sampler) // accum} steps per epoch"
            )
            + (f", resumed at step {step}" if step else "")
            + (f", a budget of {t.max_flops:.3g} FLOPs (about {steps} steps)" if t.max_flops is not None else "")
        )

    def save_checkpoint():
        nonlocal saves
        saves += 1  # the run's own save order: rotation keeps the newest of this history
        state = {
            **run_facts,
            "step": step,
            "epoch": epoch_at(step),
            "tokens_seen": tokens_seen,
            "train_seconds": elapsed,
            "optimizer_class": optimizer_name(optimizer),
            "skipped_steps": skips.state(),
            **({"train_flops": meter.total} if counts_flops else {}),
            "total_steps": steps,
            "initial_eval": history.get("initial", {}),  # the model card's "before" column, after a resume
        }
        extras = job.write_extras
        if streamed:  # every process's stream position goes beside the checkpoint
            from toolkit.data.streaming import gather_positions, write_positions

            positions = gather_positions(accelerator, dataset)

            def extras(folder):
                job.write_extras(folder)
                write_positions(folder, positions)

        def shards(folder):  # what accelerate does not hold: tensor-parallel shards, pipeline stages
            if tensor_parallel:
                parallel.save_shards(model, optimizer, folder)
            else:
                model.save(optimizer, folder)

        shards_of = shards if tensor_parallel or pipelined else None
        checkpoint.save(
            accelerator, job.output_dir, step, state, extras, t.save_total_limit, seq=saves, shards=shards_of
        )

    history: dict = {}
    if evals is not None and t.eval_on_start and step == 0:
        history["initial"] = evaluate(model, objective, evals, accelerator)
        log.log(
            0, {f"eval_{k}": v for k, v in history["initial"].items()} | ({"train_flops": 0.0} if counts_flops else {})
        )
    if resume is not None:
        history.update(resumed_history(state, job.output_dir))
        if step >= steps and evals is not None:  # recovered at its final step: the final numbers again
            history["eval"] = evaluate(model, objective, evals, accelerator)

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, disable=not main, desc=job.name, dynamic_ncols=True)
    model.train()
    interval: dict = {}
    grad_norms: list[float] = []  # the same on every process: norms of synchronised gradients
    interval_seconds, interval_tokens = 0.0, 0  # training time only: evaluation and saving excluded
    interval_skips = {"nonfinite": 0, "scaler": 0}  # skipped optimizer steps since the last log line

    def finished() -> bool:  # a FLOP budget ends at the first step that spends it; else the step count
        return meter.total >= t.max_flops if t.max_flops is not None else step >= steps

    while not finished():
        step_start = time.perf_counter()
        # 1. one optimizer step of micro-batches; loss items counted over every process
        micro = [to_device(next(stream), accelerator.device) for _ in range(accum)]
        counts: dict = {}
        for batch in micro:
            add_into(counts, "", objective.counts(batch))
        # the step's FLOPs travel with the counts (one collective): batches differ between processes
        if counts_flops:
            counts[_FLOPS] = torch.tensor(sum(objective.flops(b) for b in micro), dtype=torch.float64)
        global_counts = reduce_totals(accelerator, counts)
        counts.pop(_FLOPS, None)
        step_flops = global_counts.pop(_FLOPS, 0.0)
        global_counts = {k: max(v, 1.0) for k, v in global_counts.items()}

        # 2. forward/backward; DDP (or, under tensor and pipeline parallelism, the loop) averages gradients
        #    over the data-parallel copies, hence the factor world (their number).
        #    A nan/inf loss on any process skips the step everywhere, decided before the step's one
        #    gradient synchronisation (the last micro-batch's backward); the weights stay untouched.
        #    Under pipeline parallelism forward and backward run together, stage by stage, and a skipped
        #    step's gradients are dropped instead.
        nonfinite, skip = torch.zeros((), dtype=torch.bool, device=accelerator.device), False
        for i, batch in enumerate(micro):
            with accelerator.accumulate(model):
                if pipelined:  # the same loss, normalised piece by piece inside the schedule
                    losses, stats = model.step(batch, global_counts, world)
                else:
                    losses, stats = model(batch)
                loss = sum(objective.loss_weights[k] * losses[k] / global_counts[k] for k in losses)
                nonfinite |= ~torch.isfinite(loss.detach())
                if i == accum - 1:
                    skip = any_process(accelerator, nonfinite)
                if pipelined:
                    pass
                elif not skip:
                    accelerator.backward(loss * world * accum)  # backward() divides by accum again
                elif deepspeed:  # DeepSpeed steps inside backward(); nan gradients make it drop the step
                    accelerator.backward(loss * float("nan"))
                if accelerator.sync_gradients and not skip:
                    if tensor_parallel:
                        parallel.average_gradients(model, layout)
                    if pipelined:  # tied weights' stages summed, data-parallel copies averaged
                        model.reduce_gradients()
                    clip = accelerator.clip_grad_norm_
                    if tensor_parallel or pipelined:
                        clip = parallel.clip_grad_norm_ if tensor_parallel else model.clip_grad_norm_
                    if t.max_grad_norm > 0:
                        norm = clip(model.parameters(), t.max_grad_norm)
                        if norm is not None and math.isfinite(float(norm)):
                            grad_norms.append(float(norm))
                    optimizer.step()
                # an optimizer accelerate did not wrap (tensor and pipeline parallelism) is cleared only here too
                if accelerator.sync_gradients:
                    optimizer.zero_grad(set_to_none=True)
            add_into(interval, "loss/", losses)
            add_into(interval, "", stats)
            n_tokens = objective.num_tokens(batch) * world
            interval_tokens += n_tokens
            tokens_seen += n_tokens
        add_into(interval, "count/", counts)

        # 3. the schedule advances only with the weights: not on a skipped step
        scaler_skipped = accelerator.optimizer_step_was_skipped
        if skip and deepspeed and not scaler_skipped:
            raise RuntimeError(f"step {step + 1}: DeepSpeed applied an update with a non-finite loss")
        if skips.record(step + 1, nonfinite_loss=skip, scaler_skipped=scaler_skipped and not skip):
            scheduler.step()
        interval_skips["nonfinite"] += int(skip)
        interval_skips["scaler"] += int(scaler_skipped and not skip)
        step += 1
        seconds = time.perf_counter() - step_start
        interval_seconds += seconds
        elapsed += seconds
        if counts_flops:  # a skipped step counts too: its forward and backward ran
            meter.add(step_flops, seconds)
        last = finished()
        bar.update(1)

        # 4. log, evaluate and checkpoint when due
        if step % t.logging_steps == 0 or last:
            totals = reduce_totals(accelerator, interval)
            values = objective.metrics(totals)
            values.update(
                learning_rate=scheduler.get_last_lr()[0],
                tokens_per_second=interval_tokens / max(interval_seconds, 1e-9),
                tokens_seen=tokens_seen,
                epoch=epoch_at(step),
            )
            if counts_flops:
                values.update(meter.interval())  # step_flops, train_flops, mfu
            if grad_norms:
                values["grad_norm"] = sum(grad_norms) / len(grad_norms)
            if interval_skips["nonfinite"] or interval_skips["scaler"]:
                values.update(skipped_nonfinite=interval_skips["nonfinite"], skipped_by_scaler=interval_skips["scaler"])
            log.log(step, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            history["train"] = values
            interval, grad_norms, interval_seconds, interval_tokens = {}, [], 0.0, 0
            interval_skips = {"nonfinite": 0, "scaler": 0}
        if evals is not None and ((t.eval_steps and step % t.eval_steps == 0) or last):
            history["eval"] = evaluate(model, objective, evals, accelerator)
            # training seconds so far (evaluation and checkpoints are off the clock), for accuracy-vs-time plots
            flops_so_far = {"train_flops": meter.total} if counts_flops else {}  # for loss-against-compute plots
            log.log(
                step, {**{f"eval_{k}": v for k, v in history["eval"].items()}, "train_seconds": elapsed, **flops_so_far}
            )
        if (t.save_steps and step % t.save_steps == 0) or last:
            save_checkpoint()
    bar.close()
    if steps == 0 and evals is not None:  # nothing trained: the evaluation of the model as it came
        if "initial" not in history:
            history["initial"] = evaluate(model, objective, evals, accelerator, t.max_eval_batches)
            log.log(0, {f"eval_{k}": v for k, v in history["initial"].items()})
        history["eval"] = history["initial"]
    history.update(
        steps=step,
        tokens_seen=tokens_seen,
        train_seconds=elapsed,
        world_size=accelerator.num_processes,
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        engine=run_facts["engine"],
        optimizer=optimizer_name(optimizer),
        skipped_nonfinite_steps=skips.nonfinite,
        skipped_loss_scaler_steps=skips.loss_scaler,
        **({"train_flops": meter.total} if counts_flops else {}),
    )
    # the prepared model: the final save gathers sharded weights from it (under pipeline parallelism from
    # the objective, which holds this process's stage)
    return history, objective if pipelined else model
