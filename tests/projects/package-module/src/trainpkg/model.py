import torch


def make_model() -> torch.nn.Module:
    return torch.nn.Linear(4, 1)
