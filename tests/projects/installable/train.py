"""The script: its model comes from the installed package (src/ is not on any path)."""

import torch
from mypkg.model import Net

if __name__ == "__main__":
    print(Net()(torch.zeros(1, 4)).shape)
