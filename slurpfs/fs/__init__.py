"""The filesystem: a thin pyfuse3 adapter over the context model.

Modules, bottom up:

- `inodes`: the one inode table (kernel lookup counts, stable numbers, forget).
- `scratch`: memory-only scratch files and the per-directory editor overlay.
- `handles`: open file and directory handles; write buffers that commit one
  version on flush.
- `access`: which roles the calling uid/gid/groups hold.
- `virtual`: the read-only status files under ``.slurp/``.
- `search`: ``.search/``, where every name is a query run for the caller's roles.
- `errmap`: domain errors to errno, in one place.
- `invalidate`: keeps the kernel's caches honest when contexts change underneath.
- `ops`: the `pyfuse3.Operations` subclass that ties them together.
"""
