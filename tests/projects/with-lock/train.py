"""A small real Fabric training script of a test project: imports humanize (which no node
requirement has) and a module of its own, reads a data file by a relative path, trains a
linear model on every rank, writes summary.json to $FABRIC_RUN_DIR."""

import json
import os
from pathlib import Path

import humanize
import torch
from lightning.fabric import Fabric
from words import word_lengths

fabric = Fabric()
torch.manual_seed(0)
lengths = word_lengths(Path("data/words.txt"))  # relative: the project folder is the cwd
x = torch.tensor(lengths, dtype=torch.float32, device=fabric.device).unsqueeze(1)
y = 3.0 * x + 1.0
model = torch.nn.Linear(1, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model, optimizer = fabric.setup(model, optimizer)
for _ in range(50):
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    fabric.backward(loss)
    optimizer.step()
loss = fabric.all_reduce(loss.detach(), reduce_op="mean")
if fabric.global_rank == 0:
    run_dir = Path(os.environ["FABRIC_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "world_size": fabric.world_size,
        "dependency": humanize.__name__,
        "words": len(lengths),
        "final_loss": loss.item(),
        "torch": torch.__version__,
        "cwd": os.getcwd(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    print("trained:", json.dumps(summary), flush=True)
