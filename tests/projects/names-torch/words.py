"""A module of the project itself, imported by the script."""

from pathlib import Path


def word_lengths(path: Path) -> list[float]:
    return [float(len(word)) for word in path.read_text().split()]
