"""Caches: in-memory plaintext LRU (and later a Redis tier for envelopes)."""
