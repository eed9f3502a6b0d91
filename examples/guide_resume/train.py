"""Checkpoints the way Lightning Fabric's guide shows: fabric.save writes on global rank 0, and
at start every rank looks for the newest checkpoint and fabric.load()s it. On a cluster every
rank then needs to read what rank 0 wrote: the shared run directory (shared_fs=efs).

    fabric run --accelerator cpu --devices 2 train.py --max-steps 20

Writes under $FABRIC_RUN_DIR (else runs/latest): checkpoints/step-XXXXXXXX.ckpt every
--checkpoint-every steps and at the end, and summary.json (rank 0) with every rank's step it
resumed from and whether every replica ends with the same weights. Each step's batch depends
only on the seed, the step and the rank, so a resumed run continues as the first would have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from lightning.fabric import Fabric


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def batch(seed: int, step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    inputs = torch.randn(16, 8, generator=generator)
    return inputs.to(device), inputs.sum(dim=1, keepdim=True).to(device)


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    args = parse_args()
    fabric = Fabric()  # under `fabric run`: the launcher's settings
    fabric.seed_everything(args.seed)
    run_dir = Path(os.environ.get("FABRIC_RUN_DIR", "runs/latest"))
    checkpoints = run_dir / "checkpoints"
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    found = sorted(checkpoints.glob("step-*.ckpt"))
    if found:  # on every rank, as the guide does
        fabric.load(found[-1], state)
    resumed = int(state["step"])
    print(f"rank {fabric.global_rank}: resumed from step {resumed}", flush=True)
    for step in range(resumed, args.max_steps):
        inputs, targets = batch(args.seed, step, fabric.global_rank, fabric.device)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
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
            "steps": args.max_steps,
            "steps_this_run": args.max_steps - resumed,
            "resumed_from": starts,
            "replicas_identical": same,
            "weights_sha256": digest,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary) + "\n")
        print("summary:", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
