"""Tensor parallelism: each layer's matrices split across processes (Megatron-style), on PyTorch DTensor.

    processes = data_parallel x tensor_parallel          (a 2-D device mesh, rank = dp_rank * tp + tp_rank)
    attention q/k/v and the first FFN matrix             column-wise (each process: its share of heads / units)
    attention output and the second FFN matrix           row-wise (partial sums all-reduced by DTensor)
    embeddings, norms, heads (and so tied weights)        replicated: they stay one tensor, tied as before

BERT, ELECTRA and GPT-2 ship no tensor-parallel plan in transformers, so the plan for them is here;
a model whose config has `base_model_tp_plan` (Llama and many others) gets that plan. The processes of
one tensor-parallel group read the same batch, so the data is sharded over the data-parallel groups
only, and sums reduced over every process count each batch `tp` times (`Layout.copies`). Gradients
of the data-parallel copies are averaged over the `dp` mesh dimension. Checkpoints hold the shards
(torch.distributed.checkpoint), so a run resumes under the same layout; the final folder is gathered
into an ordinary full-size `save_pretrained` folder.

`Layout` also describes pipeline parallelism (`engine.pipeline`): `pp` stages per data-parallel copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import ToolkitError

SHARDS_DIR = "tensor_parallel_shards"  # inside a checkpoint: model and optimizer shards (DCP)


@dataclass
class Layout:
    """How the processes split the work: `dp` data-parallel groups of `tp` tensor-parallel processes, or of
    `pp` pipeline stages (one of the two is 1)."""

    world: int
    rank: int
    tp: int = 1
    mesh: object = field(default=None, repr=False)  # DeviceMesh ("dp", "tp") or ("dp", "pp") when tp or pp > 1
    pp: int = 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)

    @property
    def copies(self) -> int:
        """How many processes read each batch (and so hold each summed statistic)."""
        return self.tp * self.pp

    def describe(self) -> str:
        return f"tensor parallel {self.tp} x data parallel {self.dp}" if self.tp > 1 else ""


def check_layout(tp: int, world: int, engine: str, optimizer: str = "adamw") -> None:
    """A tensor-parallel size the launch can hold, under an engine and optimizer it combines with."""
    if tp < 1:
        raise ToolkitError(f"training.tensor_parallel_size must be at least 1 (got {tp})")
    if tp == 1:
        return
    if optimizer != "adamw":
        raise ToolkitError(
            f"training.tensor_parallel_size={tp} runs with training.optimizer=adamw only (got {optimizer}): "
            "change the optimizer or set training.tensor_parallel_size=1"
        )
    if engine not in ("single", "ddp"):
        raise ToolkitError(
            f"training.tensor_parallel_size={tp} cannot be combined with {engine}: launch plain processes "
            "(recipes/accelerate/multi-cpu.yaml or multi-gpu.yaml) or set training.tensor_parallel_size=1"
        )
    if world % tp:
        raise ToolkitError(
            f"training.tensor_parallel_size={tp} does not divide the {world} launched process(es): launch a "
            f"multiple of {tp} processes (--num_processes {tp}, {2 * tp}, ...) or change the size"
        )


def make_layout(accelerator, t, engine: str) -> Layout:
    world, rank, tp = accelerator.num_processes, accelerator.process_index, t.tensor_parallel_size
    check_layout(tp, world, engine, t.optimizer)
    pp = t.pipeline_parallel_size  # checked by engine.pipeline.check_layout
    if tp == 1 and pp == 1:
        return Layout(world, rank)
    from torch.distributed.device_mesh import init_device_mesh

    inner, name = (tp, "tp") if tp > 1 else (pp, "pp")
    mesh = init_device_mesh(accelerator.device.type, (world // inner, inner), mesh_dim_names=("dp", name))
    return Layout(world, rank, tp, mesh, pp)


def layout_of(accelerator) -> Layout:
    """The layout this accelerator's run trains under (set by `engine.loop.make_accelerator`)."""
    found = getattr(accelerator, "toolkit_layout", None)
    return found if found is not None else Layout(accelerator.num_processes, accelerator.process_index)


# --------------------------------------------------------------------------------------------
# The plan: which linear layers split how
# --------------------------------------------------------------------------------------------

BERT_LIKE = ("bert", "electra", "roberta", "xlm-roberta", "camembert")
BERT_PLAN = {  # module-name suffix -> style (names as in transformers' BertLayer)
    "attention.self.query": "colwise",
    "attention.self.key": "colwise",
    "attention.self.value": "colwise",
    "attention.output.dense": "rowwise",
    "intermediate.dense": "colwise",
    "output.dense": "rowwise",  # the layer's second FFN matrix (attention.output.dense matched above)
}
GPT2_PLAN = {
    "attn.c_attn": "packed_colwise",  # q, k and v in one Conv1D: each process takes its heads of all three
    "attn.c_proj": "rowwise",
    "mlp.c_fc": "colwise",
    "mlp.c_proj": "rowwise",
}


def split_sizes(config) -> dict[str, int]:
    """The sizes a tensor-parallel split divides: attention heads and FFN units."""
    kind = getattr(config, "model_type", "")
    if kind == "gpt2":
        return {"attention heads (n_head)": config.n_head, "FFN units (n_inner)": config.n_inner or 4 * config.n_embd}
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    sizes = {"attention heads (num_attention_heads)": heads, "FFN units (intermediate_size)": None}
    sizes["FFN units (intermediate_size)"] = getattr(config, "intermediate_size", None)
    if kv is not None:
        sizes["key/value heads (num_key_value_heads)"] = kv
    return {k: v for k, v in sizes.items() if v is not None}


def check_model(config, tp: int, name: str = "the model") -> None:
    """Refuse a model that this tensor-parallel size cannot split evenly, or that has no plan."""
    if tp == 1:
        return
    kind = getattr(config, "model_type", "")
    if kind not in BERT_LIKE and kind != "gpt2" and not getattr(config, "base_model_tp_plan", None):
        raise ToolkitError(
            f"training.tensor_parallel_size={tp}: {name} ({kind or 'unknown type'}) has no tensor-parallel plan "
            f"(the toolkit has one for {', '.join(BERT_LIKE)} and gpt2; transformers ships one in "
            "config.base_model_tp_plan for others): set training.tensor_parallel_size=1"
        )
    for what, n in split_sizes(config).items():
        if n % tp:
            raise ToolkitError(
                f"training.tensor_parallel_size={tp} does not divide {name}'s {n} {what}: choose a size that "
                "divides it, or change model.config_overrides"
            )


def plan_for(model: nn.Module, prefix: str = "") -> dict[str, str]:
    """Full module name -> style ('colwise', 'rowwise', 'packed_colwise') for one transformers model."""
    config = model.config
    kind = getattr(config, "model_type", "")
    names = [n for n, _ in model.named_modules()]
    if kind in BERT_LIKE or kind == "gpt2":
        table = GPT2_PLAN if kind == "gpt2" else BERT_PLAN
        plan = {}
        for n in names:
            if ".layer." not in f".{n}" and ".h." not in f".{n}":
                continue  # only the transformer blocks (BERT's pooler and heads have `dense` too)
            style = next((s for suffix, s in table.items() if n == suffix or n.endswith("." + suffix)), None)
            if style is not None:
                plan[prefix + n] = style
        return plan
    # transformers' own plan: keys relative to the base model, `*` for the layer index
    import fnmatch

    base = getattr(model, "base_model_prefix", "")
    plan = {}
    for key, style in config.base_model_tp_plan.items():
        if style not in ("colwise", "rowwise"):
            raise ToolkitError(
                f"training.tensor_parallel_size: the model's plan uses the style '{style}' for {key}, which the "
                "toolkit does not apply (only colwise and rowwise): set training.tensor_parallel_size=1"
            )
        pattern = f"{base}.{key}" if base and any(n.startswith(base + ".") for n in names) else key
        for n in names:
            if fnmatch.fnmatchcase(n, pattern):
                plan[prefix + n] = style
    return plan


def objective_plan(objective: nn.Module) -> dict[str, str]:
    """The plan over every transformers model the objective trains (ELECTRA trains two)."""
    plan: dict[str, str] = {}
    owners = {id(m): n for n, m in objective.named_modules()}
    for model in objective.hf_models().values():
        name = owners[id(model)]
        plan.update(plan_for(model, f"{name}." if name else ""))
    return plan


# GPT-2's c_attn holds [q | k | v] along its output; each process must hold its heads of all three.
# Its columns are reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] so that an even column split gives
# process r the block (q_r, k_r, v_r); the attention then splits its local output into thirds.


def pack_qkv(w: torch.Tensor, tp: int) -> torch.Tensor:
    """[q | k | v] -> [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] along the last dimension."""
    lead, n = w.shape[:-1], w.shape[-1]
    return w.reshape(*lead, 3, tp, n // (3 * tp)).transpose(-3, -2).reshape(*lead, n)


def unpack_qkv(w: torch.Tensor, tp: int) -> torch.Tensor:
    lead, n = w.shape[:-1], w.shape[-1]
    return w.reshape(*lead, tp, 3, n // (3 * tp)).transpose(-3, -2).reshape(*lead, n)


def _styles():
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def conv1d_partition(weight_dim: int, bias_placement):
        """transformers' Conv1D keeps its weight as (in, out): the transpose of nn.Linear's."""

        def partition(name, module, mesh):
            for pname, param in list(module.named_parameters(recurse=False)):
                placement = Shard(weight_dim) if pname == "weight" else bias_placement
                dist = distribute_tensor(param.data, mesh, [placement])
                module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))

        return partition

    class Conv1DColwise(ColwiseParallel):
        def _apply(self, module, mesh):
            from functools import partial

            return distribute_module(
                module,
                mesh,
                conv1d_partition(1, Shard(0)),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
            )

    class Conv1DRowwise(RowwiseParallel):
        def _apply(self, module, mesh):
            from functools import partial

            self.desired_input_layouts = (Shard(-1),)  # as RowwiseParallel sets for nn.Linear

            return distribute_module(
                module,
                mesh,
                conv1d_partition(0, Replicate()),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
            )

    return ColwiseParallel, RowwiseParallel, Conv1DColwise, Conv1DRowwise


def parallelize(objective: nn.Module, layout: Layout) -> dict[str, str]:
    """Split the objective's transformer blocks over the `tp` mesh dimension, in place; returns the plan."""
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers.pytorch_utils import Conv1D

    colwise, rowwise, conv_colwise, conv_rowwise = _styles()
    tp = layout.tp
    objective.to(layout.mesh.device_type)  # the shards are cut from weights on the mesh's device
    for sub, model in objective.hf_models().items():
        check_model(model.config, tp, f"the model{' ' + sub if sub else ''}")
    plan = objective_plan(objective)
    styles = {}
    for name, style in plan.items():
        module = objective.get_submodule(name)
        conv = isinstance(module, Conv1D)
        if style == "packed_colwise":
            with torch.no_grad():  # reorder q/k/v columns so that an even split gives each process its heads
                module.weight.copy_(pack_qkv(module.weight, tp))
                module.bias.copy_(pack_qkv(module.bias, tp))
            attention = objective.get_submodule(name.rsplit(".", 1)[0])
            attention.split_size //= tp  # the attention splits its local [q_r k_r v_r] into thirds
        if style in ("colwise", "packed_colwise"):
            styles[name] = conv_colwise() if conv else colwise()
        else:
            styles[name] = conv_rowwise() if conv else rowwise()
    parallelize_module(objective, layout.mesh["tp"], styles)
    return plan


def prepare(objective: nn.Module, accelerator) -> nn.Module:
    """What `accelerator.prepare` does for a model, without its DDP wrapper: mixed-precision autocast."""
    if accelerator.mixed_precision != "no":
        objective.forward = accelerator.autocast()(objective.forward)
    return objective


# --------------------------------------------------------------------------------------------
# The step: gradients of data-parallel copies, clipping over shards
# --------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def average_gradients(model: nn.Module, layout: Layout) -> None:
    """Average gradients over the data-parallel copies (what DDP does; DDP does not take DTensor parameters).
    One flat all-reduce per step."""
    if layout.dp == 1:
        return
    import torch.distributed as dist

    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=layout.mesh.get_group("dp"))
    flat /= layout.dp
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole gradient: sharded parts' norms are DTensors reduced over the shards,
    replicated parts count once."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    squares = torch.zeros((), dtype=torch.float64)
    for group in (sharded, plain):
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares = squares + norm.double().cpu() ** 2
    total = squares.sqrt().float()
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].grad.device))
    return total


# --------------------------------------------------------------------------------------------
# Saving: shards in checkpoints, the full model in the final folder
# --------------------------------------------------------------------------------------------


def save_shards(model: nn.Module, optimizer, folder: Path) -> None:
    """Model and optimizer shards into a checkpoint (every process writes its own; collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(folder) / SHARDS_DIR))


def load_shards(model: nn.Module, optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (Path(folder) / SHARDS_DIR).is_dir():
        raise ToolkitError(
            f"cannot resume from '{folder}': it holds no tensor-parallel shards ({SHARDS_DIR}); it was written "
            "with training.tensor_parallel_size=1: resume with that, or start a new output_dir"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDS_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module, layout: Layout) -> dict:
    """The full-size state dict: shards gathered (collective), GPT-2's q/k/v columns back in order.
    Tied weights are replicated, so they come out as one tensor under each of their names."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        out[name] = value.detach().cpu().clone()
    packed = [n for n, style in objective_plan(model).items() if style == "packed_colwise"]
    for module in packed:
        for pname in ("weight", "bias"):
            key = f"{module}.{pname}"
            out[key] = unpack_qkv(out[key], layout.tp)
    # every name of a tied parameter maps to one tensor again (save_pretrained drops the duplicates)
    ids: dict[int, str] = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) in ids:
            out[name] = out[ids[id(p)]]
        else:
            ids[id(p)] = name
    return out


def describe_plan(plan: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for style in plan.values():
        counts[style] = counts.get(style, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
