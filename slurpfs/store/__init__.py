"""The LMDB-backed version store."""

from slurpfs.store.lmdb_store import Commit, StaleHead, Store, StoredVersion, StoreStatistics
from slurpfs.store.schema import VersionRecord

__all__ = ["Commit", "StaleHead", "Store", "StoreStatistics", "StoredVersion", "VersionRecord"]
