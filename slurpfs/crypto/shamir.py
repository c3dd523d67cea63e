"""Shamir secret sharing over GF(2^8), for splitting a role private key k-of-n.

Each byte of the secret is the constant term of its own random polynomial of degree
k-1 (coefficients from :mod:`secrets`); share *i* (1..n) is ``bytes([i])`` followed by
every polynomial evaluated at x = i. Any k shares recombine by Lagrange interpolation
at x = 0; fewer than k reveal nothing about the secret (every value is equally
likely). Recombining a wrong or insufficient set of shares yields a wrong value,
not an error: check the result (e.g. that its public key matches the role's).

The field is GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1. Arithmetic
uses log/exp tables; the table lookups are not constant time, which is acceptable
for an offline recovery tool but not for a network-facing service.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

_EXP = [0] * 510
_LOG = [0] * 256


def _init_tables() -> None:
    x = 1
    for i in range(255):
        _EXP[i] = _EXP[i + 255] = x
        _LOG[x] = i
        # multiply by the generator 3: x*2 (reduced mod the AES polynomial) xor x
        x2 = (x << 1) ^ (0x11B if x & 0x80 else 0)
        x = x2 ^ x


_init_tables()


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _div(a: int, b: int) -> int:
    if a == 0:
        return 0
    return _EXP[_LOG[a] + 255 - _LOG[b]]


def split(secret: bytes, k: int, n: int) -> list[bytes]:
    """Split ``secret`` into ``n`` shares, any ``k`` of which recombine it.

    Each share is one index byte (1..n) followed by ``len(secret)`` bytes.
    ``ValueError`` unless 2 <= k <= n <= 255 and the secret is non-empty.
    """
    if not secret:
        raise ValueError("secret is empty")
    if k < 2:
        raise ValueError("threshold k must be at least 2")
    if k > n:
        raise ValueError("threshold k must not exceed the number of shares n")
    if n > 255:
        raise ValueError("at most 255 shares")
    # coeffs[j] holds the degree-(j+1) coefficient for every secret byte
    coeffs = [secrets.token_bytes(len(secret)) for _ in range(k - 1)]
    shares = []
    for x in range(1, n + 1):
        out = bytearray([x])
        for pos, s in enumerate(secret):
            y = 0
            for c in reversed(coeffs):  # Horner: ((c_{k-1} x + ...) x + c_1) x + s
                y = _mul(y ^ c[pos], x)
            out.append(y ^ s)
        shares.append(bytes(out))
    return shares


def combine(shares: Sequence[bytes]) -> bytes:
    """Recombine a secret from shares made by :func:`split`.

    ``ValueError`` for fewer than 2 shares, shares of different or too-short
    lengths, an index of 0, or a repeated index. Cannot detect a set smaller than
    the threshold: that yields a wrong secret (see the module docstring).
    """
    if len(shares) < 2:
        raise ValueError("need at least 2 shares")
    length = len(shares[0])
    if length < 2 or any(len(s) != length for s in shares):
        raise ValueError("shares have inconsistent or too short lengths")
    xs = [s[0] for s in shares]
    if 0 in xs:
        raise ValueError("share index 0 is invalid")
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate share indices")
    # Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); subtraction is xor.
    basis = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = _mul(num, xj)
                den = _mul(den, xj ^ xi)
        basis.append(_div(num, den))
    secret = bytearray(length - 1)
    for share, li in zip(shares, basis, strict=True):
        for pos in range(length - 1):
            secret[pos] ^= _mul(share[pos + 1], li)
    return bytes(secret)
