"""The Plugin block and its registration request, no Prefect server: the input schema checked, the listing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln.blocks.plugin import Plugin
from kiln.schemas.plugins import Limits, PluginSpec

DIGEST = "sha256:" + "ab" * 32


def plugin(**fields) -> Plugin:
    return Plugin(image_digest=DIGEST, image_path=f"/kiln/plugin-images/sha256-{'ab' * 32}",
                  entrypoint=["/bin/relax", "--fast"], **fields)  # fmt: skip


def test_summary_shows_all_but_the_values_of_the_environment():
    block = plugin(args=["in.json"], env={"TOKEN": "s3cret", "MODE": "x"}, limits=Limits(memory_mb=256),
                   input_schema={"type": "object"}, description="relaxes a structure")  # fmt: skip
    summary = block.summary("relax")
    assert summary == {
        "name": "relax", "image_digest": DIGEST, "image_path": block.image_path,
        "entrypoint": ["/bin/relax", "--fast"], "args": ["in.json"], "env_names": ["MODE", "TOKEN"],
        "limits": {"cpus": 1.0, "memory_mb": 256, "pids": 64, "wall_seconds": 60.0, "output_mb": 10, "tmp_mb": 64},
        "input_schema": {"type": "object"}, "tier": None, "description": "relaxes a structure",
    }  # fmt: skip
    assert "s3cret" not in str(summary)
    assert block.argv == ["/bin/relax", "--fast", "in.json"]
    assert Plugin.get_block_type_slug() == "kiln-plugin"


@pytest.mark.parametrize("schema, where", [
    ({"type": "objekt"}, "at type:"),
    ({"properties": {"x": {"minimum": "zero"}}}, "at properties/x/minimum: 'zero' is not of type 'number'"),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "required": "x"}, "at required:"),
])  # fmt: skip
def test_an_input_schema_that_is_no_json_schema_is_refused_naming_the_keyword(schema, where):
    for build in (lambda: plugin(input_schema=schema), lambda: PluginSpec(name="relax", input_schema=schema)):
        with pytest.raises(ValidationError) as caught:
            build()
        assert f"not a valid JSON Schema {where}" in str(caught.value)


def test_a_valid_input_schema_is_kept_as_given():
    schema = {"type": "object", "properties": {"steps": {"type": "integer", "minimum": 1}}, "required": ["steps"]}
    assert plugin(input_schema=schema).input_schema == schema
    assert PluginSpec(name="relax", input_schema=schema).input_schema == schema


def test_a_plugin_needs_a_program_and_a_name_prefect_takes():
    with pytest.raises(ValidationError, match="no program to run"):
        Plugin(image_digest=DIGEST, image_path="/x", entrypoint=[])
    for name in ("Relax", "relax_1", "-relax", ""):
        with pytest.raises(ValidationError, match="name"):
            PluginSpec(name=name)
    with pytest.raises(ValidationError, match="not an environment variable name"):
        PluginSpec(name="relax", env={"A=B": "1"})
    with pytest.raises(ValidationError, match="memory_mb"):
        PluginSpec(name="relax", limits={"memory_mb": 1})
