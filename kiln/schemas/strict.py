"""Requests read as the OpenAPI document describes them: JSON types are not coerced, as JSON Schema would not.

pydantic's strict mode refuses `0` for a boolean and `"1"` for a number, as JSON Schema does; it also
refuses `2.0` for an integer, which JSON Schema accepts (a number with no fraction is an integer).
`integral_floats` brings the two into line before validation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def integral_floats(value: Any) -> Any:
    """The JSON value with every float that has no fraction written as an int (2.0 → 2), at any depth."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral_floats(item) for item in value]
    return value


class StrictRequest(BaseModel):
    """A request body: unknown fields refused, JSON types not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integers_as_json_schema_has_them(cls, data: Any) -> Any:
        return integral_floats(data)
