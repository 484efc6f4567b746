"""Adding a specialist (and its route) to a fleet file, and taking it out, as text edits.

A fleet file is the user's: its comments, order and layout stay. An entry is added as a list
item at the end of the `models:` (or `routes:`) section, in the section's own indentation (the
section is appended when the file has none); an entry is taken out by deleting the lines of its
list item. Every edit is checked before it is written: the file must parse to what it said
before, plus (or minus) exactly those entries, else nothing is written and the error shows the
YAML to add by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from shoal.errors import ConfigError
from shoal.settings import FleetSettings, parse_fleet

_TOP = re.compile(r"^[A-Za-z_][\w-]*\s*:")
_ITEM = re.compile(r"^(?P<indent>\s*)-(\s|$)")


def _section(lines: list[str], key: str) -> tuple[int, int] | None:
    """(line of `key:`, line after the section's last item line) or None."""
    head = next((i for i, line in enumerate(lines) if re.match(rf"^{key}\s*:", line)), None)
    if head is None:
        return None
    end = head + 1
    for i in range(head + 1, len(lines)):
        line = lines[i]
        if _TOP.match(line):
            break
        if not _blank(line):
            end = i + 1
    return head, end


def _item_indent(line: str) -> int | None:
    found = _ITEM.match(line)
    return len(found.group("indent")) if found else None


def _items(lines: list[str], head: int, end: int) -> list[tuple[int, int]]:
    """The line ranges of the section's list items (without trailing blank or comment lines)."""
    starts = [i for i in range(head + 1, end) if _item_indent(lines[i]) is not None]
    if not starts:
        return []
    indent = _item_indent(lines[starts[0]])
    starts = [i for i in starts if _item_indent(lines[i]) == indent]
    ranges = []
    for k, start in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else end
        while stop > start + 1 and _blank(lines[stop - 1]):
            stop -= 1
        ranges.append((start, stop))
    return ranges


def _blank(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _render(entry: dict[str, Any], indent: str) -> list[str]:
    text = yaml.safe_dump([entry], sort_keys=False, default_flow_style=False, width=1000)
    return [indent + line for line in text.splitlines()]


def _settings(text: str, path: Path) -> FleetSettings:
    return parse_fleet(text, source=str(path))


def _dump(settings: FleetSettings) -> dict[str, Any]:
    return settings.model_dump(mode="json")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, "utf-8")
    tmp.replace(path)


def _by_hand(path: Path, entries: dict[str, list[dict[str, Any]]], why: str) -> ConfigError:
    shown = yaml.safe_dump(entries, sort_keys=False, width=1000)
    return ConfigError(f"cannot edit {path} safely ({why}); add this to it by hand:\n{shown}")


def add(path: Path, model: dict[str, Any], route: dict[str, Any] | None = None) -> None:
    """Add `model` to the `models:` and `route` to the `routes:` of the fleet file at `path`
    (created when missing)."""
    entries = {"models": [model]} | ({"routes": [route]} if route else {})
    text = path.read_text("utf-8") if path.is_file() else ""
    before = _settings(text, path)
    lines = text.splitlines()
    for key, (entry,) in entries.items():
        found = _section(lines, key)
        if found is None:
            if lines and lines[-1].strip():
                lines.append("")
            lines += [f"{key}:", *_render(entry, "  ")]
            continue
        head, end = found
        inline = lines[head].split(":", 1)[1].split("#", 1)[0].strip()
        if inline == "[]":
            lines[head] = f"{key}:"
        elif inline:
            raise _by_hand(path, entries, f"its `{key}:` is written on one line")
        items = _items(lines, head, end)
        indent = (
            " " * (len(lines[items[0][0]]) - len(lines[items[0][0]].lstrip())) if items else "  "
        )
        lines[end:end] = _render(entry, indent)
    after_text = "\n".join(lines) + "\n"
    after = _settings(after_text, path)
    want = _dump(before)
    want["models"] = [*want["models"], _dump_entry(after, "models", model["id"])]
    if route:
        want["routes"] = [*want["routes"], _dump_entry(after, "routes", route["name"])]
    if _dump(after) != want:
        raise _by_hand(path, entries, "the edited file would say something else")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, after_text)


def _dump_entry(settings: FleetSettings, key: str, name: str) -> dict[str, Any]:
    for entry in _dump(settings)[key]:
        if entry.get("id", entry.get("name")) == name:
            return dict(entry)
    raise ConfigError(f"{key} entry {name!r} went missing while editing the fleet file")


def remove(path: Path, model_id: str, routes: list[str]) -> None:
    """Take the model `model_id` and the routes named in `routes` out of the fleet file."""
    text = path.read_text("utf-8")
    before = _settings(text, path)
    lines = text.splitlines()
    doomed: list[tuple[int, int]] = []
    for key, names in (("models", [model_id]), ("routes", routes)):
        if not names:
            continue
        found = _section(lines, key)
        if found is None:
            raise ConfigError(f"{path} has no `{key}:` section to take {names} out of")
        head, end = found
        items = _items(lines, head, end)
        for name in names:
            hits = [(a, b) for a, b in items if _names(lines[a:b]) == name]
            if len(hits) != 1:
                raise ConfigError(f"cannot find {name!r} as one item of `{key}:` in {path}")
            doomed += hits
        if len(names) == len(items):  # nothing left: an empty list, not a null
            lines[head] = f"{key}: []"
    for a, b in sorted(doomed, reverse=True):
        del lines[a:b]
    after_text = "\n".join(lines) + "\n"
    after = _settings(after_text, path)
    want = _dump(before)
    want["models"] = [m for m in want["models"] if m["id"] != model_id]
    want["routes"] = [r for r in want["routes"] if r["name"] not in routes]
    if _dump(after) != want:
        raise ConfigError(f"cannot edit {path} safely; take {model_id!r} out of it by hand")
    _write(path, after_text)


def _names(item: list[str]) -> str | None:
    """The id or name of one list item's lines."""
    first = item[0]
    indent = len(first) - len(first.lstrip())
    body = "\n".join(line[indent:] if len(line) >= indent else line for line in item)
    try:
        value = yaml.safe_load(body)
    except yaml.YAMLError:
        return None
    if isinstance(value, list) and value and isinstance(value[0], dict):
        found = value[0].get("id", value[0].get("name"))
        return str(found) if found is not None else None
    return None
