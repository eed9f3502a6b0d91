"""Generations of a cluster whose nodes are replaced (recover): which instance holds each rank.

The members parameter (`/fabric/<stack>/members`) holds a generation: a number and the instance
ids by rank. CloudFormation's value (`i-a,i-b`, the instance shape) is generation 0. With
recover, node 0 publishes each new one: it watches which instance each rank's group holds, and
when that changes (a reclaimed or failed node replaced, node 0 itself replaced) it writes its
own address to the main-address parameter, then the next generation. Every agent reads the
members with the stop on every look, and follows:

- a generation older than the one it trains in is ignored (a slow node 0's late write);
- the same generation: nothing to do;
- a newer one that still gives this instance its rank: stop `fabric run` at once and start it
  again with the main address of that generation (the script resumes from its checkpoint);
- a newer one that gives the rank to another instance: this node was replaced; it stops.

Node 0 is the only writer: one instance holds rank 0 at a time, and the agent of a node 0 that
finds itself replaced stops before it writes again.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

# The main address and the members with recover, until node 0 publishes the first generation.
NOT_PUBLISHED = "none"
# A rank whose group holds no live instance (its replacement not launched yet): a generation
# with one is pending; every node stops its fabric run and waits for a complete one.
MISSING = "-"


@dataclass(frozen=True)
class Generation:
    number: int
    members: tuple[str, ...]  # instance ids by rank

    def encode(self) -> str:
        return f"{self.number}:{','.join(self.members)}"

    @classmethod
    def decode(cls, value: str) -> Generation | None:
        """`3:i-a,i-b`, or CloudFormation's `i-a,i-b` (generation 0); None if it is neither."""
        number, separator, members = value.strip().rpartition(":")
        if not separator:
            number, members = "0", value.strip()
        ids = tuple(member.strip() for member in members.split(","))
        valid = all(member.startswith("i-") or member == MISSING for member in ids)
        if not number.isdigit() or not valid or all(member == MISSING for member in ids):
            return None  # NOT_PUBLISHED, or not ours
        return cls(int(number), ids)

    @property
    def complete(self) -> bool:
        return MISSING not in self.members

    def holder(self, rank: int) -> str | None:
        return self.members[rank] if 0 <= rank < len(self.members) else None


def next_generation(current: Generation | None, holders: Sequence[str | None]) -> Generation | None:
    """What node 0 publishes when the instances that hold the ranks now (one per rank's group,
    None while a group has none) differ from the generation in force; None while a rank has
    no instance yet (a replacement still launching) or nothing changed. Replacements seen in
    one look make one generation, however many ranks they touch."""
    if not holders or any(holder is None for holder in holders):
        return None
    members = tuple(holder for holder in holders if holder is not None)
    if current is not None and current.members == members:
        return None
    return Generation((current.number + 1) if current else 1, members)


def watched_generation(current: Generation, holders: Sequence[str | None]) -> Generation | None:
    """What node 0, while the cluster trains, publishes when a rank's instance changed: the
    next generation, pending (MISSING for a rank without a live instance yet) or complete;
    None when nothing changed. A pending one makes every node stop at once instead of after
    gloo's or NCCL's timeouts; the complete one that follows starts them again."""
    members = tuple(holder or MISSING for holder in holders)
    if members == current.members:
        return None
    return Generation(current.number + 1, members)


class Change(enum.Enum):
    STALE = "stale"  # older than the generation this node trains in: ignored
    SAME = "same"
    RESTART = "restart"  # the cluster moved on and this instance keeps its rank
    REPLACED = "replaced"  # another instance holds this rank now


def follow(running: Generation, seen: Generation, rank: int, instance: str) -> Change:
    """What a node training in generation `running` does on reading `seen`."""
    if seen.number < running.number:
        return Change.STALE
    if seen.holder(rank) != instance:
        return Change.REPLACED if seen.number > running.number else Change.STALE
    if seen.number == running.number:
        return Change.SAME
    return Change.RESTART


class Follower:
    """One node's generation: where it trains, and what each look at the members says. While it
    restarts (fabric run stopped, not started again yet) a newer generation replaces the one
    it was about to join, so it starts once, in the newest."""

    def __init__(self, rank: int, instance: str, running: Generation) -> None:
        self.rank, self.instance, self.running = rank, instance, running

    def look(self, seen: Generation | None) -> Change:
        if seen is None:
            return Change.STALE  # unreadable: look again later
        change = follow(self.running, seen, self.rank, self.instance)
        if change is Change.RESTART:
            self.running = seen
        return change
