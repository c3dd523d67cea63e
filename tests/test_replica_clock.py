"""What a peer's clock may do to this node's: a version stamped an hour ahead is
kept, a local save on top of it comes after it, but the local clock does not
follow it: saves of other contexts stay near this node's wall clock."""

from __future__ import annotations

import time

from conftest import Nodes, twin
from test_ingest import ADDR, DEV, everything

from slurpfs import hlc
from slurpfs.ingest import Ingest
from slurpfs.model import DEFAULT_CLOCK_AHEAD_MS
from slurpfs.ucxl import parse

HOUR_NS = 3600 * 10**9
OTHER = parse("ucxl://claude:architect@bzzz:auth/src/other.go")


def test_a_leaf_from_a_fast_clock_does_not_drag_the_local_clock(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    a_model._clock = hlc.HybridClock(lambda: time.time_ns() + HOUR_NS)  # an hour ahead
    ahead = a_model.put(ADDR, DEV, b"from the future\n")
    _, b_model = twin(nodes, a, a_model)

    stored = Ingest(b_model).accept(everything(a_model)).stored
    assert [v.version_id for v in stored] == [ahead.version_id]  # kept, never dropped
    assert b_model.get(ADDR, DEV).data == b"from the future\n"

    mine = b_model.put(ADDR, DEV, b"saved here\n")
    assert mine.parents == (ahead.version_id,)  # it replaces the leaf, as any save
    assert mine.hlc > ahead.hlc  # and comes after it
    assert b_model.get(ADDR, DEV).data == b"saved here\n"
    elsewhere = b_model.put(OTHER, DEV, b"another context\n")
    assert hlc.physical_ms(elsewhere.hlc) <= time.time() * 1000 + DEFAULT_CLOCK_AHEAD_MS
