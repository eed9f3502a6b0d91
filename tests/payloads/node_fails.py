"""A payload whose node 1 fails right after start while the others wait in a collective."""

import os
import sys
import time

from lightning.fabric import Fabric

fabric = Fabric()
if int(os.environ["GROUP_RANK"]) == 1:
    print("node 1: failing on purpose", flush=True)
    sys.exit(3)
while True:  # the other nodes would hang here forever without the cluster stopping them
    fabric.barrier()
    time.sleep(0.5)
