"""What a specialist answers, and when two answers say the same.

A `Form` reads an answer as one key per field (`None` for an answer that does not parse), and
writes keys back as the answer's text:
- `label`: a text answer; its key is the text trimmed and in lower case (`Positive.` and
  `positive` are one class).
- `schema`: a JSON object whose every field is from a closed set, one key per field (the value
  as canonical JSON): what a classifier covers, with one head per field. A schema is closed when
  every field is an `enum`, a `const`, a boolean, or an integer in a small range;
  `closed_fields` says which field is not, and why.
- `json`: any answer to a JSON schema, as one key (the whole value as canonical JSON): what a
  reuse specialist compares.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from shoal.errors import DistillationError

ABSENT = "<absent>"  # the key of an optional field the answer leaves out
MAX_INT_RANGE = 20  # an integer field with at most this many values is a closed set


def label_key(text: str) -> str:
    """A label as it is compared: trimmed, in lower case, without surrounding quotes or a final
    full stop."""
    return text.strip().strip("\"'`").rstrip(".!").strip().lower()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if not isinstance(ref, str):
        return node
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            found = root.get(prefix[2:-1], {}).get(ref[len(prefix) :])
            if isinstance(found, dict):
                return _resolve(found, root)
    raise DistillationError(f"the schema's reference {ref!r} cannot be resolved")


def _choices(name: str, node: dict[str, Any], root: dict[str, Any]) -> list[Any]:
    """The values a field may take, or an error saying why it is not a closed set."""
    node = _resolve(node, root)
    if "enum" in node:
        return list(node["enum"])
    if "const" in node:
        return [node["const"]]
    branches = node.get("anyOf") or node.get("oneOf")
    if isinstance(branches, list):
        return [v for b in branches for v in _choices(name, b, root)]
    kind = node.get("type")
    if kind == "boolean":
        return [False, True]
    if kind == "null":
        return [None]
    if kind == "integer" and "minimum" in node and "maximum" in node:
        low, high = int(node["minimum"]), int(node["maximum"])
        if high - low < MAX_INT_RANGE:
            return list(range(low, high + 1))
    what = {
        "string": "free text (a string without an enum)",
        "number": "a number",
        "integer": f"an integer without a range of at most {MAX_INT_RANGE} values",
        "array": "a list",
        "object": "a nested object",
    }.get(str(kind), f"of type {kind!r}")
    raise DistillationError(
        f"field {name!r} is {what}: a classifier answers only closed sets (an enum, a const, "
        "a boolean, a small integer range), so this schema cannot be covered by one; distil "
        "it with --kind reuse (recorded answers reused for near-duplicate inputs), or give the "
        "field an enum"
    )


def closed_fields(schema: dict[str, Any]) -> dict[str, list[Any]]:
    """Each field of an object schema with the values it may take; an error names the first
    field that is not a closed set."""
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise DistillationError(
            "a classifier covers a JSON schema of an object with `properties`; this one is not"
        )
    props: dict[str, Any] = schema["properties"]
    if not props:
        raise DistillationError("the schema's object has no properties to answer")
    return {name: _choices(name, node, schema) for name, node in props.items()}


@dataclass(frozen=True)
class Form:
    """A label (`kind="label"`, one field named "") or a JSON object with closed fields.

    `classes[i]` are the keys field `i` was trained on, in the order of the head's outputs;
    `shown` maps a label's key to the text answered (the teacher's most common spelling)."""

    kind: Literal["label", "schema", "json"]
    fields: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...] = ()
    schema: dict[str, Any] | None = None
    shown: dict[str, str] = field(default_factory=dict)

    @classmethod
    def label(cls) -> Form:
        return cls(kind="label", fields=("",))

    @classmethod
    def for_schema(cls, schema: dict[str, Any]) -> Form:
        closed_fields(schema)  # raises when a field is not closed
        return cls(kind="schema", fields=tuple(schema["properties"]), schema=schema)

    @classmethod
    def for_json(cls, schema: dict[str, Any]) -> Form:
        return cls(kind="json", fields=("",), schema=schema)

    # -- reading answers ----------------------------------------------------------------------

    def keys(self, answer: str, parsed: Any | None = None) -> tuple[str, ...] | None:
        """The answer's key per field, or None when it does not parse (an empty label, a JSON
        answer that is not JSON or breaks the schema)."""
        if self.kind == "label":
            key = label_key(answer)
            return (key,) if key else None
        value = parsed
        if value is None:
            try:
                value = json.loads(answer)
            except ValueError:
                return None
        try:
            jsonschema.validate(value, self.schema or {})
        except jsonschema.ValidationError:
            return None
        if self.kind == "json":
            return (canonical(value),)
        if not isinstance(value, dict):
            return None
        return tuple(canonical(value[f]) if f in value else ABSENT for f in self.fields)

    def gold_keys(self, gold: Any) -> tuple[str, ...] | None:
        """A gold answer's keys: a label's text, or a JSON object (or its text)."""
        if gold is None:
            return None
        if self.kind == "label":
            return (label_key(str(gold)),)
        if isinstance(gold, str):
            return self.keys(gold)
        return self.keys("", gold)

    def agree(self, a: str, b: str) -> bool | None:
        """Whether two answers say the same (None when either does not parse)."""
        ka, kb = self.keys(a), self.keys(b)
        if ka is None or kb is None:
            return None
        return ka == kb

    # -- writing answers ----------------------------------------------------------------------

    def text(self, keys: Sequence[str]) -> str:
        if self.kind == "label":
            return self.shown.get(keys[0], keys[0])
        if self.kind == "json":
            return keys[0]
        value = {f: json.loads(k) for f, k in zip(self.fields, keys, strict=True) if k != ABSENT}
        return json.dumps(value, ensure_ascii=False)

    def trained(self, keys: Iterable[tuple[str, ...]], answers: Iterable[str]) -> Form:
        """This form with the classes seen in `keys`, in sorted order, and (for a label) the
        teacher's most common spelling of each."""
        rows = list(keys)
        classes = tuple(tuple(sorted({r[i] for r in rows})) for i in range(len(self.fields)))
        shown: dict[str, str] = {}
        if self.kind == "label":
            spellings: dict[str, Counter[str]] = {}
            for key, answer in zip(rows, answers, strict=True):
                spellings.setdefault(key[0], Counter())[answer.strip()] += 1
            shown = {k: c.most_common(1)[0][0] for k, c in spellings.items()}
        return Form(self.kind, self.fields, classes, self.schema, shown)

    # -- files --------------------------------------------------------------------------------

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fields": list(self.fields),
            "classes": [list(c) for c in self.classes],
            "schema": self.schema,
            "shown": self.shown,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Form:
        return cls(
            kind=data["kind"],
            fields=tuple(data["fields"]),
            classes=tuple(tuple(c) for c in data["classes"]),
            schema=data.get("schema"),
            shown=dict(data.get("shown") or {}),
        )

    def describe(self) -> str:
        if self.kind == "label":
            labels = self.classes[0] if self.classes else ()
            if len(labels) > 8:
                return f"a text answer ({len(labels)} distinct)"
            return "a label: " + " | ".join(self.shown.get(k, k) for k in labels)
        if self.kind == "json":
            return "a JSON answer (whole answers reused)"
        parts = [
            f"{f} ({len(c)} values)" for f, c in zip(self.fields, self.classes or (), strict=False)
        ]
        return "a JSON object: " + ", ".join(parts or self.fields)
