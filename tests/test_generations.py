"""The generation protocol of a cluster whose nodes are replaced (userdata/generations.py)."""

from __future__ import annotations

import pytest

from userdata.generations import Change, Follower, Generation, follow, next_generation

G1 = Generation(1, ("i-0", "i-1", "i-2"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("i-0,i-1", Generation(0, ("i-0", "i-1"))),  # CloudFormation's, the instance shape
        ("3:i-0,i-1", Generation(3, ("i-0", "i-1"))),
        (" 12:i-0 ", Generation(12, ("i-0",))),
        ("x:i-0", None),
        ("3:", None),
        ("3:i-0,,i-2", None),
        ("", None),
    ],
)
def test_members_decode_as_a_generation(value: str, expected: Generation | None) -> None:
    assert Generation.decode(value) == expected
    if expected:
        assert Generation.decode(expected.encode()) == expected


def test_node_0_publishes_a_generation_only_when_every_rank_has_an_instance_and_one_changed() -> (
    None
):
    assert next_generation(None, ["i-0", "i-1", "i-2"]) == G1
    assert next_generation(G1, ["i-0", "i-1", "i-2"]) is None  # nothing changed
    assert next_generation(G1, ["i-0", None, "i-2"]) is None  # rank 1's replacement launching
    assert next_generation(G1, ["i-0", "i-1b", "i-2"]) == Generation(2, ("i-0", "i-1b", "i-2"))


def test_two_replacements_seen_at_once_are_one_generation_and_one_restart() -> None:
    both = next_generation(G1, ["i-0", "i-1b", "i-2b"])
    assert both == Generation(2, ("i-0", "i-1b", "i-2b"))
    survivor = Follower(0, "i-0", G1)
    assert survivor.look(both) is Change.RESTART
    assert survivor.look(both) is Change.SAME  # read again on the next look: one restart


def test_a_stale_generation_is_ignored() -> None:
    g3 = Generation(3, ("i-0", "i-1c", "i-2"))
    node = Follower(2, "i-2", g3)
    assert node.look(Generation(2, ("i-0", "i-1b", "i-2"))) is Change.STALE
    assert node.look(G1) is Change.STALE
    assert node.look(None) is Change.STALE
    assert node.running == g3


def test_a_replaced_node_stops_and_the_others_restart() -> None:
    g2 = next_generation(G1, ["i-0b", "i-1", "i-2"])  # node 0 itself replaced
    assert g2 is not None
    assert follow(G1, g2, 0, "i-0") is Change.REPLACED  # the old node 0
    assert follow(G1, g2, 1, "i-1") is Change.RESTART
    assert follow(G1, g2, 0, "i-0b") is Change.RESTART  # the new node 0 joins
    # An old generation that still names this instance's rank for another instance: stale.
    assert follow(g2, G1, 0, "i-0b") is Change.STALE


def test_a_replacement_during_a_restart_starts_once_in_the_newest_generation() -> None:
    node = Follower(2, "i-2", G1)
    g2 = Generation(2, ("i-0", "i-1b", "i-2"))
    g3 = Generation(3, ("i-0b", "i-1b", "i-2"))  # node 0 reclaimed while the cluster restarts
    assert node.look(g2) is Change.RESTART  # fabric run stopped for generation 2
    assert node.look(g3) is Change.RESTART  # before it starts again: generation 3 instead
    assert node.running == g3
    assert node.look(g2) is Change.STALE  # generation 2's late read changes nothing


def test_a_lost_node_makes_a_pending_generation_and_its_replacement_a_complete_one() -> None:
    from userdata.generations import MISSING, watched_generation

    pending = watched_generation(G1, ["i-0", None, "i-2"])  # rank 1 reclaimed, none yet
    assert pending == Generation(2, ("i-0", MISSING, "i-2")) and not pending.complete
    assert Generation.decode(pending.encode()) == pending
    assert watched_generation(pending, ["i-0", None, "i-2"]) is None  # told once
    complete = watched_generation(pending, ["i-0", "i-1b", "i-2"])
    assert complete == Generation(3, ("i-0", "i-1b", "i-2")) and complete.complete
    survivor = Follower(2, "i-2", G1)
    assert survivor.look(pending) is Change.RESTART  # stop now, wait for a complete one
    assert survivor.look(complete) is Change.RESTART
    assert follow(G1, pending, 1, "i-1") is Change.REPLACED  # the lost node, if it still runs
    assert Generation.decode("4:-,-") is None
