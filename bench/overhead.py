"""The Fabric overhead: the payload's step time vs a plain PyTorch loop of the same model and data.

    OMP_NUM_THREADS=1 python -m bench.overhead [--pairs 10] [-- payload options]

The plain loop has the payload's model, data, batch size and optimizer, and reads the loss back
every --log-every steps as the payload logs it; no Fabric, no sampler, no checkpoints. The two
run in turns in this one process, so a slow spell of the machine hits both alike, each first
in every other pair; each pair gives a ratio and the median ratio is printed as JSON, with each
side's median ms per step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from trainer.train import build_model, main, parse_args, synthetic_data


def plain_step_ms(payload: argparse.Namespace) -> float:
    """ms per step of the plain loop; like the payload's figure, epoch boundaries excluded."""
    dataset = synthetic_data(payload.samples, payload.seed)
    features, classes = dataset.tensors[0].shape[1], int(dataset.tensors[1].max()) + 1
    model = build_model(features, classes, payload.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=payload.lr)
    loader = DataLoader(dataset, batch_size=payload.batch_size, shuffle=True, drop_last=True)
    steps, seconds = 0, 0.0
    for _ in range(payload.epochs):
        model.train()
        started = time.perf_counter()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps % payload.log_every == 0:
                loss.item()
        seconds += time.perf_counter() - started
    return 1000 * seconds / steps


def payload_run(argv: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main([*argv, "--run-dir", folder])
        return json.loads((Path(folder) / "summary.json").read_text())


def measure(pairs: int, argv: list[str]) -> dict[str, float]:
    payload_options = parse_args(argv)
    payload_run(argv)  # warm-up: first-touch allocations, lazy imports
    plain_step_ms(payload_options)
    payload, plain, epoch_end_share = [], [], []
    for pair in range(pairs):
        # Each goes first in every other pair: the run that goes second is a few % slower.
        for side in ("payload", "plain") if pair % 2 == 0 else ("plain", "payload"):
            gc.collect()
            if side == "plain":
                plain.append(plain_step_ms(payload_options))
                continue
            summary = payload_run(argv)
            payload.append(summary["step_time_ms"])
            epoch_end_share.append(summary["epoch_end_s"] / summary["wall_time_s"])
    return {
        "epoch_end_share": statistics.median(epoch_end_share),
        "payload_ms": statistics.median(payload),
        "plain_ms": statistics.median(plain),
        "overhead": statistics.median(a / b - 1 for a, b in zip(payload, plain, strict=True)),
        "batch_size": payload_options.batch_size,
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("payload", nargs="*", help="payload options (after --)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(measure(args.pairs, args.payload)))


if __name__ == "__main__":
    cli()
