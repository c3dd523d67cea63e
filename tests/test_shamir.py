"""Shamir sharing of role private keys: k of n recombine, k-1 do not."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey

from slurpfs.crypto.keys import RoleKeyPair
from slurpfs.crypto.shamir import combine, split


def test_any_k_of_n_recombine_and_k_minus_1_do_not() -> None:
    secret = os.urandom(32)
    shares = split(secret, 3, 5)
    assert len(shares) == 5
    assert all(len(s) == 33 for s in shares)
    assert sorted(s[0] for s in shares) == [1, 2, 3, 4, 5]
    for r in range(3, 6):
        for subset in itertools.permutations(shares, r):
            assert combine(subset) == secret
    for subset in itertools.combinations(shares, 2):
        assert combine(subset) != secret


def test_role_key_recovery() -> None:
    pair = RoleKeyPair.generate("architect", 3)
    shares = split(bytes(pair.private), 2, 3)
    recovered = RoleKeyPair("architect", 3, PrivateKey(combine([shares[2], shares[0]])))
    assert recovered.public == pair.public


def test_shares_are_fresh_randomness() -> None:
    secret = bytes(32)
    assert split(secret, 2, 2) != split(secret, 2, 2)
    # a single share of an all-zero secret looks nothing like it
    assert split(secret, 2, 2)[0][1:] != secret


def test_k_minus_1_shares_are_consistent_with_every_secret() -> None:
    """Perfect secrecy for one byte: one share of a 2-of-n split fits any secret."""
    share = split(b"\x2a", 2, 3)[0]
    candidates = set()
    for other_y in range(256):  # every possible second share at x=2
        candidates.add(combine([share, bytes([2, other_y])]))
    assert len(candidates) == 256


def test_max_shares() -> None:
    secret = os.urandom(32)
    shares = split(secret, 2, 255)
    assert combine([shares[0], shares[254]]) == secret


@given(
    secret=st.binary(min_size=1, max_size=40),
    k=st.integers(2, 8),
    extra=st.integers(0, 6),
    data=st.data(),
)
def test_property_roundtrip(secret: bytes, k: int, extra: int, data: st.DataObject) -> None:
    shares = split(secret, k, k + extra)
    chosen = data.draw(st.permutations(shares))[:k]
    assert combine(chosen) == secret


@pytest.mark.parametrize(
    ("k", "n"),
    [(1, 3), (0, 3), (4, 3), (2, 256)],
)
def test_split_rejects_bad_parameters(k: int, n: int) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by parameter
        split(os.urandom(32), k, n)


def test_split_rejects_empty_secret() -> None:
    with pytest.raises(ValueError, match="empty"):
        split(b"", 2, 3)


def test_combine_rejects_bad_shares() -> None:
    shares = split(os.urandom(32), 2, 3)
    with pytest.raises(ValueError, match="at least 2"):
        combine(shares[:1])
    with pytest.raises(ValueError, match="duplicate"):
        combine([shares[0], shares[0]])
    with pytest.raises(ValueError, match="inconsistent"):
        combine([shares[0], shares[1][:-1]])
    with pytest.raises(ValueError, match="index 0"):
        combine([b"\x00" + shares[0][1:], shares[1]])
