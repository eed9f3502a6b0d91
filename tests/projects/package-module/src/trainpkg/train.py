"""Trains a little, as a module of an installed package: `python -m trainpkg.train`."""

import json
import os
import pathlib
import sys

import torch
from lightning.fabric import Fabric

from trainpkg.model import make_model

fabric = Fabric()
model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = fabric.setup(model, optimizer)
x = torch.ones(8, 4, device=fabric.device)
for _ in range(5):
    optimizer.zero_grad()
    loss = model(x).pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
pathlib.Path("lightning_logs").mkdir(exist_ok=True)
pathlib.Path(f"lightning_logs/rank{fabric.global_rank}.txt").write_text(str(loss.item()))
if fabric.is_global_zero:
    summary = {
        "world_size": fabric.world_size,
        "module": __spec__.name if __spec__ else None,
        "package": str(pathlib.Path(sys.modules["trainpkg"].__file__).parent),
        "args": sys.argv[1:],
    }
    run_dir = pathlib.Path(os.environ["FABRIC_RUN_DIR"])
    (run_dir / "summary.json").write_text(json.dumps(summary))
