"""`slurpfs search` and `slurpfs index rebuild`, through `register`'s parser."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import WEAK_KDF, Nodes
from test_index_support import address, document, put_many

from slurpfs.config import Config
from slurpfs.errors import AccessDenied, QueryError
from slurpfs.index.cli import register
from slurpfs.model import ContextStore


def opener(cfg: Config, passphrase: bytes | None) -> ContextStore:
    return ContextStore.open(cfg, passphrase, kdf=WEAK_KDF)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    top = argparse.ArgumentParser(prog="slurpfs")
    top.add_argument("--json", action="store_true")
    register(top.add_subparsers(dest="command", required=True), common, opener=opener)
    return top


def run(cfg: Config, *argv: str) -> int:
    args = parser().parse_args(argv)
    code: int = args.handler(args, cfg, None)
    return code


@pytest.fixture
def cfg(nodes: Nodes) -> Config:
    node, model = nodes.new()
    put_many(
        model,
        [
            (
                address("src/auth.go"),
                "developer",
                document(
                    "Tokens are validated against the rotating key set.",
                    tags=["security"],
                    technologies=["jwt"],
                ),
            ),
            (address("hsm"), "architect", document("The rotating master key.", tags=["hsm"])),
        ],
    )
    node.close(model)
    return node.config


def test_search_prints_rank_score_address_role_and_snippet(
    cfg: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg, "search", "rotating key") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "1"
    assert "ucxl://claude:architect@bzzz:auth/" in out[0]
    assert "[rotating]" in out[1]
    assert "2 of 2 matches" in out[4]
    assert any(line.startswith("tags: ") for line in out)


def test_search_json_with_options_in_the_query(
    cfg: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg, "search", "rotating@limit=1", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == 2
    assert len(data["hits"]) == 1
    hit = data["hits"][0]
    assert set(hit) >= {"rank", "score", "address", "role", "snippet", "highlights", "version"}
    assert run(cfg, "search", "rotating", "--role", "developer", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [h["role"] for h in data["hits"]] == ["developer"]
    assert data["facets"]["technologies"] == {"jwt": 1}


def test_search_as_a_developer_sees_no_architect_context(
    cfg: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cfg, "search", "rotating OR master OR hsm", "--as", "developer", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data.pop("query") == "rotating OR master OR hsm"
    assert data["total"] == 1
    shown = json.dumps(data)
    assert "hsm" not in shown
    assert "master" not in shown
    with pytest.raises(AccessDenied):
        run(cfg, "search", "rotating", "--as", "developer", "--role", "architect")


def test_search_says_which_roles_it_searched_including_those_read_through_an_index(
    cfg: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    """Holding every role, architect's index alone covers all three (architect reads
    developer and reviewer): the report names the roles whose contexts were searched."""
    assert run(cfg, "search", "rotating", "--json") == 0
    data = json.loads(capsys.readouterr().out)

    assert {h["role"] for h in data["hits"]} == {"architect", "developer"}
    assert set(data["roles_searched"]) >= {h["role"] for h in data["hits"]}
    assert data["roles_searched"] == ["architect", "developer", "reviewer"]
    assert data["searched_as"] == {"architect": ["architect", "developer", "reviewer"]}
    assert run(cfg, "search", "rotating") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "searched: architect, developer, reviewer (through architect's index)" in lines
    assert run(cfg, "search", "rotating", "--as", "developer", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["roles_searched"], data["searched_as"]) == (
        ["developer"],
        {"developer": ["developer"]},
    )


def test_a_bad_query_is_a_usage_error(cfg: Config) -> None:
    with pytest.raises(QueryError, match="never closed") as info:
        run(cfg, "search", '"rotating key')
    assert info.value.exit_code == 2


def test_rebuild(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cfg, "index", "rebuild", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["documents"] == {"architect": 2, "developer": 1, "reviewer": 0}
    assert run(cfg, "index", "rebuild", "--role", "developer") == 0
    assert "developer: 1 documents" in capsys.readouterr().out
