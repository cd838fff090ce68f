"""Hostile or careless YAML: every failure is a short ConfigError naming the file, never a traceback."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from common.config import MAX_CONFIG_BYTES, load_site_config
from common.errors import ConfigError

SITE = "site_id: a\ndata_dir: data\nstate_dir: state\nprivacy_budget: {epsilon: 5, delta: 1.0e-6}\n"


def _refused(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert len(message) < len(str(path)) + 700, message
    return message


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
) + "site_id: *i\n"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("alias-bomb.yaml", BILLION_LAUGHS, "aliases (*name) are not allowed"),
        ("merge-alias.yaml", "base: &b {epsilon: 5}\nprivacy_budget: {<<: *b, delta: 1.0e-6}\n", "aliases"),
        ("deep.yaml", "site_id: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 32 levels deep"),
        ("deep-block.yaml", "".join(" " * i + "k:\n" for i in range(300)), "nested more than 32 levels deep"),
        ("duplicate.yaml", SITE + "data_dir: /elsewhere\n", "found duplicate key 'data_dir'"),
        ("duplicate-nested.yaml", SITE.replace("epsilon: 5", "epsilon: 5, epsilon: 50"), "duplicate key 'epsilon'"),
        ("list.yaml", "- site_id: a\n", "top level must be a mapping, got list"),
        ("scalar.yaml", "just text\n", "top level must be a mapping, got str"),
        ("empty.yaml", "", "the file is empty"),
        ("huge-value.yaml", SITE.replace("site_id: a", "site_id: [" + "x" * 200_000 + "]"), "must be a string"),
        ("huge-key.yaml", SITE + "k" * 1000 + ": 1\n", "unknown key"),
        ("mixed-keys.yaml", SITE + "1: x\ntrue: y\n", "1: unknown key"),
        ("tabs.yaml", "site_id:\n\t- a\n", "not valid YAML"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.endswith(".yaml") else "",
)
def test_hostile_yaml_is_a_short_config_error(tmp_path: Path, name: str, content: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert reason in _refused(path)


def test_invalid_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SITE.replace("site_id: a", "site_id: caf\xe9").encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9 at offset 12)" in _refused(path)


def test_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(SITE + "#" * MAX_CONFIG_BYTES)
    assert f"larger than {MAX_CONFIG_BYTES} bytes" in _refused(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_config_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    os.mkfifo(path)
    messages: list[str] = []
    worker = threading.Thread(target=lambda: messages.append(_refused(path)), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "reading the config blocked on a FIFO"
    assert messages and "not a regular file" in messages[0]


def test_plain_config_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(SITE + "# anchors alone are harmless\nlabels_csv: &csv labels.csv\n")
    assert load_site_config(path).site_id == "a"
