"""Modules of `scripts/bench`: the corpus, the timing helpers and one module per section."""
