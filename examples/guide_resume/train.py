"""Checkpoints the way Lightning Fabric's guide shows: fabric.save writes, and at start every
rank looks for the newest checkpoint and fabric.load()s it. On a cluster every rank then needs
to read what other ranks wrote: the shared run directory (shared_fs=efs).

    fabric run --accelerator cpu --devices 2 train.py --max-steps 20 [--sharded]

Two ways to checkpoint, both Fabric's own:
  default     DDP: rank 0 writes one file, checkpoints/step-XXXXXXXX.ckpt;
  --sharded   FSDP2 through Fabric's ModelParallelStrategy: every rank writes its own shard
              into a folder of that name (torch.distributed.checkpoint, on gloo or NCCL), and
              rank 0 adds the folder's meta.pt.
Writes under $FABRIC_RUN_DIR (else runs/latest): a checkpoint every --checkpoint-every steps
and at the end, and summary.json (rank 0) with every rank's step it resumed from and whether
every rank ends with the same full weights. Each step's batch depends only on the seed, the
step and the rank, so a resumed run continues as the first would have.

--fail-once-at STEP stands for a lost node: the ranks of the last node exit when they reach
STEP the first time (a marker in the run directory remembers it), and the cluster's restart
must resume every rank from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sharded", action="store_true", help="FSDP2: a shard per rank")
    parser.add_argument("--fail-once-at", type=int, help="the last node's ranks exit here once")
    return parser.parse_args()


def shard(model: torch.nn.Module, mesh: object) -> torch.nn.Module:
    """ModelParallelStrategy's parallelize_fn: FSDP2 over every rank of every node."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    return fully_shard(model, mesh=mesh["data_parallel"])


def make_fabric(sharded: bool) -> Fabric:
    """Under `fabric run` the launcher's settings; the strategy is the script's choice."""
    if not sharded:
        return Fabric()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Fabric(
        strategy=ModelParallelStrategy(shard, data_parallel_size=world, tensor_parallel_size=1)
    )


def batch(seed: int, step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    inputs = torch.randn(16, 8, generator=generator)
    return inputs.to(device), inputs.sum(dim=1, keepdim=True).to(device)


def weights_sha256(model: torch.nn.Module) -> str:
    """Of the full weights: a sharded tensor is gathered first (a collective: every rank)."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fail_once(run_dir: Path, fabric: Fabric, step: int, fail_at: int | None) -> None:
    """The last node's ranks exit at step `fail_at`, the first time only (each rank its own
    marker: a node's ranks exit together, before any could write one for the others)."""
    last_node = fabric.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1
    if step != fail_at or fabric.node_rank != last_node:
        return
    marker = run_dir / f".failed-once-rank-{fabric.global_rank}"
    if marker.exists():
        return
    marker.write_text(f"failed at step {step}\n")
    print(f"rank {fabric.global_rank}: node {fabric.node_rank} fails at step {step}", flush=True)
    sys.exit(1)


def main() -> None:
    args = parse_args()
    fabric = make_fabric(args.sharded)
    fabric.seed_everything(args.seed)
    run_dir = Path(os.environ.get("FABRIC_RUN_DIR", "runs/latest"))
    checkpoints = run_dir / "checkpoints"
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.05))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    found = sorted(checkpoints.glob("step-*.ckpt"))
    if found:  # on every rank, as the guide does
        fabric.load(found[-1], state)
    resumed = int(state["step"])
    print(f"rank {fabric.global_rank}: resumed from step {resumed}", flush=True)
    first_loss = final_loss = None
    for step in range(resumed, args.max_steps):
        fail_once(run_dir, fabric, step, args.fail_once_at)
        inputs, targets = batch(args.seed, step, fabric.global_rank, fabric.device)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        final_loss = loss.item()
        first_loss = final_loss if first_loss is None else first_loss
        state["step"] = step + 1
        if state["step"] % args.checkpoint_every == 0 or state["step"] == args.max_steps:
            fabric.save(checkpoints / f"step-{state['step']:08d}.ckpt", state)
    digest = weights_sha256(model)
    starts = fabric.all_gather(torch.tensor(resumed, device=fabric.device)).view(-1).tolist()
    prefix = torch.tensor(int(digest[:15], 16), device=fabric.device)  # fits an int64
    same = len(set(fabric.all_gather(prefix).view(-1).tolist())) == 1
    print(f"rank {fabric.global_rank}: weights sha256 {digest}", flush=True)
    if fabric.global_rank == 0:
        summary = {
            "world_size": fabric.world_size,
            "num_nodes": fabric.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            "sharded": args.sharded,
            "device": str(fabric.device),
            "steps": args.max_steps,
            "steps_this_run": args.max_steps - resumed,
            "resumed_from": starts,
            "replicas_identical": same,
            "first_loss": first_loss,
            "final_loss": final_loss,
            "weights_sha256": digest,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary) + "\n")
        print("summary:", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
