"""The member log and invites (`slurpfs.net.members`), between real keystores on disk."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from conftest import WEAK_KDF
from nacl.exceptions import CryptoError
from nacl.public import PublicKey, SealedBox

from slurpfs.crypto.keys import NodeIdentity
from slurpfs.crypto.keystore import Keystore
from slurpfs.errors import AccessDenied, AlreadyExists, ConfigError
from slurpfs.net import memberlog
from slurpfs.net import members as m
from slurpfs.net.members import Cluster, InvalidEntry, InviteRefused, Member

ROLES = ("architect", "developer")


def keystore(root: Path, name: str, passphrase: bytes | None = None) -> Keystore:
    keys = Keystore(root / name, passphrase, WEAK_KDF)
    keys.create(ROLES)
    return keys


def founded(root: Path, name: str = "a") -> tuple[Keystore, Cluster]:
    keys = keystore(root, name)
    return keys, Cluster.found(root / name, keys, [f"/ip4/127.0.0.1/tcp/{7400}"], name=name)


def joined(root: Path, inviter: Cluster, name: str) -> tuple[Keystore, Cluster]:
    """`name` joins through an invite of `inviter` (the handshake without the network)."""
    keys = keystore(root, name)
    token = m.Token.decode(inviter.invite().encode())
    me = Member(keys.load().node.node_id, (f"/ip4/127.0.0.2/tcp/{7400}",), name)
    answer = inviter.admit(m.join_request(keys.load().node, token, me))
    return keys, Cluster.adopt(root / name, keys, token.psk, m.decode_entries(answer))


def log_size(cluster: Cluster) -> int:
    return (cluster.dir / "members.log").stat().st_size


def test_a_joiner_gets_the_log_the_psk_and_the_role_public_keys(tmp_path: Path) -> None:
    a_keys, a = founded(tmp_path)
    b_keys, b = joined(tmp_path, a, "b")
    assert b.psk == a.psk
    assert len(a.psk) == 32
    assert b.digest() == a.digest()
    assert {x.name for x in a.members()} == {x.name for x in b.members()} == {"a", "b"}
    assert b.me().addrs == ("/ip4/127.0.0.2/tcp/7400",)
    a_ring, b_ring = a_keys.load(), b_keys.load()
    for role in ROLES:  # the cluster's keys replaced b's own, and b holds none of them yet
        assert b_ring.current_public(role) == a_ring.current_public(role)
    assert b_ring.held_roles() == frozenset()
    assert not list((tmp_path / "b" / "keys" / "roles").iterdir())
    assert a_ring.is_trusted(b_ring.node.node_id)
    assert b_ring.is_trusted(a_ring.node.node_id)
    for path in ("psk", "members.log", "invites"):
        assert (a.dir / path).stat().st_mode & 0o777 == 0o600
    assert a.dir.stat().st_mode & 0o777 == 0o700


def test_a_tampered_entry_is_refused_and_nothing_is_appended(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    _, b = joined(tmp_path, a, "b")
    b.set_settings(m.ClusterSettings(factor=2))
    entry = bytearray(b.entries()[-1])
    entry[-70] ^= 1  # a byte of the settings body
    before = log_size(a)
    with pytest.raises(InvalidEntry, match="does not verify"):
        a.merge([*b.entries()[:-1], bytes(entry)])
    assert log_size(a) == before
    assert a.settings() == m.ClusterSettings()


def test_an_entry_by_a_non_member_is_refused(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    _, b = joined(tmp_path, a, "b")
    stranger = NodeIdentity.generate()
    proof = b.state().adds[b.me().node_id]  # a real member's add, claimed by the stranger
    forged = m.Entry.make(
        stranger,
        m.Kind.SETTINGS,
        proof,
        m.hlc_now(),
        m.encode_settings(m.ClusterSettings(factor=1)),
    )
    before = log_size(a)
    with pytest.raises(InvalidEntry, match="not a member"):
        a.merge([forged.raw])
    own = m.Entry.make(
        stranger,
        m.Kind.ADD,
        bytes(32),
        m.hlc_now(),
        m.encode_add(Member(stranger.node_id, (), "x")),
    )
    with pytest.raises(InvalidEntry, match="another cluster"):
        a.merge([own.raw])
    with pytest.raises(InvalidEntry, match="not a member-log entry"):
        a.merge([b"SLMX" + own.raw[4:]])
    assert log_size(a) == before


def test_two_logs_merge_to_the_same_digest_in_either_order(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    _, b = joined(tmp_path, a, "b")
    _, c = joined(tmp_path, a, "c")
    b.merge(a.entries())
    b.set_settings(m.ClusterSettings(factor=3))  # b and c change the log concurrently
    c.update_me(["/ip4/127.0.0.3/tcp/7401"])
    assert b.digest() != c.digest()
    assert c.merge(b.entries())
    assert b.merge(c.entries())
    assert not b.merge(c.entries())  # nothing new: nothing changes
    assert b.digest() == c.digest()
    assert sorted(b.entries()) == sorted(c.entries())
    assert a.merge(c.entries())
    assert a.digest() == b.digest()
    assert b.settings().factor == 3
    assert a.find("c").addrs == ("/ip4/127.0.0.3/tcp/7401",)


def test_a_removed_node_is_never_added_again(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    b_keys, b = joined(tmp_path, a, "b")
    _, c = joined(tmp_path, a, "c")
    b_id = b.me().node_id
    cutoff = a.remove(b_id)
    assert b_id not in {x.node_id for x in a.members()}
    assert a.removed() == {b_id: cutoff}
    # c, not yet told, adds b again (b's address changed); removal wins either way round.
    with c._locked():
        c._sign(m.Kind.ADD, m.encode_add(Member(b_id, ("/ip4/10.0.0.9/tcp/1",), "b")))
    a2 = Cluster.load(tmp_path / "a", Keystore(tmp_path / "a", None, WEAK_KDF))
    assert a2 is not None
    a2.merge(c.entries())
    c.merge(a.entries())
    assert a2.digest() == c.digest()
    for cluster in (a2, c):
        assert b_id not in {x.node_id for x in cluster.members()}
        assert cluster.removed() == {b_id: cutoff}
    # Entries b signs after its cutoff do not count, and it cannot be invited back.
    b.set_settings(m.ClusterSettings(factor=1))
    assert not a2.merge(b.entries())
    assert a2.settings().factor is None
    token = a2.invite()
    request = m.join_request(b_keys.load().node, token, Member(b_id, (), "b"))
    with pytest.raises(InviteRefused, match="new node key"):
        a2.admit(request)
    assert b.merge(a2.entries())
    with pytest.raises(AccessDenied, match="removed"):
        b.me()


def test_an_invite_is_single_use_short_lived_and_needs_its_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, a = founded(tmp_path)
    keys = keystore(tmp_path, "b")
    node = keys.load().node
    me = Member(node.node_id, (), "b")
    assert not a.inviting()
    token = a.invite(ttl=60)
    assert a.inviting()
    assert token.secret.hex() not in (a.dir / "invites").read_text()  # only its hash is kept
    wrong = m.Token(token.psk, token.inviter, os.urandom(32), token.expires, token.addrs)
    with pytest.raises(InviteRefused, match="no such invite"):
        a.admit(m.join_request(node, wrong, me))
    # A request that claims b's key but is signed by another key.
    forged = m.join_request(NodeIdentity.generate(), token, me)
    with pytest.raises(InviteRefused, match="not signed by the key it claims"):
        a.admit(forged)
    a.admit(m.join_request(node, token, me))
    assert not a.inviting()
    with pytest.raises(InviteRefused, match="used already"):
        a.admit(m.join_request(node, token, me))
    late = a.invite(ttl=60)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)  # a minute later
    assert not a.inviting()
    other = NodeIdentity.generate()
    with pytest.raises(InviteRefused, match="expired"):
        a.admit(m.join_request(other, late, Member(other.node_id, (), "c")))


def test_a_token_round_trips_and_a_bad_one_is_a_clear_error(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    token = a.invite()
    assert m.Token.decode(token.encode()) == token
    assert token.addrs == ("/ip4/127.0.0.1/tcp/7400",)
    with pytest.raises(ConfigError, match="not a slurpfs invite token"):
        m.Token.decode(token.encode()[:-5])
    with pytest.raises(ConfigError, match="not a slurpfs invite token"):
        m.Token.decode("hello")


def test_a_grant_opens_only_on_its_node(tmp_path: Path) -> None:
    a_keys, a = founded(tmp_path)
    b_keys, b = joined(tmp_path, a, "b")
    c_keys, c = joined(tmp_path, a, "c")
    b.merge(a.entries())
    assert a.grant("developer", b.me().node_id) == 1
    assert b.merge(a.entries())
    assert c.merge(a.entries())
    assert b_keys.load().held_roles() == {"developer"}
    assert b_keys.load().private("developer", 1) is not None
    assert c_keys.load().held_roles() == frozenset()
    grant = next(e for e in a.state().grants)
    _, role, sealed = m.decode_grant(grant.body)
    c_node = c_keys.load().node
    with pytest.raises(CryptoError):  # the canary: c's key does not open b's grant
        SealedBox(c_node.signing_key.to_curve25519_private_key()).decrypt(sealed)
    assert a_keys.load().held_roles() == set(ROLES)


def test_a_grant_is_stored_under_the_passphrase(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    keys = keystore(tmp_path, "b", passphrase=b"secret words")
    token = a.invite()
    node = keys.load().node
    answer = a.admit(m.join_request(node, token, Member(node.node_id, (), "b")))
    b = Cluster.adopt(tmp_path / "b", keys, token.psk, m.decode_entries(answer))
    a.grant("architect", node.node_id)
    b.merge(a.entries())
    key_file = tmp_path / "b" / "keys" / "roles" / "architect.1.key"
    assert key_file.read_bytes()[4] == 1  # the passphrase mode
    assert Keystore(tmp_path / "b", b"secret words", WEAK_KDF).load().held_roles() == {"architect"}


def test_a_torn_last_append_is_ignored(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    digest = a.digest()
    with open(a.dir / "members.log", "ab") as f:
        f.write(struct.pack(">I", 500) + b"half an entry")
    again = Cluster.load(tmp_path / "a", Keystore(tmp_path / "a", None, WEAK_KDF))
    assert again is not None
    assert again.digest() == digest
    again.set_settings(m.ClusterSettings(partitions=64))  # the torn bytes go first
    last = Cluster.load(tmp_path / "a", Keystore(tmp_path / "a", None, WEAK_KDF))
    assert last is not None
    assert last.settings().partitions == 64


def test_on_a_clustered_node_the_log_decides_whom_to_trust(tmp_path: Path) -> None:
    a_keys, a = founded(tmp_path)
    _, b = joined(tmp_path, a, "b")
    stranger = NodeIdentity.generate().node_id
    a_keys.trust_node(stranger)  # trusted by hand, not a member
    assert a_keys.load().is_trusted(stranger)
    assert Cluster.load(tmp_path / "a", a_keys) is not None
    ring = a_keys.load()
    assert not ring.is_trusted(stranger)
    assert ring.is_trusted(b.me().node_id)


@pytest.mark.expect_warnings(r"grant entry \w+ is sealed to this node but does not open: skipped")
def test_a_grant_that_does_not_open_is_skipped_and_said(tmp_path: Path) -> None:
    _, a = founded(tmp_path)
    b_keys, b = joined(tmp_path, a, "b")
    b_id = b.me().node_id
    with a._locked():  # a member's broken grant: sealed to b, but not a grant inside
        sealed = SealedBox(PublicKey(m._x25519_public(b_id))).encrypt(b"not a grant")
        a._sign(m.Kind.GRANT, memberlog.encode_grant(b_id, "developer", bytes(sealed)))
    a.grant("architect", b_id)
    assert b.merge(a.entries())  # the rest of the log still applies
    assert b_keys.load().held_roles() == {"architect"}


def test_a_removal_rotates_the_cluster_key_sealed_to_the_remaining_members(
    tmp_path: Path,
) -> None:
    _, a = founded(tmp_path)
    _, b = joined(tmp_path, a, "b")
    _, c = joined(tmp_path, a, "c")
    _, d = joined(tmp_path, a, "d")
    for x in (b, c, d):
        x.merge(a.entries())
    old = a.psk
    a.remove(d.me().node_id)
    for x in (b, c, d):
        x.merge(a.entries())
    new = a.keys()
    assert new.current != old
    assert new.previous == (old,)
    assert b.keys() == c.keys() == new  # each opened its own share
    assert d.psk == old  # the removed node got no share: it knows only the old key
    # Two removals at once: b removes c while a (not yet knowing) had removed d;
    # the greater PSK entry holds, and it is sealed to a node removed since.
    _, e = joined(tmp_path, a, "e")
    b.merge(a.entries())
    c.merge(a.entries())
    a.remove(e.me().node_id)  # a seals its key to b and c
    b.remove(c.me().node_id)  # b, apart, seals its key to a and e
    a.merge(b.entries())
    b.merge(a.entries())
    assert a.digest() == b.digest()
    assert a.psk == b.psk
    holder = a.state().psk
    assert holder is not None
    sealed_to = set(memberlog.decode_psk(holder.body)[2])
    assert sealed_to & set(a.removed())  # the key in force reached a removed node
    assert a.heal_psk()  # so a member rotates it again, sealed to the members only
    b.merge(a.entries())
    assert not b.heal_psk()
    holder = b.state().psk
    assert holder is not None
    assert set(memberlog.decode_psk(holder.body)[2]) == {a.me().node_id, b.me().node_id}
    assert a.psk == b.psk
    assert a.psk not in (old, new.current)


@pytest.mark.expect_warnings(
    r"role 'ops' generation 1 was added on another member at the same time.*"
)
def test_a_role_added_on_two_members_at_once_keeps_the_earliest_key(tmp_path: Path) -> None:
    """Both publish generation 1 of ``ops`` before hearing of the other: every log
    keeps the earliest entry's key; the node whose key lost takes it (its own is
    set aside, not destroyed), keeps loading its cluster, and holds the role once
    the winner grants it."""
    a_keys, a = founded(tmp_path)
    b_keys, b = joined(tmp_path, a, "b")
    for keys, cluster in ((a_keys, a), (b_keys, b)):
        public = keys.add_role("ops").current_public("ops")
        cluster.publish_role_key("ops", public.generation, public.public)
    winner = a_keys.load().current_public("ops").public  # a's entry is the earlier
    lost = b_keys.load().current_public("ops").public
    assert winner != lost

    b.merge(a.entries())
    a.merge(b.entries())

    assert a.digest() == b.digest()
    assert a.role_keys()["ops"] == b.role_keys()["ops"] == {1: winner}
    assert Cluster.load(tmp_path / "b", b_keys) is not None  # b still loads its cluster
    b_ring = b_keys.load()
    assert b_ring.current_public("ops").public == winner
    assert "ops" not in b_ring.held_roles()
    (aside,) = (tmp_path / "b" / "keys" / "superseded").iterdir()  # kept, not destroyed
    assert aside.name.startswith("ops.1.")
    assert a_keys.load().current_public("ops").public == winner  # a is untouched
    a.grant("ops", b.me().node_id)
    b.merge(a.entries())
    assert "ops" in b_keys.load().held_roles()
    with pytest.raises(AlreadyExists):  # and adds it no more: the log's key is known here
        b_keys.add_role("ops")


def test_a_node_that_joins_during_a_removal_elsewhere_is_sealed_the_new_key(
    tmp_path: Path,
) -> None:
    _, a = founded(tmp_path)
    _, b = joined(tmp_path, a, "b")
    _, c = joined(tmp_path, a, "c")
    b.merge(a.entries())
    _, j = joined(tmp_path, a, "j")  # a admits j (j knows the key of a's token)...
    b.remove(c.me().node_id)  # ...while b, not knowing j, removes c: a key sealed to a and b
    a.merge(b.entries())
    b.merge(a.entries())
    assert a.psk == b.psk != j.psk
    assert a.heal_psk()  # a holds the key in force and j has no share of it: a seals one
    assert not a.heal_psk()
    j.merge(a.entries())
    assert j.psk == a.psk
    b.merge(a.entries())
    assert not b.heal_psk()
