"""A payload whose node 1 fails right after its first training step (a fault, not a script
error: the cluster restarts it) while the others wait in a collective."""

import os
import sys
import time

import torch
from lightning.fabric import Fabric

fabric = Fabric()
weight = torch.nn.Parameter(torch.zeros(1, device=fabric.device))
torch.optim.SGD([weight], lr=0.1).step()  # training has started
if int(os.environ["GROUP_RANK"]) == 1:
    print("node 1: failing on purpose", flush=True)
    sys.exit(3)
while True:  # the other nodes would hang here forever without the cluster stopping them
    fabric.barrier()
    time.sleep(0.5)
