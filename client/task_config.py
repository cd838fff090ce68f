"""What a task's ConfigRecord may hold, checked before anything is reserved or logged in full.

The server chooses every value in it, so a hostile or buggy one could send bytes, a 20 MB
string or keys the site never reads: the audit log would grow by that much per task (or
fail to serialise) while the ledger still counted the steps. Only the keys below, with
their types and sizes, are accepted; anything else is refused, and the audit line then
holds :func:`config_summary`, a short description of what was sent, never the value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from common import audit_protocol, keys
from common.errors import ConfigError

MAX_FEDERATION_CONFIG_BYTES = 64 * 1024
MAX_STRING_BYTES = 1024
MAX_LIST_ITEMS = 256
MAX_KEYS = 16
MAX_SERVER_ROUND = 10**9
# key: expected kind ("json" is the federation config: a string holding a JSON object).
KNOWN_KEYS: dict[str, str] = {
    keys.FEDERATION_CONFIG: "json",
    keys.SERVER_ROUND: "int",
    audit_protocol.THRESHOLDS: "numbers",
    audit_protocol.QUANTILE_LEVELS: "numbers",
}
_SUMMARY_CHARS = 64


def _refuse(reason: str) -> ConfigError:
    return ConfigError(f"task config refused: {reason}", public=f"task config refused: {reason}")


def _short(text: str) -> str:
    return text if len(text) <= _SUMMARY_CHARS else f"{text[:_SUMMARY_CHARS]}... ({len(text)} chars)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(key: str, kind: str, value: Any) -> Any:
    """The value as the audit log records it; raises :class:`ConfigError` if it is not of ``kind``."""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SERVER_ROUND:
            raise _refuse(f"'{key}' must be an integer in [0, {MAX_SERVER_ROUND}], got {type(value).__name__}")
        return value
    if kind == "numbers":
        if not isinstance(value, list) or len(value) > MAX_LIST_ITEMS or not all(_is_number(v) for v in value):
            raise _refuse(f"'{key}' must be a list of at most {MAX_LIST_ITEMS} finite numbers")
        return value
    if not isinstance(value, str):
        raise _refuse(f"'{key}' must be a string, got {type(value).__name__}")
    size = len(value.encode("utf-8"))
    if size > MAX_FEDERATION_CONFIG_BYTES:
        raise _refuse(f"'{key}' is {size:,} bytes, more than {MAX_FEDERATION_CONFIG_BYTES:,}")
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        raise _refuse(f"'{key}' is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise _refuse(f"'{key}' must be a JSON object, got {type(parsed).__name__}")
    return parsed


def checked_task_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The task's config as plain data (the federation config parsed), for the handlers and the audit log.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or one too large.
    """
    if len(config) > MAX_KEYS:
        raise _refuse(f"{len(config)} keys, more than {MAX_KEYS}")
    checked = {}
    for key, value in config.items():
        kind = KNOWN_KEYS.get(key)
        if kind is None:
            raise _refuse(f"unknown key '{_short(str(key))}' (allowed: {', '.join(sorted(KNOWN_KEYS))})")
        checked[key] = _check_value(key, kind, value)
    return checked


def config_summary(config: Mapping[str, Any] | None) -> dict[str, str]:
    """A bounded description of what was sent (key, type, size), safe to log whatever the values are."""
    if config is None:
        return {}
    summary = {}
    for i, (key, value) in enumerate(config.items()):
        if i == MAX_KEYS:
            summary["..."] = f"{len(config) - MAX_KEYS} more keys"
            break
        size = f", {len(value)} items" if isinstance(value, (list, bytes)) else ""
        size = f", {len(value.encode('utf-8')):,} bytes" if isinstance(value, str) else size
        summary[_short(str(key))] = f"{type(value).__name__}{size}"
    return summary
