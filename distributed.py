"""
torchrun: the same loop on N processes (one per GPU), with PyTorch's own engines: DDP, or FSDP2 (`fully_shard`,
--fsdp) to shard the student's weights, gradients and optimizer state. `python train.py` never initialises anything
here: every function below is then the identity (world() == 1) and the single-process run is unchanged.

    torchrun --nproc_per_node 8 train.py --student Qwen2.5-1.5B --batch-size 8 ...          # DDP
    torchrun --nproc_per_node 8 train.py --student Qwen2.5-7B --fsdp --batch-size 8 ...     # FSDP2

What is split and what is not:
  - the global batch (--batch-size questions per micro-step) is the same whatever N: each rank runs the student on
    a disjoint block of every micro-step's questions (rows); its loss, a mean over its block, is weighted so that
    DDP's and FSDP2's gradient average equals the gradient of the mean over the whole micro-batch (loss_weight);
  - MIND itself is replicated: every rank holds the probe's features and runs the (small) MetaNet's plan on the
    whole micro-batch with the same RNG state, so a question's selection and α do not depend on the rank that trains
    on it; the per-rationale losses of the blocks are gathered into the global [B,K] (whole_batch) before
    Mind.observe, so the calibrator and the meta loss are the same on every rank; the MetaNet's gradients are
    averaged anyway (average_grads), which keeps its weights equal even if a rank's RNG drifted (LoRA dropout);
  - DDP and FSDP2 communicate inside every forward (FSDP2) and backward (both): every rank runs as many chunks as
    the busiest one (student.run_student pads with idle one-token chunks, counted by max_over_ranks);
  - evaluation is split across ranks and gathered (evaluate); rank 0 alone writes files and shows progress;
  - checkpoints do not depend on N: one plain save_pretrained directory (FSDP2 gathers the full state dict first)
    and trainer.pt with the optimizer state in torch's own id-keyed layout, so --resume works with any N.
"""
import datetime
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist


def init() -> None:
    """Join torchrun's process group (from its RANK / WORLD_SIZE / LOCAL_RANK); without torchrun, nothing. On CUDA
    each process takes the GPU of its LOCAL_RANK, so 'cuda' means that GPU everywhere. Ranks other than 0 print
    nothing: their output would repeat rank 0's."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # the evaluation of a large benchmark on one rank's share can take long: a collective must not time out meanwhile
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def close() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def _device() -> str:
    """Where collectives run: NCCL wants CUDA tensors, gloo CPU ones."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


# -----------------------------------------------------------------------------
# The split of a micro-step's questions


def block(n: int, r: int, size: int) -> slice:
    """Rank r's contiguous block of n items (the first n % size ranks get one more)."""
    return slice(r * n // size, (r + 1) * n // size)


def rows(n: int) -> slice:
    """This rank's questions of a micro-step of n (all of them without torchrun)."""
    return block(n, rank(), world())


def loss_weight(n: int) -> float:
    """The factor of this rank's loss (a mean over its block of n questions): DDP and FSDP2 average the ranks'
    gradients, so N·B_r/B makes the average Σ_r (B_r/B)·∇L_r = ∇(mean over all B). 1.0 without torchrun."""
    b = rows(n)
    return world() * (b.stop - b.start) / n


def whole_batch(obj, n: int):
    """train.Objective of this rank's block -> that of the whole micro-step: ℓ[B,K] gathered in question order (what
    Mind.observe must see), the loss and its parts as means over all B questions, tokens summed. The loss is a
    detached value: the backward ran before."""
    if world() == 1:
        return obj
    size, own = world(), rows(n)
    longest = n // size + (n % size > 0)
    local = obj.seq_losses.new_zeros(longest, obj.seq_losses.size(1))
    local[:own.stop - own.start] = obj.seq_losses
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.to(_device()))
    seq_losses = torch.cat([p[:block(n, r, size).stop - block(n, r, size).start] for r, p in enumerate(parts)])
    w = (own.stop - own.start) / n
    keys = sorted(obj.parts)
    sums = torch.tensor([w * obj.loss.item(), *(w * obj.parts[k] for k in keys), obj.tokens, obj.padded],
                        dtype=torch.float64, device=_device())
    dist.all_reduce(sums)
    s = sums.tolist()
    return replace(obj, loss=torch.tensor(s[0]), seq_losses=seq_losses.to(obj.seq_losses.device),
                   parts=dict(zip(keys, s[1:-2])), tokens=round(s[-2]), padded=round(s[-1]))


def max_over_ranks(x: int) -> int:
    if world() == 1:
        return x
    t = torch.tensor([x], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag) -> bool:
    return bool(flag) if world() == 1 else max_over_ranks(int(bool(flag))) > 0


def average_grads(module: torch.nn.Module) -> None:
    """A replicated module's gradients (the MetaNet's) averaged over the ranks (gloo has no AVG: SUM, then / N)."""
    if world() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            g = p.grad.to(_device())
            dist.all_reduce(g)
            p.grad.copy_(g / world())


# -----------------------------------------------------------------------------
# The student under DDP or FSDP2


def wrap(model: torch.nn.Module, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP2 with one unit per decoder layer plus the root (embeddings, final norm, head: kept unsharded
    from the root's forward to its backward, which is what lets student.forward_chunk read the head's weight).
    Without torchrun: the model itself."""
    if world() == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.get_decoder().layers:
            fully_shard(layer)
        model = fully_shard(model)
        model._is_fsdp_managed_module = True  # transformers' generate then keeps the ranks' forwards in step
        return model
    from torch.nn.parallel import DistributedDataParallel
    cuda = torch.cuda.is_available()
    # no buffer sync in the forward: the rotary tables are constants, and a broadcast in every forward would need
    # every rank to run the same number of forwards even where no gradient flows
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if cuda else None,
                                   forward_sync_buffers=False)


def bare(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP (FSDP2 changes the model's class in place: it is its own bare model)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrapped(model: torch.nn.Module) -> bool:
    """DDP or FSDP2: the root module's forward must run (it gathers weights and prepares the gradient reduction)."""
    return world() > 1 and (bare(model) is not model or sharded(model))


def sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """FSDP2: the full state dict, gathered on rank 0's CPU (every rank must call it; the others get {}).
    Else None: the model's own state dict is already whole."""
    if not sharded(model):
        return None
    drop_gathered(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state as torch.optim.Optimizer.state_dict() lays it out (parameters numbered in the order of
    the param groups), whatever N: under FSDP2 it is gathered on rank 0 (collective) and renumbered."""
    if not sharded(model):
        return opt.state_dict()
    drop_gathered(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}  # ranks other than 0: they write nothing
    index = {name: i for i, name in enumerate(n for g in full["param_groups"] for n in g["params"])}
    return {"state": {index[n]: s for n, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of optimizer_state_dict: every rank takes its shard of the full state it read from trainer.pt."""
    if not sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    full = {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))


def drop_gathered(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root's gathered weights (embeddings, norm, head) after a forward that no backward follows
    (the unselected rationales' pass, evaluation). Before the optimizer updates the shards the gathered copy must
    go, or the next forward would use the old weights; before a state dict too, whose parameters must be the
    shards the optimizer holds. Only between steps: a pending backward may still need the gathered weights."""
    if sharded(model):
        model.reshard()


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor under FSDP2)."""
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


# -----------------------------------------------------------------------------
# Evaluation split across ranks


def evaluate(model, tokenizer, rows_: list[dict], max_new_tokens: int, batch_size: int, progress: bool,
             desc: str) -> dict:
    """eval.evaluate's metrics over rows_, each rank generating its share (every rank the same number of rows, so
    that under FSDP2, whose every forward is collective, every rank runs the same number of generate calls; the
    padding rows repeat a question and are dropped)."""
    from eval import evaluate as evaluate_rows, summarize
    if world() == 1:
        return evaluate_rows(model, tokenizer, rows_, max_new_tokens, batch_size, progress=progress, desc=desc)[0]
    size = world()
    per = -(-len(rows_) // size)
    mine = list(range(rank() * per, min(len(rows_), (rank() + 1) * per)))
    padded = [rows_[i] for i in mine] + [rows_[0]] * (per - len(mine))
    _, records = evaluate_rows(bare(model), tokenizer, padded, max_new_tokens, batch_size, progress=progress,
                               desc=desc)
    everyone = [None] * size
    dist.all_gather_object(everyone, records[:len(mine)])
    return summarize([r for part in everyone for r in part])
