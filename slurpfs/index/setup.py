"""What an engine is given to open or create one role's index.

Engines never touch the model: whatever they need from the node arrives here,
as plain values and callables the search service provides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slurpfs.index.sealed import SealedIndexStore

TextLoader = Callable[[str, str, str], str | None]
"""(address key, file role, hex version id) -> the body text that version's document
was indexed from (plaintext, memory only), or None when it cannot be read."""


def no_text(address: str, file_role: str, version: str) -> str | None:
    """A `TextLoader` with nothing to load (fsck: no snippets are cut)."""
    return None


@dataclass(frozen=True, slots=True)
class EngineSetup:
    sealed: SealedIndexStore  # the role's manifest (and sealed files) in the store
    directory: Path  # where an engine may keep files of its own: encrypted ones only
    cache_bytes: int  # memory this role index may keep as cache (`search.cache_bytes` split)
    text: TextLoader = no_text
