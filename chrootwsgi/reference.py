"""The configuration reference, generated from :class:`~chrootwsgi.config.JailConfig`.

The README's table is this module's output (``chrootwsgi config-reference``): names, types and
defaults come from the dataclass fields, descriptions from its ``:param:`` docstring entries, so
the reference cannot drift from the code. A test compares the two.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields

from .config import JailConfig

#: Keyword argument → how the key is written in the TOML file.
_TOML_NAMES = {
    "preload_libraries": "[preload] libraries",
    "preload_modules": "[preload] modules",
    "preload_files": "[preload] files",
    "path_map": "[paths]",
    "hosts": "[hosts]",
    "expose": "expose / [[expose]]",
}
_TYPES = {
    "str": "string",
    "str | None": "string",
    "Mode": '"auto", "rootless" or "privileged"',
    "bool": "true / false",
    "tuple[str, ...]": "list of strings",
    "bool | tuple[str, ...]": "true / false, or a list of strings",
    "Mapping[str, str]": "table of strings",
    "tuple[Exposure, ...]": 'tables {host, jail, writable} or "HOST[:JAIL[:ro|rw]]" strings',
}


def config_reference() -> str:
    """A Markdown table of every setting: TOML key, type, default, meaning."""
    docs = _param_docs(JailConfig.__doc__ or "")
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for item in fields(JailConfig):
        if item.default is not MISSING:
            default = _toml(item.default)
        elif item.default_factory is not MISSING:
            default = _toml(item.default_factory())
        else:
            default = "required"
        name = _TOML_NAMES.get(item.name, item.name)
        kind = _TYPES.get(str(item.type), str(item.type)).replace("|", "\\|")
        meaning = docs.get(item.name, "").replace("``", "`").replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def _param_docs(docstring: str) -> dict[str, str]:
    docs: dict[str, str] = {}
    current: str | None = None
    for line in docstring.splitlines():
        match = re.match(r"\s*:param (\w+):\s*(.*)", line)
        if match:
            current = match[1]
            docs[current] = match[2].strip()
        elif current and line.strip() and not line.strip().startswith(":"):
            docs[current] += " " + line.strip()
        else:
            current = None
    return {name: re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text) for name, text in docs.items()}


def _toml(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(json.dumps(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{json.dumps(value)}`"
    return f"`{json.dumps(value)}`"
