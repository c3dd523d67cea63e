"""The `slurpfs` command: output, --json and exit codes.

Most tests run it in this process (`run_cli`); a few run the real program
(`run_cli_process`): the console script, usage errors and a failure with their
exit codes and streams, and passphrase files."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import WEAK_KDF, find_canary, make_config, run_cli, run_cli_process

from slurpfs import audit
from slurpfs.model import ContextStore
from slurpfs.store import schema as s

ADDR = "ucxl://claude:architect@bzzz:auth/src/auth.go"
DEV, ARCH = "developer", "architect"

# The exit codes the CLI documents.
OK, FAILURE, USAGE, NOT_FOUND, DENIED, CORRUPT, BAD_ADDRESS, NOT_INITIALISED, FULL, PARTIAL = range(
    10
)


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert proc.returncode == OK, proc.stderr.decode(errors="replace")
    return proc


def js(proc: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(ok(proc).stdout)


def fails(
    proc: subprocess.CompletedProcess[bytes], code: int, *fragments: str
) -> subprocess.CompletedProcess[bytes]:
    """The command failed with `code`, said why on stderr, and printed no traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return proc


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """An initialised data directory (every role held)."""
    path = tmp_path / "data"
    js(run_cli("init", "--data", path, "--json"))
    return path


def put(data: Path, address: str, role: str, content: bytes, *extra: str) -> dict[str, Any]:
    result: dict[str, Any] = js(
        run_cli("put", "--data", data, address, "--role", role, "--json", *extra, input=content)
    )
    return result


def get(data: Path, address: str, role: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli("get", "--data", data, address, "--role", role)


# -- the command itself ------------------------------------------------------------------


def test_the_console_script_runs_and_documents_exit_codes() -> None:
    script = Path(sys.executable).parent / "slurpfs"
    proc = subprocess.run(
        [str(script), "--help"], capture_output=True, timeout=60, check=False, env=os.environ
    )

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    for line in ("3 not found", "4 access denied", "6 invalid address", "9 partial failure"):
        assert line in " ".join(out.split())


def test_usage_errors_exit_2() -> None:
    fails(run_cli_process("bogus"), USAGE, "invalid choice")
    fails(run_cli_process("get", ADDR), USAGE, "--role")


# -- init ----------------------------------------------------------------------------------


def test_init_reports_the_node_and_refuses_to_run_twice(tmp_path: Path) -> None:
    path = tmp_path / "data"

    info = js(run_cli("init", "--data", path, "--json", "--hold", "developer,reviewer"))

    assert info["data_dir"] == str(path)
    assert len(info["node_id"]) == 64
    assert info["roles"] == ["architect", "developer", "reviewer"]
    assert info["held"] == ["developer", "reviewer"]
    assert (path / "config.toml").is_file()
    fails(run_cli("init", "--data", path), FAILURE, "already initialised")


def test_init_with_custom_roles(tmp_path: Path) -> None:
    info = js(run_cli("init", "--data", tmp_path / "d", "--roles", "ops,lead", "--json"))

    assert info["roles"] == ["lead", "ops"]
    listing = js(run_cli("keys", "list", "--data", tmp_path / "d", "--json"))
    assert [(r["role"], r["held"]) for r in listing["roles"]] == [("lead", True), ("ops", True)]


def test_the_default_data_dir_is_under_home(scrubbed_env: Path) -> None:
    info = js(run_cli("init", "--json"))

    assert info["data_dir"] == str(scrubbed_env / ".local/share/slurpfs")
    put_out = js(run_cli("put", ADDR, "--role", DEV, "--json", input=b"x"))
    assert put_out["size"] == 1
    assert ok(run_cli("get", ADDR, "--role", DEV)).stdout == b"x"


def test_options_go_before_or_after_the_command(data: Path) -> None:
    before = js(run_cli("--data", data, "--json", "status"))
    after = js(run_cli("status", "--data", data, "--json"))

    assert before == after
    assert before["versions"] == 0


# -- put / get / history / ls / rm ------------------------------------------------------------


def test_put_and_get_round_trip_exact_bytes(data: Path, tmp_path: Path) -> None:
    content = bytes(range(256)) + b"\xff\xfe not utf-8 \r\n\0"
    source = tmp_path / "in.bin"
    source.write_bytes(content)

    from_file = js(run_cli("put", "--data", data, ADDR, "--role", DEV, source, "--json"))
    from_stdin = put(data, ADDR, ARCH, b"")

    assert from_file["address"] == ADDR
    assert (from_file["role"], from_file["size"], from_file["deleted"]) == (
        DEV,
        len(content),
        False,
    )
    assert len(from_file["version"]) == 64
    assert from_stdin["size"] == 0
    assert ok(get(data, ADDR, DEV)).stdout == content
    assert ok(get(data, ADDR, ARCH)).stdout == b""
    # Without the scheme, and to a file.
    out = tmp_path / "out.bin"
    ok(run_cli("get", "--data", data, ADDR.removeprefix("ucxl://"), "--role", DEV, "-o", out))
    assert out.read_bytes() == content


def test_history_and_temporal_get(data: Path) -> None:
    versions = [put(data, ADDR, DEV, f"v{i}".encode()) for i in (1, 2, 3)]

    rows = js(run_cli("history", "--data", data, ADDR, "--role", DEV, "--json"))

    assert [r["n"] for r in rows] == [1, 2, 3]
    assert [r["version"] for r in rows] == [v["version"] for v in versions]
    assert rows[1]["parents"] == [versions[0]["version"]]
    back_one = ADDR.replace("/src/", "/~~1/src/")
    first = ADDR.replace("/src/", "/*~/src/")
    assert ok(get(data, back_one, DEV)).stdout == b"v2"
    assert ok(get(data, first, DEV)).stdout == b"v1"
    text = ok(run_cli("history", "--data", data, ADDR, "--role", DEV)).stdout.decode()
    header, *lines = text.splitlines()
    assert header.split() == ["n", "version", "time", "(UTC)", "size", "author"]
    assert [line.split()[1] for line in lines] == [v["version"][:16] for v in versions]


def test_get_json_carries_the_metadata_and_the_content_text_or_base64(
    data: Path, tmp_path: Path
) -> None:
    binary = bytes(range(256)) + b"\xff\xfe"
    text_version = put(data, ADDR, DEV, "grüße\n".encode())
    binary_version = put(data, ADDR, ARCH, binary)

    as_text = js(run_cli("get", "--data", data, ADDR, "--role", DEV, "--json"))
    as_base64 = js(run_cli("get", "--data", data, ADDR, "--role", ARCH, "--json"))
    to_file = js(
        run_cli("get", "--data", data, ADDR, "--role", ARCH, "--json", "-o", tmp_path / "o")
    )

    assert (as_text["encoding"], as_text["content"]) == ("utf-8", "grüße\n")
    assert as_text["version"] == text_version["version"]
    assert as_text["role"] == DEV
    assert as_base64["encoding"] == "base64"
    assert base64.b64decode(as_base64["content"]) == binary
    assert as_base64["version"] == binary_version["version"]
    assert "content" not in to_file
    assert (tmp_path / "o").read_bytes() == binary


@pytest.mark.parametrize("suffix", ["~~1", "^^0", "*~"])
def test_a_temporal_segment_after_the_path_gets_a_hint(data: Path, suffix: str) -> None:
    put(data, ADDR, DEV, b"v1")
    put(data, ADDR, DEV, b"v2")
    meant = ADDR.replace("/src/", f"/{suffix}/src/")

    for command in ("get", "history"):
        fails(
            run_cli(command, "--data", data, ADDR + suffix, "--role", DEV),
            NOT_FOUND,
            f"a temporal segment goes right after the authority, as a path component of its own: {meant}",
        )
    assert ok(get(data, meant, DEV)).stdout == b"v1"


def test_ls_lists_authorities_directories_and_roles(data: Path) -> None:
    put(data, ADDR, DEV, b"x")
    put(data, ADDR, ARCH, b"y")
    put(data, "ucxl://gpt:dev@bzzz:auth/README", DEV, b"z")

    root = js(run_cli("ls", "--data", data, "--json"))
    src = js(run_cli("ls", "--data", data, "ucxl://claude:architect@bzzz:auth/src", "--json"))
    leaf = js(run_cli("ls", "--data", data, ADDR, "--json"))

    assert root == {
        "dirs": ["claude:architect@bzzz:auth", "gpt:dev@bzzz:auth"],
        "roles": [],
        "conflicts": [],
    }
    assert src == {"dirs": ["auth.go"], "roles": [], "conflicts": []}
    assert sorted(leaf["roles"]) == [ARCH, DEV]
    text = ok(run_cli("ls", "--data", data, "ucxl://claude:architect@bzzz:auth")).stdout
    assert text == b"src/\n"


def test_rm_deletes_and_keeps_history(data: Path) -> None:
    put(data, ADDR, DEV, b"doomed")

    gone = js(run_cli("rm", "--data", data, ADDR, "--role", DEV, "--json"))

    assert gone["deleted"] is True
    fails(get(data, ADDR, DEV), NOT_FOUND, "no context")
    fails(run_cli("rm", "--data", data, ADDR, "--role", DEV), NOT_FOUND)
    rows = js(run_cli("history", "--data", data, ADDR, "--role", DEV, "--json"))
    # The deletion is listed; `n` numbers content versions, as .history/<role>/<n> does.
    assert [(r["n"], r["deleted"]) for r in rows] == [(1, False), (None, True)]
    assert rows[1]["version"] == gone["version"]
    text = ok(run_cli("history", "--data", data, ADDR, "--role", DEV)).stdout.decode()
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["1", "-"]  # under the header
    assert "deleted" in text.splitlines()[2]
    assert ok(get(data, ADDR.replace("/src/", "/*~/src/"), DEV)).stdout == b"doomed"
    # Written again after the deletion: number 2.
    put(data, ADDR, DEV, b"back")
    rows = js(run_cli("history", "--data", data, ADDR, "--role", DEV, "--json"))
    assert [r["n"] for r in rows] == [1, None, 2]


# -- exit codes --------------------------------------------------------------------------------


def test_not_found_exits_3(data: Path) -> None:
    fails(get(data, ADDR, DEV), NOT_FOUND, "no context at " + ADDR)
    fails(run_cli("history", "--data", data, ADDR, "--role", DEV), NOT_FOUND, "no versions of")
    fails(run_cli("history", "--data", data, ADDR, "--role", "tester"), NOT_FOUND, "no role")
    fails(run_cli("ls", "--data", data, ADDR), NOT_FOUND, "no directory")
    fails(get(data, ADDR, "tester"), NOT_FOUND, "no role 'tester'")


@pytest.mark.parametrize(
    "address",
    [
        "ucxl://bad",
        "http://a:b@c:d/x",
        "ucxl://a:b@c:d/x//y",
        "ucxl://a:b@c:d/.hidden",
        "ucxl://a:b@c:d/~~x/y",
        "ucxl://a:b@c:d/x/developer",
    ],
)
def test_invalid_address_exits_6(data: Path, address: str) -> None:
    fails(get(data, address, DEV), BAD_ADDRESS, "invalid")
    fails(run_cli("put", "--data", data, address, "--role", DEV, input=b"x"), BAD_ADDRESS)


def test_writing_a_temporal_address_exits_6(data: Path) -> None:
    put(data, ADDR, DEV, b"x")

    fails(
        run_cli("put", "--data", data, ADDR.replace("/src/", "/~~1/src/"), "--role", DEV),
        BAD_ADDRESS,
        "temporal",
    )


def test_not_initialised_exits_7(tmp_path: Path) -> None:
    empty = tmp_path / "empty"

    for args in (["get", ADDR, "--role", DEV], ["status"], ["ls"], ["fsck"], ["keys", "list"]):
        fails(run_cli(*args, "--data", empty), NOT_INITIALISED, "slurpfs init")
    assert not empty.exists()


def test_bad_configuration_exits_7_naming_the_key(data: Path, tmp_path: Path) -> None:
    fails(
        run_cli("status", "--data", data, env={"SLURPFS_STORE_MAP_SIZE": "lots"}),
        NOT_INITIALISED,
        "SLURPFS_STORE_MAP_SIZE",
    )
    fails(
        run_cli("status", "--data", data, env={"SLURPFS_STORE_MAPSIZE": "1"}),
        NOT_INITIALISED,
        "SLURPFS_STORE_MAPSIZE: unknown",
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\ncascade = 1\n")
    fails(run_cli("status", "--data", data, "--config", bad), NOT_INITIALISED, "store.cascade")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[durability]\nsync_interval = nan\n", "durability.sync_interval"),
        ("[durability]\nsync_interval = inf\n", "durability.sync_interval"),
        ("[store]\nmap_size = 99999999999999999999\n", "store.map_size"),
    ],
)
def test_a_number_out_of_bounds_exits_7_naming_the_key(
    data: Path, tmp_path: Path, text: str, key: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)

    fails(run_cli("status", "--data", data, "--config", bad), NOT_INITIALISED, f"{key}: ")


def test_init_with_a_subset_of_the_default_roles(tmp_path: Path) -> None:
    info = js(run_cli("init", "--data", tmp_path / "d", "--roles", "developer,guest", "--json"))

    assert info["roles"] == ["developer", "guest"]
    put(tmp_path / "d", ADDR, "guest", b"hello")
    assert ok(get(tmp_path / "d", ADDR, "guest")).stdout == b"hello"


@pytest.mark.parametrize("emptied", [True, False])
def test_an_empty_or_missing_config_file_takes_the_roles_of_the_keys(
    tmp_path: Path, emptied: bool
) -> None:
    path = tmp_path / "d"
    ok(run_cli("init", "--data", path, "--roles", "developer,architect"))
    if emptied:
        (path / "config.toml").write_text("")
    else:
        (path / "config.toml").unlink()

    put(path, ADDR, DEV, b"still works")

    assert ok(get(path, ADDR, DEV)).stdout == b"still works"
    assert js(run_cli("status", "--data", path, "--json"))["roles"] == [ARCH, DEV]


def test_too_large_exits_8(data: Path) -> None:
    fails(
        run_cli(
            "put", "--data", data, ADDR, "--role", DEV,
            env={"SLURPFS_STORE_MAX_CONTEXT_BYTES": "10"}, input=b"x" * 11,
        ),
        FULL,
        "max_context_bytes",
    )  # fmt: skip
    fails(get(data, ADDR, DEV), NOT_FOUND)


def test_a_role_without_a_key_here_exits_4_and_leaks_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    js(run_cli("init", "--data", data, "--hold", DEV, "--json"))
    put(data, ADDR, ARCH, b"architects only: the secret plan")

    proc = fails(get(data, ADDR, ARCH), DENIED)

    assert proc.stdout == b""
    assert b"secret plan" not in proc.stderr


def test_keys_drop_then_get_exits_4(data: Path) -> None:
    put(data, ADDR, DEV, b"developer notes")
    put(data, ADDR, ARCH, b"architect notes")

    assert js(run_cli("keys", "drop", DEV, "--data", data, "--json")) == {"dropped": DEV}
    # The architect key still opens developer contexts (architect is a reader) ...
    assert ok(get(data, ADDR, DEV)).stdout == b"developer notes"
    js(run_cli("keys", "drop", ARCH, "--data", data, "--json"))

    listing = js(run_cli("keys", "list", "--data", data, "--json"))
    assert {r["role"]: r["held"] for r in listing["roles"]} == {
        ARCH: False,
        DEV: False,
        "reviewer": True,
    }
    # ... and with neither key left, nothing opens.
    fails(get(data, ADDR, DEV), DENIED)
    fails(get(data, ADDR, ARCH), DENIED)
    assert not list((data / "keys" / "roles").glob("developer.*"))


def test_a_tampered_store_exits_5(data: Path) -> None:
    info = put(data, ADDR, DEV, b"authentic")
    raw = lmdb.open(str(data / "store"), max_dbs=16)
    try:
        db = raw.open_db(s.DB_ENVELOPES)
        with raw.begin(write=True) as txn:
            stored = txn.get(bytes.fromhex(info["version"]), db=db)
            assert stored is not None
            envelope = bytearray(stored)
            envelope[-1] ^= 1
            txn.put(bytes.fromhex(info["version"]), bytes(envelope), db=db)
    finally:
        raw.close()

    fails(get(data, ADDR, DEV), CORRUPT)
    report = run_cli("fsck", "--data", data, "--json")
    assert report.returncode == CORRUPT
    body = json.loads(report.stdout)
    assert body["ok"] is False
    assert any(info["version"][:16] in p for p in body["problems"])


# -- fsck, status, audit -----------------------------------------------------------------------


def test_fsck_and_status(data: Path) -> None:
    put(data, ADDR, DEV, b"12345")
    put(data, ADDR, DEV, b"1234567")

    report = js(run_cli("fsck", "--data", data, "--json"))
    shallow = js(run_cli("fsck", "--data", data, "--json", "--shallow"))
    status = js(run_cli("status", "--data", data, "--json"))

    assert report == {
        "ok": True,
        "versions": 2,
        "contexts": 1,
        "decrypted": 2,
        "conflicts": 0,
        "stubs": 0,
        "problems": [],
    }
    assert shallow["decrypted"] == 0
    assert ok(run_cli("fsck", "--data", data)).stdout.decode().rstrip().endswith("clean")
    assert (status["versions"], status["contexts"], status["plaintext_bytes"]) == (2, 1, 12)
    assert status["held"] == ["architect", "developer", "reviewer"]


def test_audit_show_and_verify(data: Path) -> None:
    # Every access decision is an entry, changes as well as reads.
    put(data, ADDR, DEV, b"x")
    ok(get(data, ADDR, DEV))
    ok(get(data, ADDR, DEV))
    ok(run_cli("rm", "--data", data, ADDR, "--role", DEV))

    entries = js(run_cli("audit", "show", "--data", data, "--json"))
    last = js(run_cli("audit", "show", "-n", "1", "--data", data, "--json"))
    verified = js(run_cli("audit", "verify", "--data", data, "--json"))

    assert [(e["seq"], e["action"], e["allowed"], e["role"], e["who"]) for e in entries] == [
        (1, "write", True, DEV, "local"),
        (2, "read", True, DEV, "local"),
        (3, "read", True, DEV, "local"),
        (4, "delete", True, DEV, "local"),
    ]
    assert last == entries[3:]
    assert verified == {"ok": True, "entries": 4, "legacy": 0, "anchored": 4}
    log = data / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"allowed":true', b'"allowed":false', 1))
    fails(run_cli("audit", "verify", "--data", data), CORRUPT, "line 1")


def test_audit_verify_needs_the_node_key_and_catches_a_cut_log(tmp_path: Path) -> None:
    """`audit verify` checks MACs made with a key derived from the node key, so it
    needs the passphrase as `get` does: none (no terminal) or a wrong one is the key
    error. A log cut short after the commands anchored it fails with exit 5, in JSON
    too. The log names the access, never the content (canary)."""
    data = tmp_path / "data"
    secret = {"SLURPFS_PASSPHRASE": "correct horse"}
    canary = b"CANARY-audit-4c1d9e7f-never-in-the-log"
    js(run_cli("init", "--data", data, "--json", env=secret))
    js(run_cli("put", "--data", data, ADDR, "--role", DEV, "--json", env=secret, input=canary))
    for _ in range(3):
        assert ok(run_cli("get", "--data", data, ADDR, "--role", DEV, env=secret)).stdout == canary

    fails(run_cli("audit", "verify", "--data", data), DENIED)
    fails(run_cli("audit", "verify", "--data", data, env={"SLURPFS_PASSPHRASE": "no"}), DENIED)
    verified = js(run_cli("audit", "verify", "--data", data, "--json", env=secret))
    assert verified == {"ok": True, "entries": 4, "legacy": 0, "anchored": 4}
    log = data / "audit.log"
    assert all(b'"mac":"' in line for line in log.read_bytes().splitlines())
    assert find_canary(log.read_bytes(), canary) is None

    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:2]))

    cut = fails(
        run_cli("audit", "verify", "--data", data, "--json", env=secret),
        CORRUPT,
        "the audit log ends at entry 2 but its anchor says 4",
    )
    assert json.loads(cut.stdout)["exit_code"] == CORRUPT


# -- passphrases -------------------------------------------------------------------------------


def test_passphrase_protected_keys(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = {"SLURPFS_PASSPHRASE": "correct horse"}
    js(run_cli("init", "--data", data, "--json", env=secret))
    put_out = js(
        run_cli("put", "--data", data, ADDR, "--role", DEV, "--json", env=secret, input=b"x")
    )
    assert put_out["size"] == 1

    fails(get(data, ADDR, DEV), DENIED)  # no passphrase, no terminal
    fails(
        run_cli("get", "--data", data, ADDR, "--role", DEV, env={"SLURPFS_PASSPHRASE": "no"}),
        DENIED,
    )
    assert ok(run_cli("get", "--data", data, ADDR, "--role", DEV, env=secret)).stdout == b"x"

    phrase = tmp_path / "phrase"
    phrase.write_bytes(b"correct horse\n")
    phrase.chmod(0o644)
    fails(
        run_cli_process("get", "--data", data, ADDR, "--role", DEV, "--passphrase-file", phrase),
        FAILURE,
        "chmod 600",
    )
    phrase.chmod(0o600)
    by_file = run_cli_process(
        "get", "--data", data, ADDR, "--role", DEV, "--passphrase-file", phrase
    )
    assert ok(by_file).stdout == b"x"
    by_env = run_cli_process(
        "get", "--data", data, ADDR, "--role", DEV, env={"SLURPFS_PASSPHRASE_FILE": str(phrase)}
    )
    assert ok(by_env).stdout == b"x"


# -- import / export ---------------------------------------------------------------------------

TREE = {
    "README.md": b"---\nsummary: top\n---\nhello\n",
    "src/main.go": b"package main\n",
    "src/deep/er/data.bin": bytes(range(256)) * 3,
    "src/empty.txt": b"",
    "docs/ünïcode name.md": "naïve\n".encode(),
}
BAD = {
    ".hidden": b"x",
    "src/developer": b"named like a role",
    "docs/~~2": b"looks temporal",
}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_import_reports_failures_and_exits_9(data: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_tree(source, {**TREE, **BAD})

    proc = run_cli(
        "import", "--data", data, source, "--authority", "me:dev@proj:task", "--role", DEV, "--json"
    )

    assert proc.returncode == PARTIAL, proc.stderr
    report = json.loads(proc.stdout)
    assert report["imported"] == len(TREE)
    failed = {f["item"]: f["reason"] for f in report["failed"]}
    assert set(failed) == set(BAD)
    assert "start with '.'" in failed[".hidden"]
    assert "role name" in failed["src/developer"]
    assert "temporal" in failed["docs/~~2"]
    for rel, content in TREE.items():
        assert ok(get(data, f"ucxl://me:dev@proj:task/{rel}", DEV)).stdout == content
    text = run_cli(
        "import", "--data", data, source, "--authority", "me:dev@proj:task", "--role", DEV
    )
    assert text.returncode == PARTIAL
    assert b"FAILED src/developer" in text.stdout


def test_import_names_what_it_skips_and_follows_no_link(data: Path, tmp_path: Path) -> None:
    """Links and special files are not contexts: each is named, none is stored, exit 0."""
    source = tmp_path / "source"
    write_tree(source, {"notes/plan.md": b"the plan"})
    outside = tmp_path / "outside"
    write_tree(outside, {"secret.txt": b"not part of the tree"})
    (source / "notes" / "link.md").symlink_to(source / "notes" / "plan.md")
    (source / "escape").symlink_to(outside, target_is_directory=True)
    os.mkfifo(source / "pipe")

    proc = run_cli(
        "import", "--data", data, source, "--authority", "me:dev@proj:task", "--role", DEV,
        "--json",
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr  # it waited for no FIFO and failed nothing
    report = json.loads(proc.stdout)
    assert report["imported"] == 1
    assert {s["item"]: s["reason"] for s in report["skipped"]} == {
        "escape": "symbolic link, not followed",
        "notes/link.md": "symbolic link, not followed",
        "pipe": "not a regular file",
    }
    assert b"skipped notes/link.md: symbolic link" in proc.stderr
    listing = js(run_cli("ls", "--data", data, "ucxl://me:dev@proj:task", "--json"))
    assert listing["dirs"] == ["notes"]
    fails(get(data, "ucxl://me:dev@proj:task/notes/link.md", DEV), NOT_FOUND)
    text = run_cli(
        "import", "--data", data, source, "--authority", "me:dev@proj:task", "--role", DEV
    )
    # The same tree again: nothing new to store.
    assert text.stdout.endswith(b"imported 0, unchanged 1, failed 0, skipped 3\n")


def test_import_of_a_clean_tree_exits_0_and_export_reproduces_it(
    data: Path, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    write_tree(source, TREE)
    imported = js(
        run_cli(
            "import", "--data", data, source, "--authority", "me:dev@proj:task", "--role", DEV,
            "--json",
        )
    )  # fmt: skip
    assert imported == {"imported": len(TREE), "unchanged": 0, "failed": [], "skipped": []}
    put(data, ADDR, ARCH, b"architect notes")
    out = tmp_path / "export"

    exported = js(run_cli("export", "--data", data, out, "--json"))

    assert exported == {"exported": len(TREE) + 1, "failed": []}
    for rel, content in TREE.items():
        target = out / "me:dev@proj:task" / rel / DEV
        assert target.read_bytes() == content, rel
    assert (
        out / "claude:architect@bzzz:auth/src/auth.go" / ARCH
    ).read_bytes() == b"architect notes"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(files) == len(TREE) + 1
    # The mtime is the version's time.
    rows = js(
        run_cli(
            "history",
            "--data",
            data,
            "ucxl://me:dev@proj:task/src/main.go",
            "--role",
            DEV,
            "--json",
        )
    )
    assert (out / "me:dev@proj:task/src/main.go" / DEV).stat().st_mtime == pytest.approx(
        rows[-1]["time"]
    )


def test_export_names_what_this_node_cannot_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    js(run_cli("init", "--data", data, "--hold", DEV, "--json"))
    put(data, ADDR, DEV, b"readable")
    put(data, ADDR, ARCH, b"not here")
    out = tmp_path / "export"

    proc = run_cli("export", "--data", data, out, "--json")

    assert proc.returncode == PARTIAL
    report = json.loads(proc.stdout)
    assert report["exported"] == 1
    assert [f["item"] for f in report["failed"]] == [f"{ADDR} [{ARCH}]"]
    assert (out / "claude:architect@bzzz:auth/src/auth.go" / DEV).read_bytes() == b"readable"
    assert not (out / "claude:architect@bzzz:auth/src/auth.go" / ARCH).exists()
    assert b"not here" not in proc.stdout + proc.stderr


def test_cli_writes_are_visible_to_the_model(data: Path) -> None:
    """The CLI and the model agree on the data directory (what the mount will read)."""
    put(data, ADDR, DEV, b"from the cli")
    entries_before = len(audit.read(data / "audit.log"))

    cfg = make_config(data)
    with ContextStore.open(cfg, None, kdf=WEAK_KDF) as model:
        from slurpfs.ucxl import parse

        assert model.get(parse(ADDR), DEV).data == b"from the cli"
    assert len(audit.read(data / "audit.log")) == entries_before + 1


def test_bad_paths_and_values_are_clear_errors(data: Path, tmp_path: Path) -> None:
    """What a user mistypes: a missing or directory input file, an output directory
    that is not there, a TTL that is not a positive finite number, a missing
    passphrase file or a directory given as the configuration, input over the
    size limit. Expected: the path or value named, the documented exit code, no
    traceback, and nothing stored."""
    put(data, ADDR, DEV, b"kept")
    fails(run_cli("put", "--data", data, ADDR, "--role", DEV, tmp_path / "nope"), FAILURE,
          "nope: No such file or directory")  # fmt: skip
    fails(run_cli("put", "--data", data, ADDR, "--role", DEV, tmp_path), FAILURE,
          "Is a directory")  # fmt: skip
    out = tmp_path / "missing" / "out"
    fails(run_cli("get", "--data", data, ADDR, "--role", DEV, "-o", out), FAILURE,
          "missing/out: No such file or directory")  # fmt: skip
    for ttl in ("nan", "inf", "-1", "0", "soon"):
        fails(run_cli("put", "--data", data, ADDR, "--role", DEV, "--ttl", ttl, input=b"x"),
              USAGE, "--ttl")  # fmt: skip
    fails(run_cli("--passphrase-file", tmp_path / "nope", "status", "--data", data), FAILURE,
          "nope: No such file or directory")  # fmt: skip
    fails(run_cli("--config", tmp_path, "status", "--data", data), FAILURE, "Is a directory")
    big = run_cli("put", "--data", data, ADDR, "--role", DEV, "/dev/zero",
                  env={"SLURPFS_STORE_MAX_CONTEXT_BYTES": "1000"})  # fmt: skip
    fails(big, FULL, "over store.max_context_bytes (1000)")
    assert ok(get(data, ADDR, DEV)).stdout == b"kept"


def test_plaintext_written_on_request_is_for_the_user_alone(data: Path, tmp_path: Path) -> None:
    """`get -o` and `export` write plaintext where the user asks. Expected: files 0600
    and directories 0700 whatever the umask (022 here), an existing file made 0600."""
    put(data, ADDR, DEV, b"secret")
    out = tmp_path / "out.txt"
    out.write_bytes(b"old")
    out.chmod(0o644)
    before = os.umask(0o022)  # inherited by the command
    try:
        ok(run_cli("get", "--data", data, ADDR, "--role", DEV, "-o", out))
        ok(run_cli("export", "--data", data, tmp_path / "export"))
    finally:
        os.umask(before)
    assert (out.read_bytes(), out.stat().st_mode & 0o777) == (b"secret", 0o600)
    modes = {
        p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
        for p in (tmp_path / "export").rglob("*")
    }
    assert modes, "nothing exported"
    assert all(m == (0o700 if (tmp_path / p).is_dir() else 0o600) for p, m in modes.items()), modes


def test_json_failures_are_json_too(data: Path) -> None:
    """A script reading `--json` output reads failures too. Expected: the reason on
    stderr, and on stdout one JSON object with the message and the exit code."""
    missing = run_cli_process("get", "--data", data, ADDR, "--role", DEV, "--json")
    fails(missing, NOT_FOUND, "no context")
    assert json.loads(missing.stdout) == {
        "error": f"no context at {ADDR} for role {DEV!r}",
        "exit_code": NOT_FOUND,
    }
    bad = run_cli_process("put", "--data", data, "ucxl://nope", "--role", DEV, "--json", input=b"x")
    assert json.loads(fails(bad, BAD_ADDRESS).stdout)["exit_code"] == BAD_ADDRESS
