"""Configuration: one TOML file plus ``SLURPFS_*`` overrides, into a frozen object.

Precedence: command line > environment > file > default. Unknown keys and bad
values raise `ConfigError` naming the key. Nothing else in slurpfs reads
``os.environ``: callers pass the environment in.

Every number has bounds (`_bounded`): finite, within a range the code is known to
work in, so ``nan``, ``inf`` or an integer past what LMDB takes stops the command
at start.

File layout::

    [node]        data_dir, name
    [durability]  sync_interval, write_behind, commit_delay
    [store]       map_size, max_context_bytes, cascade_depth
    [cache]       plaintext_bytes, redis_url, redis_password_file, redis_ttl, redis_timeout
    [mount]       entry_timeout, attr_timeout, scratch_bytes, allow_other, busy_poll,
                  scratch_names
    [search]      engine, cache_bytes
    [http]        listen (HOST:PORT, [IPv6]:PORT or localhost:PORT; port 0 = any free one; off)
    [health]      min_free_bytes
    [log]         format (text or json)
    [replication] listen, write_quorum, quorum_timeout, down_after, auto_merge
    [backup]      dest, schedule (cron), keep_daily, keep_weekly, keep_monthly
    [retention]   keep_versions, keep_days (per context)
    [compaction]  free_threshold, schedule (cron)
    [roles.NAME]  readers, users, groups

Without a ``[roles]`` table the roles are those the data directory holds keys for
(``slurpfs init`` made them), or the three defaults in a new one.

Environment keys are ``SLURPFS_<SECTION>_<KEY>`` (``SLURPFS_DURABILITY_SYNC_INTERVAL=0.5``);
lists are comma separated. ``SLURPFS_CONFIG`` names the file and
``SLURPFS_PASSPHRASE`` carries the key passphrase (read by the CLI, never stored).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import tomllib
import typing
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from croniter import croniter

from slurpfs.errors import ConfigError

log = logging.getLogger("slurpfs.config")
N = TypeVar("N", int, float)
MAX_BUSY_POLL = 0.1  # seconds: past this, polling is spinning
SEARCH_ENGINES = ("sqlite", "whoosh", "tantivy")
LOG_FORMATS = ("text", "json")  # `slurpfs.logs` writes them
MIN_SEARCH_CACHE, MAX_SEARCH_CACHE = 1 << 20, 1 << 40
ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    # role -> roles that may also read its contexts
    "developer": ("architect",),
    "reviewer": ("architect",),
    "architect": (),
}


def _bounded(default: N, low: N, high: N) -> N:
    """A numeric field that must lie in [low, high] (which also refuses nan and inf)."""
    return dataclasses.field(default=default, metadata={"bounds": (low, high)})


def default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME", "/root")) / ".local/share")
    return Path(base) / "slurpfs"


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    data_dir: str = ""
    name: str = "node"


@dataclasses.dataclass(frozen=True)
class DurabilityConfig:
    sync_interval: float = _bounded(1.0, 0.001, 3600.0)
    write_behind: bool = True  # acknowledge close once the save is in the journal
    commit_delay: float = _bounded(0.01, 0.0, 60.0)  # seconds a journaled save waits


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    map_size: int = _bounded(8 << 30, 1 << 20, 1 << 44)  # LMDB reserves it as address space
    max_context_bytes: int = _bounded(256 << 20, 1, 1 << 32)
    cascade_depth: int = _bounded(8, 0, 64)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    plaintext_bytes: int = _bounded(64 << 20, 0, 1 << 40)
    # The Redis tier of envelopes (`slurpfs.cache.redis_tier`): off when empty.
    # redis://[user@]host:port/db, rediss://... (TLS) or unix:///path; no password here.
    redis_url: str = ""
    redis_password_file: str = ""  # the ACL user's password, first line of this file
    redis_ttl: float = _bounded(86400.0, 1.0, 365 * 86400.0)  # seconds, refreshed on each hit
    redis_timeout: float = _bounded(0.5, 0.01, 60.0)  # seconds per call before it counts as down


@dataclasses.dataclass(frozen=True)
class MountConfig:
    entry_timeout: float = _bounded(60.0, 0.0, 86400.0)
    attr_timeout: float = _bounded(60.0, 0.0, 86400.0)
    scratch_bytes: int = _bounded(256 << 20, 0, 1 << 40)
    allow_other: bool = False
    # Seconds the FUSE loop keeps polling for the next request before it sleeps
    # (`slurpfs.fs.busypoll`); 0 turns it off.
    busy_poll: float = _bounded(0.001, 0.0, MAX_BUSY_POLL)
    # Glob patterns of more temporary file names, beside the built-in ones
    # (`slurpfs.fs.scratch`): files so named are kept in memory only.
    scratch_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    engine: str = "sqlite"  # or "whoosh", "tantivy"
    # Memory the search indexes may keep as cache, shared by the role indexes
    # (the sqlite engine's page caches); the index itself is read on demand.
    cache_bytes: int = _bounded(64 << 20, MIN_SEARCH_CACHE, MAX_SEARCH_CACHE)


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:0"

    @property
    def address(self) -> ListenAddress | None:
        """Where the HTTP endpoints listen; None when ``off``. (Checked at load.)"""
        return parse_listen(self.listen, "http.listen")


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    min_free_bytes: int = _bounded(1 << 30, 0, 1 << 60)  # the disk check fails below this


@dataclasses.dataclass(frozen=True, slots=True)
class ListenAddress:
    """A parsed ``http.listen``: an IP address literal and a port (0: any free port)."""

    host: str
    port: int

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.ipv6 else f"{self.host}:{self.port}"


_PORT = re.compile(r"[0-9]{1,5}")


def parse_listen(value: str, key: str) -> ListenAddress | None:
    """``HOST:PORT`` (IPv4), ``[IPv6]:PORT`` or ``localhost:PORT`` -> address; ``off`` -> None.

    Host names other than ``localhost`` are refused: a listening address should
    not depend on name resolution (and ``localhost`` would resolve to two
    addresses, each with its own port when the port is 0). `key` names the
    setting in the `ConfigError`.
    """
    text = value.strip()
    if text.lower() == "off":
        return None
    expected = (
        f"{key}: expected HOST:PORT (an IPv4 address, [an IPv6 address] or localhost;"
        f" port 0-65535, 0 for any free port) or off, got {value!r}"
    )
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        family: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv6Address
    else:
        host, sep, port = text.rpartition(":")
        family = ipaddress.IPv4Address
        if host.lower() == "localhost":
            host = "127.0.0.1"  # the one loopback address every host has
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        raise ConfigError(expected)
    try:
        address = family(host)
    except ValueError:
        raise ConfigError(expected) from None
    return ListenAddress(str(address), int(port))


@dataclasses.dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # or "json": one object per line (`slurpfs.logs`)


@dataclasses.dataclass(frozen=True)
class ReplicationConfig:
    # A libp2p multiaddr the replication worker listens on; empty: the address
    # this node has in its cluster's member log (`slurpfs peers invite --listen`).
    listen: str = ""
    # Peers that must acknowledge a written file before its fsync or close
    # returns (0: none, the default; writes never wait for a peer).
    write_quorum: int = _bounded(0, 0, 64)
    quorum_timeout: float = _bounded(10.0, 0.1, 3600.0)  # seconds; then EIO
    # Seconds a member may be down before the `peers` health check fails.
    down_after: float = _bounded(600.0, 1.0, 30 * 86400.0)
    # Merge concurrent text versions whose changes do not overlap (`slurpfs.net.merge`).
    auto_merge: bool = True


@dataclasses.dataclass(frozen=True)
class BackupConfig:
    dest: str = ""  # where scheduled backups go
    schedule: str = ""  # a cron expression (croniter), "" = none
    keep_daily: int = _bounded(7, 0, 100_000)
    keep_weekly: int = _bounded(4, 0, 100_000)
    keep_monthly: int = _bounded(6, 0, 100_000)


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    keep_versions: int = _bounded(0, 0, 1 << 31)  # per context; 0 with keep_days 0 = keep all
    keep_days: float = _bounded(0.0, 0.0, 365_000.0)


@dataclasses.dataclass(frozen=True)
class CompactionConfig:
    free_threshold: int = _bounded(64 << 20, 0, 1 << 44)  # copy when this much is free
    schedule: str = ""  # a cron expression for the mount's compaction worker


@dataclasses.dataclass(frozen=True)
class RoleConfig:
    """A role: who else reads its contexts, and which unix users/groups hold it."""

    name: str
    readers: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


# Environment variables that are not configuration keys.
_NON_CONFIG_ENV = frozenset(
    {"SLURPFS_CONFIG", "SLURPFS_PASSPHRASE", "SLURPFS_PASSPHRASE_FILE", "SLURPFS_TEST_WEAK_KDF"}
)

_SECTIONS: dict[str, type[Any]] = {
    "node": NodeConfig,
    "durability": DurabilityConfig,
    "store": StoreConfig,
    "cache": CacheConfig,
    "mount": MountConfig,
    "search": SearchConfig,
    "http": HttpConfig,
    "health": HealthConfig,
    "log": LogConfig,
    "replication": ReplicationConfig,
    "backup": BackupConfig,
    "retention": RetentionConfig,
    "compaction": CompactionConfig,
}


@dataclasses.dataclass(frozen=True)
class Config:
    node: NodeConfig
    durability: DurabilityConfig
    store: StoreConfig
    cache: CacheConfig
    mount: MountConfig
    search: SearchConfig
    http: HttpConfig
    health: HealthConfig
    log: LogConfig
    replication: ReplicationConfig
    backup: BackupConfig
    retention: RetentionConfig
    compaction: CompactionConfig
    roles: Mapping[str, RoleConfig]
    source: str = "<defaults>"

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.roles))

    def readers_of(self, role: str) -> tuple[str, ...]:
        """Every role an envelope written for `role` is sealed to: itself first."""
        return (role, *(r for r in self.roles[role].readers if r != role))

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


def _coerce(key: str, value: Any, typ: Any, *, from_env: bool) -> Any:
    """Check or convert one value to the field's type; ConfigError names the key."""
    if typ is bool:
        if from_env and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if from_env and isinstance(value, str):
            try:
                return int(value.strip(), 0)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if from_env and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer past any float
                raise ConfigError(f"{key}: {value} is out of range") from None
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typing.get_origin(typ) is tuple:
        if from_env and isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        # (a tuple: the environment's value, converted before the section is built)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    raise AssertionError(f"unsupported config type {typ!r}")  # pragma: no cover


def _build(cls: type[Any], key: str, table: Mapping[str, Any], **extra: Any) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)} - set(extra)
    unknown = sorted(set(table) - fields)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    values = {
        name: _coerce(f"{key}.{name}", value, hints[name], from_env=False)
        for name, value in table.items()
    }
    return cls(**values, **extra)


def _check(config: Config, named: Mapping[str, str] | None = None) -> None:
    """Range and syntax checks. `named` maps a key set by the environment to its
    variable, so that the error names what the user wrote."""
    named = named or {}

    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{named.get(key, key)}: {problem}")

    for name in _SECTIONS:
        section = getattr(config, name)
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if "bounds" in field.metadata:
                low, high = field.metadata["bounds"]
                if not low <= value <= high:  # also true of nan
                    raise bad(
                        f"{name}.{field.name}", f"must be from {low} to {high}, not {value!r}"
                    )
    for pattern in config.mount.scratch_names:
        problem = _scratch_pattern_problem(pattern)
        if problem:
            raise bad("mount.scratch_names", f"pattern {pattern!r} {problem}")
    if config.search.engine not in SEARCH_ENGINES:
        raise bad(
            "search.engine",
            f"must be one of {', '.join(SEARCH_ENGINES)}, not {config.search.engine!r}",
        )
    parse_listen(config.http.listen, named.get("http.listen", "http.listen"))
    for key, expression in (
        ("backup.schedule", config.backup.schedule),
        ("compaction.schedule", config.compaction.schedule),
    ):
        if expression and not croniter.is_valid(expression):
            raise bad(key, f'{expression!r} is not a cron expression (e.g. "0 3 * * *")')
    if config.backup.schedule and not config.backup.dest:
        raise bad("backup.dest", "a backup schedule needs a destination directory")
    wrong = redis_url_problem(config.cache.redis_url)
    if wrong:
        raise bad("cache.redis_url", wrong)
    if config.log.format not in LOG_FORMATS:
        raise bad("log.format", f"must be text or json, not {config.log.format!r}")
    if not config.roles:
        raise ConfigError("roles: at least one role must be configured")
    for name, role in config.roles.items():
        if not ROLE_NAME.match(name):
            raise ConfigError(f"roles.{name}: role names are [a-z][a-z0-9_-]{{0,31}}")
        for reader in role.readers:
            if reader not in config.roles:
                raise ConfigError(f"roles.{name}.readers: unknown role {reader!r}")


REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url_problem(url: str) -> str | None:
    """Why `url` cannot be ``cache.redis_url`` (None: it can)."""
    if not url:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        return f"not a Redis URL ({exc})"
    if parts.scheme not in REDIS_SCHEMES:
        return f"must start with redis://, rediss:// or unix://, not {url.split(':')[0]!r}"
    if parts.password is not None:
        return "holds a password: put it in cache.redis_password_file"
    if parts.scheme != "unix" and not parts.hostname:
        return "names no host"
    if parts.scheme == "unix" and not parts.path:
        return "names no socket path"
    return None


def default_roles(names: Iterable[str] | None = None) -> dict[str, RoleConfig]:
    """Roles `names` (the default three when None) with the default readers among them."""
    chosen = sorted(DEFAULT_ROLES if names is None else names)
    return {
        n: RoleConfig(n, readers=tuple(r for r in DEFAULT_ROLES.get(n, ()) if r in chosen))
        for n in chosen
    }


def _roles_of_data_dir(data_dir: Path) -> dict[str, RoleConfig]:
    """The roles when the file configures none: those the data directory has keys
    for (it was initialised with them), else the default three."""
    from slurpfs.crypto.keystore import public_role_names

    return default_roles(public_role_names(data_dir))


def _scratch_pattern_problem(pattern: str) -> str:
    """Why a `mount.scratch_names` glob pattern is unusable, or ''."""
    if not pattern or len(pattern.encode()) > 255 or "/" in pattern or "\0" in pattern:
        return "must be a file name pattern: 1-255 bytes, without '/' or NUL"
    if not pattern.strip("*?[]!"):
        # Such a pattern makes every name a scratch file: unsaved, lost at unmount.
        return "matches every name; it must name something besides wildcards"
    return ""


def load(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    table: Mapping[str, Any] | None = None,
) -> Config:
    """Load the configuration.

    `path` (or ``SLURPFS_CONFIG``) names a TOML file; without one, the file
    ``config.toml`` in the data directory is read when it exists. `overrides`
    are command-line values as ``{"node.data_dir": "/x"}``: they beat everything.
    `table` is an already parsed file (see `loads`), read instead of any file.
    """
    env = dict(os.environ if environ is None else environ)
    overrides = dict(overrides or {})
    if path is None and env.get("SLURPFS_CONFIG"):
        path = Path(env["SLURPFS_CONFIG"])
    if path is None and not table:
        data_dir = overrides.get("node.data_dir") or env.get("SLURPFS_NODE_DATA_DIR")
        candidate = Path(data_dir or default_data_dir(env)) / "config.toml"
        if candidate.is_file():
            path = candidate
    table = dict(table or {})
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: does not exist") from None
        except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, an integer too long
            raise ConfigError(f"config file {path}: {exc}") from None

    unknown = sorted(set(table) - set(_SECTIONS) - {"roles"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: roles, {', '.join(_SECTIONS)})")

    sections: dict[str, Any] = {}
    named: dict[str, str] = {}  # keys whose value came from the environment -> variable
    for name, cls in _SECTIONS.items():
        raw = table.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: must be a table")
        merged = dict(raw)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            key = f"{name}.{field.name}"
            env_key = "SLURPFS_" + key.replace(".", "_").upper()
            if env_key in env:
                merged[field.name] = _coerce(
                    env_key, env[env_key], hints[field.name], from_env=True
                )
                named[key] = env_key
            if key in overrides and overrides[key] is not None:
                merged[field.name] = overrides[key]
                named.pop(key, None)
        sections[name] = _build(cls, name, merged)
    stray = sorted(
        k
        for k in env
        if k.startswith("SLURPFS_")
        and k not in _NON_CONFIG_ENV
        and not any(
            k == "SLURPFS_" + f"{s}_{f.name}".upper()
            for s, c in _SECTIONS.items()
            for f in dataclasses.fields(c)
        )
    )
    if stray:
        raise ConfigError(f"{stray[0]}: unknown environment setting")
    if not sections["node"].data_dir:
        sections["node"] = dataclasses.replace(
            sections["node"], data_dir=str(default_data_dir(env))
        )

    raw_roles = table.get("roles")
    roles: dict[str, RoleConfig] = {}
    if raw_roles is None:
        roles = _roles_of_data_dir(Path(sections["node"].data_dir))
    elif not isinstance(raw_roles, dict):
        raise ConfigError("roles: must be a table of [roles.NAME] tables")
    else:
        for name, raw in raw_roles.items():
            if not isinstance(raw, dict):
                raise ConfigError(f"roles.{name}: must be a table")
            roles[name] = _build(RoleConfig, f"roles.{name}", raw, name=name)
    config = Config(
        **sections, roles=MappingProxyType(roles), source=str(path) if path else "<defaults>"
    )
    _check(config, named)
    return config


def loads(text: str) -> Config:
    """The configuration `text` (TOML, as `render_toml` writes it) describes, with no
    environment and no file: how a worker process receives its mount's configuration."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration text: {exc}") from None
    return load(environ={}, table=table)


def render_toml(config: Config) -> str:
    """A TOML file that loads back to `config` (used by ``slurpfs init``)."""
    lines: list[str] = []
    for name in _SECTIONS:
        section = getattr(config, name)
        keys = list(dataclasses.fields(section))
        if keys:
            lines.append(f"[{name}]")
            lines += [f"{f.name} = {_toml_value(getattr(section, f.name))}" for f in keys]
            lines.append("")
    for role in config.roles.values():
        lines.append(f"[roles.{role.name}]")
        lines.append(f"readers = {_toml_value(role.readers)}")
        lines.append(f"users = {_toml_value(role.users)}")
        lines.append(f"groups = {_toml_value(role.groups)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise AssertionError(f"cannot render {value!r}")  # pragma: no cover
