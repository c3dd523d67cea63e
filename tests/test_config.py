"""Configuration: defaults, precedence, and errors that name the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from slurpfs import config
from slurpfs.config import Config, RoleConfig
from slurpfs.crypto.keystore import KdfParams, Keystore
from slurpfs.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "slurpfs.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, **env: str) -> Config:
    return config.load(write(tmp_path, text), {"HOME": str(tmp_path), **env})


def test_defaults(tmp_path: Path) -> None:
    cfg = config.load(None, {"HOME": str(tmp_path)})

    assert cfg.data_dir == tmp_path / ".local/share/slurpfs"
    assert cfg.node.name == "node"
    assert cfg.durability.sync_interval == 1.0
    assert cfg.store.map_size == 8 << 30
    assert cfg.store.cascade_depth == 8
    assert cfg.search.engine == "sqlite"
    assert cfg.search.cache_bytes == 64 << 20
    assert cfg.http.listen == "127.0.0.1:0"
    assert cfg.http.address == config.ListenAddress("127.0.0.1", 0)
    assert cfg.health.min_free_bytes == 1 << 30
    assert cfg.replication.write_quorum == 0
    assert cfg.replication.listen == ""
    assert cfg.replication.quorum_timeout == 10.0
    assert cfg.replication.down_after == 600.0
    assert cfg.mount.allow_other is False
    assert cfg.role_names == ("architect", "developer", "reviewer")
    assert cfg.roles["developer"].readers == ("architect",)
    assert cfg.roles["architect"].readers == ()
    assert cfg.source == "<defaults>"


def test_xdg_data_home_moves_the_default_data_dir(tmp_path: Path) -> None:
    cfg = config.load(None, {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "x")})

    assert cfg.data_dir == tmp_path / "x" / "slurpfs"


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = config.load(None, {"HOME": str(tmp_path)})

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = config.NodeConfig(name="other")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.store.map_size = 1  # type: ignore[misc]


def test_file_values_are_read(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
        [node]
        name = "alpha"
        [durability]
        sync_interval = 2          # an int where a float is expected is fine
        [store]
        cascade_depth = 3
        [mount]
        allow_other = true
        """,
    )

    assert cfg.node.name == "alpha"
    assert cfg.durability.sync_interval == 2.0
    assert isinstance(cfg.durability.sync_interval, float)
    assert cfg.store.cascade_depth == 3
    assert cfg.mount.allow_other is True
    assert cfg.source == str(tmp_path / "slurpfs.toml")


def test_precedence_override_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [node]
        name = "from-file"
        [store]
        cascade_depth = 3
        map_size = 2097152
        """,
    )
    env = {
        "HOME": str(tmp_path),
        "SLURPFS_NODE_NAME": "from-env",
        "SLURPFS_STORE_CASCADE_DEPTH": "4",
    }

    cfg = config.load(path, env, {"node.name": "from-cli", "store.max_context_bytes": None})

    assert cfg.node.name == "from-cli"  # override > env > file
    assert cfg.store.cascade_depth == 4  # env > file
    assert cfg.store.map_size == 2 << 20  # file > default
    assert cfg.store.max_context_bytes == 256 << 20  # a None override changes nothing
    assert cfg.durability.sync_interval == 1.0  # default


def test_slurpfs_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nname = 'named-by-env'\n", name="elsewhere.toml")

    cfg = config.load(None, {"HOME": str(tmp_path), "SLURPFS_CONFIG": str(path)})

    assert cfg.node.name == "named-by-env"


def test_config_toml_in_the_data_dir_is_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write(data, "[node]\nname = 'in-data-dir'\n", name="config.toml")

    by_override = config.load(None, {"HOME": str(tmp_path)}, {"node.data_dir": str(data)})
    by_env = config.load(None, {"HOME": str(tmp_path), "SLURPFS_NODE_DATA_DIR": str(data)})

    assert by_override.node.name == "in-data-dir"
    assert by_env.node.name == "in-data-dir"
    assert by_env.data_dir == data


@pytest.mark.parametrize(
    ("env_key", "value", "expected"),
    [
        ("SLURPFS_MOUNT_ALLOW_OTHER", "yes", True),
        ("SLURPFS_MOUNT_ALLOW_OTHER", " Off ", False),
        ("SLURPFS_STORE_MAP_SIZE", "0x200000", 2 << 20),
        ("SLURPFS_DURABILITY_SYNC_INTERVAL", "0.25", 0.25),
        ("SLURPFS_NODE_NAME", "alpha", "alpha"),
    ],
)
def test_environment_values_are_converted(
    tmp_path: Path, env_key: str, value: str, expected: object
) -> None:
    cfg = config.load(None, {"HOME": str(tmp_path), env_key: value})

    section, _, key = env_key.removeprefix("SLURPFS_").lower().partition("_")
    assert getattr(getattr(cfg, section), key) == expected


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^store\.map_sise: unknown key") as info:
        load_text(tmp_path, "[store]\nmap_sise = 5\n")
    assert "map_size" in str(info.value)  # the known keys are listed


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^stores: unknown section"):
        load_text(tmp_path, "[stores]\nmap_size = 5\n")


def test_unknown_role_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^roles\.developer\.reader: unknown key"):
        load_text(tmp_path, "[roles.developer]\nreader = []\n")


def test_unknown_environment_setting_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SLURPFS_STORE_MAPSIZE: unknown environment setting"):
        config.load(None, {"HOME": str(tmp_path), "SLURPFS_STORE_MAPSIZE": "5"})


def test_non_configuration_environment_is_allowed(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path),
        "SLURPFS_PASSPHRASE": "x",
        "SLURPFS_PASSPHRASE_FILE": "/nonexistent",
        "SLURPFS_TEST_WEAK_KDF": "1",
        "OTHER_VARIABLE": "ignored",
    }

    assert config.load(None, env).node.name == "node"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[store]\nmap_size = 'big'\n", "store.map_size"),
        ("[store]\nmap_size = 1.5\n", "store.map_size"),
        ("[store]\ncascade_depth = true\n", "store.cascade_depth"),
        ("[durability]\nsync_interval = 'soon'\n", "durability.sync_interval"),
        ("[mount]\nallow_other = 'yes'\n", "mount.allow_other"),
        ("[mount]\nallow_other = 1\n", "mount.allow_other"),
        ("[node]\nname = 7\n", "node.name"),
        ("[roles.developer]\nreaders = 'architect'\n", "roles.developer.readers"),
        ("[roles.developer]\nreaders = [1]\n", "roles.developer.readers"),
    ],
)
def test_bad_file_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: expected"):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    ("env_key", "value"),
    [
        ("SLURPFS_STORE_MAP_SIZE", "lots"),
        ("SLURPFS_STORE_MAP_SIZE", "1.5"),
        ("SLURPFS_DURABILITY_SYNC_INTERVAL", "fast"),
        ("SLURPFS_MOUNT_ALLOW_OTHER", "maybe"),
    ],
)
def test_bad_environment_value_names_the_variable(tmp_path: Path, env_key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{env_key}: expected") as info:
        config.load(None, {"HOME": str(tmp_path), env_key: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[durability]\nsync_interval = 0\n", "durability.sync_interval"),
        ("[store]\nmap_size = 1024\n", "store.map_size"),
        ("[store]\nmax_context_bytes = 0\n", "store.max_context_bytes"),
        ("[store]\ncascade_depth = 65\n", "store.cascade_depth"),
        ("[store]\ncascade_depth = -1\n", "store.cascade_depth"),
        ("[mount]\nscratch_bytes = -1\n", "mount.scratch_bytes"),
        ("[mount]\nbusy_poll = -0.001\n", "mount.busy_poll"),
        ("[mount]\nbusy_poll = 0.5\n", "mount.busy_poll"),
        ("[search]\nengine = 'lucene'\n", "search.engine"),
        ("[health]\nmin_free_bytes = -1\n", "health.min_free_bytes"),
        ("[replication]\nwrite_quorum = 65\n", "replication.write_quorum"),
        ("[replication]\nquorum_timeout = 0\n", "replication.quorum_timeout"),
        ("[replication]\ndown_after = 0.5\n", "replication.down_after"),
        ("node = 5\n", "node"),
        ("roles = 5\n", "roles"),
        ("[roles]\ndeveloper = 5\n", "roles.developer"),
        ("[roles]\n", "roles"),
        ("[roles.Developer]\n", "roles.Developer"),
    ],
)
def test_out_of_range_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: "):
        load_text(tmp_path, text)


def test_a_bad_value_from_the_environment_names_the_variable_an_override_the_key(
    tmp_path: Path,
) -> None:
    env = {"HOME": str(tmp_path), "SLURPFS_DURABILITY_SYNC_INTERVAL": "0"}

    with pytest.raises(ConfigError, match=r"^SLURPFS_DURABILITY_SYNC_INTERVAL: must be from"):
        config.load(None, env)
    with pytest.raises(ConfigError, match=r"^durability\.sync_interval: must be from"):
        config.load(
            None, {**env, "SLURPFS_DURABILITY_SYNC_INTERVAL": "1"}, {"durability.sync_interval": 0}
        )


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
        ("localhost:8080", "127.0.0.1", 8080),  # one address, whatever the resolver says
        ("LocalHost:1", "127.0.0.1", 1),
        ("[::1]:0", "::1", 0),
        ("[::]:80", "::", 80),
        ("[2001:DB8::1]:443", "2001:db8::1", 443),
        (" 10.1.2.3:7 ", "10.1.2.3", 7),
    ],
)
def test_http_listen_forms(tmp_path: Path, value: str, host: str, port: int) -> None:
    from_file = load_text(tmp_path, f"[http]\nlisten = {value!r}\n")
    from_env = config.load(None, {"HOME": str(tmp_path), "SLURPFS_HTTP_LISTEN": value})

    assert from_file.http.address == from_env.http.address == config.ListenAddress(host, port)


@pytest.mark.parametrize("value", ["off", "OFF", " off "])
def test_http_listen_off_disables_the_endpoints(tmp_path: Path, value: str) -> None:
    cfg = config.load(None, {"HOME": str(tmp_path), "SLURPFS_HTTP_LISTEN": value})

    assert cfg.http.address is None


def test_listen_address_text_and_loopback() -> None:
    assert str(config.ListenAddress("127.0.0.1", 80)) == "127.0.0.1:80"
    assert str(config.ListenAddress("::1", 80)) == "[::1]:80"
    assert config.ListenAddress("127.0.0.2", 1).loopback
    assert config.ListenAddress("::1", 1).loopback
    assert not config.ListenAddress("0.0.0.0", 1).loopback
    assert not config.ListenAddress("::", 1).loopback


BAD_LISTEN = [
    "garbage",
    "",
    "127.0.0.1",  # no port
    "127.0.0.1:",
    ":80",
    "127.0.0.1:65536",
    "127.0.0.1:-1",
    "127.0.0.1:+80",
    "127.0.0.1:８０",  # fullwidth digits: int() would take them
    "127.0.0.1:80x",
    "256.1.1.1:80",
    "127.1:80",
    "example.com:80",  # host names other than localhost: no resolver at start
    "::1:80",  # IPv6 without brackets
    "[::1]",
    "[::1]80",
    "[127.0.0.1]:80",
    "[::1]:99999",
    "http://127.0.0.1:80",
]


@pytest.mark.parametrize("value", BAD_LISTEN)
def test_bad_http_listen_in_the_file_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^http\.listen: expected HOST:PORT") as info:
        load_text(tmp_path, f"[http]\nlisten = {value!r}\n")
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", BAD_LISTEN)
def test_bad_http_listen_in_the_environment_names_the_variable(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^SLURPFS_HTTP_LISTEN: expected HOST:PORT") as info:
        config.load(None, {"HOME": str(tmp_path), "SLURPFS_HTTP_LISTEN": value})
    assert repr(value) in str(info.value)


def test_http_listen_must_be_a_string(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^http\.listen: expected a string"):
        load_text(tmp_path, "[http]\nlisten = 8080\n")


def test_readers_must_be_configured_roles(tmp_path: Path) -> None:
    text = "[roles.developer]\nreaders = ['architect']\n[roles.reviewer]\n"

    with pytest.raises(ConfigError, match=r"^roles\.developer\.readers: unknown role 'architect'"):
        load_text(tmp_path, text)


def test_configured_roles_replace_the_defaults(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
        [roles.ops]
        readers = ["lead", "ops"]
        users = ["alice"]
        groups = ["wheel"]
        [roles.lead]
        """,
    )

    assert cfg.role_names == ("lead", "ops")
    assert cfg.roles["ops"] == RoleConfig("ops", ("lead", "ops"), ("alice",), ("wheel",))
    # The role itself comes first and is not repeated.
    assert cfg.readers_of("ops") == ("ops", "lead")
    assert cfg.readers_of("lead") == ("lead",)


@pytest.mark.parametrize(
    "text",
    ["[store\n", "[node]\nname = \n", b"[node]\nname = '\xff'\n".decode("latin-1")],
)
def test_unparseable_file_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text.encode("latin-1"))

    with pytest.raises(ConfigError, match=rf"^config file {path}: "):
        config.load(path, {"HOME": str(tmp_path)})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", {"HOME": str(tmp_path)})


def test_render_toml_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        r"""
        [node]
        data_dir = '/srv/slurp "quoted" \ back/ünïcode'
        name = "n1"
        [durability]
        sync_interval = 0.125
        [store]
        map_size = 1099511627776
        cascade_depth = 0
        [mount]
        allow_other = true
        entry_timeout = 1e-3
        [search]
        engine = "tantivy"
        [http]
        listen = "[::1]:9464"
        [health]
        min_free_bytes = 0
        [roles.dev]
        readers = ["arch"]
        users = ["alice", "bob"]
        groups = ["devs"]
        [roles.arch]
        """,
    )
    original = config.load(path, {"HOME": str(tmp_path)})
    rendered = write(tmp_path, config.render_toml(original), name="rendered.toml")

    again = config.load(rendered, {"HOME": str(tmp_path)})

    assert again == dataclasses.replace(original, source=str(rendered))
    assert again.node.data_dir == '/srv/slurp "quoted" \\ back/ünïcode'


def test_render_toml_round_trips_the_defaults(tmp_path: Path) -> None:
    original = config.load(None, {"HOME": str(tmp_path)})
    rendered = write(tmp_path, config.render_toml(original))

    assert config.load(rendered, {"HOME": "/elsewhere"}) == dataclasses.replace(
        original, source=str(rendered)
    )


# -- bounds for every number, pending keys, roles without a [roles] table ----------


def numeric_keys() -> list[tuple[str, dataclasses.Field[object], type]]:
    """Every int and float key of every section, with its field and type."""
    found = []
    for section, cls in config._SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if hints[field.name] in (int, float):
                found.append((f"{section}.{field.name}", field, hints[field.name]))
    return found


def test_every_numeric_key_has_bounds_that_hold_its_default() -> None:
    keys = numeric_keys()

    assert len(keys) >= 11  # the collection works
    for key, field, _typ in keys:
        assert "bounds" in field.metadata, f"{key} has no bounds"
        low, high = field.metadata["bounds"]
        assert low <= field.default <= high, key


BAD_NUMBERS = ["nan", "inf", "-inf", "99999999999999999999", "-99999999999999999999"]


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("key", [k for k, _f, _t in numeric_keys()])
def test_a_number_out_of_bounds_in_the_file_names_the_key(
    tmp_path: Path, key: str, value: str
) -> None:
    section, _, name = key.partition(".")

    with pytest.raises(ConfigError, match=rf"^{section}[.]{name}: "):
        load_text(tmp_path, f"[{section}]\n{name} = {value}\n")


@pytest.mark.parametrize("value", [*BAD_NUMBERS, "1e999"])
@pytest.mark.parametrize("key", [k for k, _f, _t in numeric_keys()])
def test_a_number_out_of_bounds_in_the_environment_names_the_variable(
    tmp_path: Path, key: str, value: str
) -> None:
    variable = "SLURPFS_" + key.replace(".", "_").upper()

    with pytest.raises(ConfigError, match=rf"^{variable}: "):
        config.load(None, {"HOME": str(tmp_path), variable: value})


def test_an_integer_past_any_float_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^durability[.]sync_interval: .* out of range"):
        load_text(tmp_path, "[durability]\nsync_interval = " + "9" * 400 + "\n")


def test_an_integer_literal_too_long_to_read_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file .*slurpfs[.]toml: "):
        load_text(tmp_path, "[store]\nmap_size = " + "9" * 5000 + "\n")


def test_the_largest_map_size_opens_a_store(tmp_path: Path) -> None:
    """The upper bound is one LMDB really takes (it reserves the map as address space)."""
    import lmdb

    (field,) = (f for f in dataclasses.fields(config.StoreConfig) if f.name == "map_size")
    high = field.metadata["bounds"][1]
    env = lmdb.open(str(tmp_path / "store"), map_size=high)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"k", b"v")
    finally:
        env.close()


def test_pending_keys_are_left_out_of_new_files(tmp_path: Path) -> None:
    rendered = config.render_toml(config.load(None, {"HOME": str(tmp_path)}))

    assert "redis_url" not in rendered
    assert "write_quorum = 0" in rendered  # (no longer pending)


def test_pending_keys_at_their_defaults_load_quietly(tmp_path: Path) -> None:
    """What every data directory made before they were left out says."""
    cfg = load_text(tmp_path, "[cache]\nredis_url = ''\n[replication]\nwrite_quorum = 1\n")

    assert cfg.replication.write_quorum == 1


@pytest.mark.expect_warnings(r"\S+ = \S+ has no effect yet: it is ignored")
def test_pending_keys_set_to_something_warn_that_they_do_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_text(tmp_path, "[cache]\nredis_url = 'redis://h:1/2'\n[replication]\nwrite_quorum = 3\n")
    config.load(None, {"HOME": str(tmp_path), "SLURPFS_CACHE_REDIS_URL": "redis://h:1/3"})

    warned = [r.getMessage() for r in caplog.records if r.name == "slurpfs.config"]
    assert warned == [
        "cache.redis_url = 'redis://h:1/2' has no effect yet: it is ignored",
        "SLURPFS_CACHE_REDIS_URL = 'redis://h:1/3' has no effect yet: it is ignored",
    ]


def test_pending_keys_are_still_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cache[.]redis_url: expected a string"):
        load_text(tmp_path, "[cache]\nredis_url = 5\n")


@pytest.mark.parametrize("text", [None, "", "[node]\nname = 'n'\n"])
def test_without_roles_the_data_directorys_key_roles_apply(
    tmp_path: Path, text: str | None
) -> None:
    data = tmp_path / "data"
    Keystore(data, None, KdfParams.weak()).create(["developer", "architect", "ops"])
    if text is not None:
        (data / "config.toml").write_text(text, encoding="utf-8")

    cfg = config.load(None, {"HOME": str(tmp_path)}, {"node.data_dir": str(data)})

    assert cfg.role_names == ("architect", "developer", "ops")
    assert cfg.roles["developer"].readers == ("architect",)  # the default readers among them
    assert cfg.roles["ops"].readers == ()


def test_default_roles_keep_only_readers_among_the_chosen() -> None:
    assert config.default_roles(["developer", "guest"]) == {
        "developer": RoleConfig("developer"),
        "guest": RoleConfig("guest"),
    }
    assert config.default_roles()["reviewer"].readers == ("architect",)


def test_scratch_names_add_glob_patterns(tmp_path: Path) -> None:
    assert config.load(None, {"HOME": str(tmp_path)}).mount.scratch_names == ()
    cfg = load_text(tmp_path, "[mount]\nscratch_names = ['*.part', 'draft-*']\n")
    assert cfg.mount.scratch_names == ("*.part", "draft-*")
    env = {"HOME": str(tmp_path), "SLURPFS_MOUNT_SCRATCH_NAMES": "*.part, draft-*"}
    assert config.load(None, env).mount.scratch_names == ("*.part", "draft-*")
    assert "scratch_names = [" in config.render_toml(cfg)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("", "1-255 bytes"),
        ("a/b", "without '/'"),
        ("x" * 256, "1-255 bytes"),
        ("*", "matches every name"),
        ("?*", "matches every name"),
        ("[!]*", "matches every name"),
    ],
)
def test_a_bad_scratch_name_pattern_names_the_key(tmp_path: Path, pattern: str, why: str) -> None:
    """A pattern that matches everything would bring back files that vanish at
    unmount; it is refused when the configuration loads (exit 7, naming the key)."""
    with pytest.raises(ConfigError, match=r"^mount\.scratch_names: pattern ") as info:
        load_text(tmp_path, f"[mount]\nscratch_names = ['ok.*', {pattern!r}]\n")
    assert why in str(info.value)
    assert info.value.exit_code == 7
    env = {"HOME": str(tmp_path), "SLURPFS_MOUNT_SCRATCH_NAMES": "*"}
    with pytest.raises(ConfigError, match=r"^SLURPFS_MOUNT_SCRATCH_NAMES: pattern '\*'"):
        config.load(None, env)
