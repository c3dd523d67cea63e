"""Versions made on one node enter another through `slurpfs.ingest` (no network:
the envelopes are handed over as a peer or a restore would hand them)."""

from __future__ import annotations

import pytest
from conftest import WEAK_KDF, Nodes, twin

from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import BadSignature, Corrupt, UntrustedAuthor
from slurpfs.ingest import Incoming, Ingest, MissingParents, RemovedAuthor
from slurpfs.model import ContextStore, VersionInfo
from slurpfs.net import members
from slurpfs.net.members import Cluster
from slurpfs.ucxl import parse

ADDR = parse("ucxl://claude:architect@bzzz:auth/src/auth.go")
DEV = "developer"


def shipped(model: ContextStore, *infos: VersionInfo) -> list[Incoming]:
    """The versions as a peer would send them: id, envelope, key slots."""
    out = []
    for info in infos:
        stored = model.store.read_version(info.version_id)
        assert stored is not None
        out.append(Incoming(info.version_id, stored.envelope, stored.slots))
    return out


def everything(model: ContextStore) -> list[Incoming]:
    return shipped(model, *model.all_versions(ADDR, DEV))


def test_versions_from_another_node_read_the_same_here(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    a_model.put(ADDR, DEV, b"first\n")
    a_model.put(ADDR, DEV, b"second\n")
    a_model.delete(ADDR, DEV)
    a_model.put(ADDR, DEV, b"third\n")
    _, b_model = twin(nodes, a, a_model)
    heard: list[VersionInfo] = []
    b_model.subscribe(heard.append)

    report = Ingest(b_model).accept(everything(a_model))

    assert len(report.stored) == 4
    assert report.known == 0
    assert [v.version_id for v in heard] == [r.version_id for r in report.stored]
    assert b_model.get(ADDR, DEV).data == b"third\n"
    assert b_model.stat(ADDR, DEV) == a_model.stat(ADDR, DEV)
    assert [v.version_id for v in b_model.history(ADDR, DEV)] == [
        v.version_id for v in a_model.history(ADDR, DEV)
    ]
    # a second delivery (a retry, a peer that missed the acknowledgement) stores nothing
    again = Ingest(b_model).accept(everything(a_model))
    assert (again.stored, again.known) == ((), 4)


def test_a_version_whose_parents_are_missing_is_refused_until_they_come(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    first = a_model.put(ADDR, DEV, b"first\n")
    second = a_model.put(ADDR, DEV, b"second\n")
    _, b_model = twin(nodes, a, a_model)
    ingest = Ingest(b_model)

    with pytest.raises(MissingParents) as refused:
        ingest.accept(shipped(a_model, second))
    assert refused.value.missing == (first.version_id,)
    assert b_model.store.record(second.version_id) is None  # nothing stored

    # the parent first, in the same batch: both go in, and the head is the child
    ingest.accept(shipped(a_model, first, second))
    assert b_model.get(ADDR, DEV).data == b"second\n"
    assert [v.version_id for v in b_model.all_versions(ADDR, DEV)] == [
        first.version_id,
        second.version_id,
    ]


def test_an_untrusted_author_is_refused(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    a_model.put(ADDR, DEV, b"from a node nobody trusts\n")
    _, b_model = twin(nodes, a, a_model, trust=False)

    with pytest.raises(UntrustedAuthor):
        Ingest(b_model).accept(everything(a_model))
    assert b_model.all_versions(ADDR, DEV) == ()


def test_a_damaged_or_forged_envelope_is_refused_and_the_batch_with_it(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    first = a_model.put(ADDR, DEV, b"first\n")
    second = a_model.put(ADDR, DEV, b"second\n")
    _, b_model = twin(nodes, a, a_model)
    good, bad = shipped(a_model, first, second)
    flipped = bytearray(bad.envelope)
    flipped[-1] ^= 1  # a byte of the signature

    # the envelope no longer hashes to the id it came with
    with pytest.raises(Corrupt, match="does not hash to its id"):
        Ingest(b_model).accept([good, Incoming(bad.version_id, bytes(flipped), bad.slots)])
    # ... and with an id made to match, the signature fails
    forged = Incoming(_id(bytes(flipped)), bytes(flipped), bad.slots)
    with pytest.raises(BadSignature):
        Ingest(b_model).accept([good, forged])
    assert b_model.all_versions(ADDR, DEV) == ()  # the good one went nowhere either


def test_a_key_slot_for_a_role_that_does_not_read_it_is_refused(nodes: Nodes) -> None:
    a, a_model = nodes.new("a")
    a_model.put(ADDR, DEV, b"for developers\n")
    _, b_model = twin(nodes, a, a_model)
    (item,) = everything(a_model)
    reviewer = [s for s in item.slots if s.role == "architect"][0]
    odd = Incoming(
        item.version_id,
        item.envelope,
        (*item.slots, type(reviewer)("reviewer", 1, reviewer.sealed)),
    )

    with pytest.raises(Corrupt, match="a key slot for 'reviewer', not a reader"):
        Ingest(b_model).accept([odd])


def test_concurrent_versions_give_both_nodes_the_same_head_and_conflict(nodes: Nodes) -> None:
    # Both nodes write on the same parent while apart, then exchange what they wrote.
    a, a_model = nodes.new("a")
    base = a_model.put(ADDR, DEV, b"base\n")
    _, b_model = twin(nodes, a, a_model)
    Keystore(a.data_dir, None, WEAK_KDF).trust_node(b_model.keyring.node.node_id)
    a_model = a.reopen(a_model)  # (the keyring is read at open)
    Ingest(b_model).accept(shipped(a_model, base))
    on_a = a_model.put(ADDR, DEV, b"written on a\n")
    on_b = b_model.put(ADDR, DEV, b"written on b\n")

    Ingest(a_model).accept(shipped(b_model, on_b))
    Ingest(b_model).accept(shipped(a_model, on_a))

    assert a_model.stat(ADDR, DEV) == b_model.stat(ADDR, DEV)
    assert a_model.get(ADDR, DEV).data == b_model.get(ADDR, DEV).data
    assert a_model.conflicts(ADDR, DEV) == b_model.conflicts(ADDR, DEV)
    assert len(a_model.conflicts(ADDR, DEV)) == 1
    # a save after the exchange builds on what it saw, on either node
    after = b_model.put(ADDR, DEV, b"after\n")
    assert after.hlc > max(on_a.hlc, on_b.hlc)


def _id(envelope: bytes) -> bytes:
    from slurpfs.crypto.envelope import blake2b_256

    return blake2b_256(envelope)


def test_cluster_members_are_trusted_and_a_removed_one_only_up_to_its_cutoff(
    nodes: Nodes,
) -> None:
    a, a_model = nodes.new("a")
    b, b_model = nodes.new("b")
    a.close(a_model)
    b.close(b_model)
    a_keys, b_keys = (Keystore(n.data_dir, None, WEAK_KDF) for n in (a, b))
    cluster = Cluster.found(a.data_dir, a_keys, ["/ip4/127.0.0.1/tcp/7400"], name="a")
    token = cluster.invite()
    b_node = b_keys.load().node
    request = members.join_request(b_node, token, members.Member(b_node.node_id, (), "b"))
    answer = cluster.admit(request)
    Cluster.adopt(b.data_dir, b_keys, token.psk, members.decode_entries(answer))
    a_model, b_model = a.open(), b.open()  # (their keyrings now follow the log)
    assert a_model.keyring.is_trusted(b_node.node_id)  # a member: no trust_node call
    before = b_model.put(ADDR, DEV, b"written while a member\n")
    cutoff = cluster.remove(b_node.node_id)
    after = b_model.put(ADDR, DEV, b"written after the removal\n")
    assert before.hlc <= cutoff < after.hlc
    ingest = Ingest(a_model, cluster.removed)
    assert [r.version_id for r in ingest.accept(shipped(b_model, before)).stored] == [
        before.version_id
    ]
    with pytest.raises(RemovedAuthor, match="removed from the cluster"):
        ingest.accept(shipped(b_model, after))
    assert a_model.store.record(after.version_id) is None
    assert a_model.get(ADDR, DEV).data == b"written while a member\n"
