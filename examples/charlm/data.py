"""The text, its characters as token ids, and the batches a step trains on.

A batch is a pure function of (seed, step, rank): a resumed run draws exactly the batches the
interrupted one would have drawn, whatever happened before, and on any device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CharText:
    """A text as token ids: one id per distinct character, in sorted order."""

    chars: str  # the vocabulary, id i is chars[i]
    train: torch.Tensor  # [N] int64 ids, the first (1 - val_fraction) of the text
    val: torch.Tensor  # [M] int64 ids, the rest

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise ValueError(f"characters not in the training text: {''.join(unknown)!r}")
        return [self.chars.index(char) for char in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def read_text(path: str | Path, device: torch.device, val_fraction: float = 0.1) -> CharText:
    """The file's characters, already on `device` (the batches are cut from it there).

    SystemExit with one clear line if the file is missing, unreadable or too short.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: cannot read --data {path}: {error}") from None
    if len(text) < 1000:
        raise SystemExit(f"error: --data {path} has {len(text)} characters; need at least 1000")
    chars = "".join(sorted(set(text)))
    lookup = {char: i for i, char in enumerate(chars)}
    ids = torch.tensor([lookup[char] for char in text], dtype=torch.long, device=device)
    split = int(len(ids) * (1 - val_fraction))
    return CharText(chars=chars, train=ids[:split], val=ids[split:])


def batch_starts(
    length: int, batch_size: int, block_size: int, seed: int, step: int, rank: int, split: str
) -> list[int]:
    """Where each sequence of the batch starts: drawn from (seed, split, step, rank) alone.

    A string seed is hashed with SHA-512 by `random`, so it is the same in every process
    (unlike hash(), which PYTHONHASHSEED changes).
    """
    if length <= block_size + 1:
        raise SystemExit(f"error: the {split} text is shorter than --block-size {block_size} + 1")
    rng = random.Random(f"charlm:{seed}:{split}:{step}:{rank}")
    return [rng.randrange(length - block_size - 1) for _ in range(batch_size)]


def get_batch(
    ids: torch.Tensor,
    batch_size: int,
    block_size: int,
    *,
    seed: int,
    step: int,
    rank: int,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets, [batch_size, block_size] each, on ids' device."""
    starts = batch_starts(len(ids), batch_size, block_size, seed, step, rank, split)
    # Every tensor made here is on the text's device (fabric.device): no host-to-device copy
    # of whole batches, and no CPU tensor next to a CUDA one.
    offsets = torch.arange(block_size + 1, device=ids.device)
    windows = ids[torch.tensor(starts, device=ids.device).unsqueeze(1) + offsets]
    return windows[:, :-1], windows[:, 1:]
