"""Hypothesis strategies for JSON bodies from an OpenAPI (JSON Schema) description: bodies that
follow the schema, bodies with one field replaced by arbitrary JSON, and arbitrary JSON."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
MAX_ITEMS = 4


def from_schema(
    schema: dict[str, Any], defs: dict[str, Any], overrides: dict[str, st.SearchStrategy] | None = None
) -> st.SearchStrategy:
    """Values valid for `schema`; `$ref`s resolve in `defs` (components/schemas). `overrides`
    replaces the strategy of object properties by name, and such properties are always present
    (to keep generated work small)."""
    overrides = overrides or {}
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, overrides))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs, overrides) for s in schema[key]])
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return from_schema(schema["allOf"][0], defs, overrides)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return _object(schema, defs, overrides)
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs, overrides)
        return st.lists(
            items,
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS),
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 24), 24))
    if kind == "integer":
        return _integers(schema)
    if kind == "number":
        return _numbers(schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES


def _object(
    schema: dict[str, Any], defs: dict[str, Any], overrides: dict[str, st.SearchStrategy]
) -> st.SearchStrategy:
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))

    def strategy(name: str) -> st.SearchStrategy:
        return overrides[name] if name in overrides else from_schema(props[name], defs, overrides)

    # overridden fields are always present: an omitted max_tokens could mean "to the context end"
    fixed = {name: strategy(name) for name in props if name in required or name in overrides}
    optional = {name: strategy(name) for name in props if name not in fixed}
    obj = st.fixed_dictionaries(fixed, optional=optional)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and not props:
        return st.dictionaries(st.text(max_size=8), from_schema(extra, defs, overrides), max_size=3)
    return obj


def _integers(schema: dict[str, Any]) -> st.SearchStrategy:
    lo = schema.get("minimum")
    hi = schema.get("maximum")
    if "exclusiveMinimum" in schema:
        lo = math.floor(schema["exclusiveMinimum"]) + 1
    if "exclusiveMaximum" in schema:
        hi = math.ceil(schema["exclusiveMaximum"]) - 1
    lo = None if lo is None else math.ceil(lo)
    hi = None if hi is None else math.floor(hi)
    return st.integers(min_value=lo, max_value=hi)


def _numbers(schema: dict[str, Any]) -> st.SearchStrategy:
    return st.floats(
        min_value=schema.get("minimum", schema.get("exclusiveMinimum")),
        max_value=schema.get("maximum", schema.get("exclusiveMaximum")),
        exclude_min="exclusiveMinimum" in schema,
        exclude_max="exclusiveMaximum" in schema,
        allow_nan=False,
        allow_infinity=False,
    )


def with_one_field_broken(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid object with one field (existing or new) set to arbitrary JSON."""

    def broken(d: Any) -> st.SearchStrategy:
        if not isinstance(d, dict):
            return st.just(d)
        keys = st.sampled_from(sorted(d)) if d else st.text(max_size=8)
        return st.tuples(st.one_of(keys, st.text(max_size=8)), JSON_VALUES).map(
            lambda kv: {**d, kv[0]: kv[1]}
        )

    return valid.flatmap(broken)


def request_bodies(
    schema: dict[str, Any], defs: dict[str, Any], overrides: dict[str, st.SearchStrategy] | None = None
) -> st.SearchStrategy:
    valid = from_schema(schema, defs, overrides)
    return st.one_of(valid, with_one_field_broken(valid), JSON_VALUES)
