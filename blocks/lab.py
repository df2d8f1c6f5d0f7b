"""A lab as a Prefect Block: where lab_booking jobs book (its URL and resources), with its API key and the secret(s)
its callbacks are signed with kept as secrets.

A lab is registered by name (`kiln labs add NAME …`, POST /api/v1/labs, or the Prefect UI). The API key and the
signing secrets are `SecretStr` fields: Prefect keeps them encrypted and shows them obfuscated, and `summary` (what
GET /api/v1/labs answers) leaves them out; no job input, flow-run parameter, event or log line carries them. During
a rotation of the signing secret the lab signs with both (two signatures in one header) or switches at once; kiln
accepts either secret until the previous one is removed (`kiln labs add NAME --rotate-secret`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from kiln.blocks import http_base_url, registered, some_names
from kiln.errors import InputInvalid
from kiln.schemas.lab_booking import LabBookingInput

log = logging.getLogger("kiln.labs")


class Lab(Block):
    """A robot lab or a facility that kiln books slots on, speaking kiln's lab protocol (README, "The lab protocol")."""

    _block_type_name: ClassVar[str] = "kiln lab"
    _block_type_slug: ClassVar[str] = "kiln-lab"
    _description: ClassVar[str] = (
        "A lab or facility lab_booking jobs book slots on: its base URL and resources, its API key and the secret "
        "its callbacks are signed with (Standard Webhooks)."
    )

    base_url: str = Field(description="The lab's API: kiln calls BASE_URL/slots and BASE_URL/bookings.")
    api_key: SecretStr = Field(description="Sent to the lab as `Authorization: Bearer`; never shown.")
    signing_secret: SecretStr = Field(
        description="The Standard Webhooks secret (whsec_…) the lab signs its callbacks with; never shown."
    )
    previous_signing_secret: SecretStr | None = Field(
        None, description="The secret before the last rotation, still accepted until it is removed; never shown."
    )
    resources: list[str] = Field(description="The lab's resources a booking may name (instruments, robots).")
    description: str = Field("", description="What the lab is.")
    project_id: str | None = Field(
        None, description="The project whose key registered it through the API: only that project may replace or "
        "remove it. None for an operator's (`kiln labs add`).",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return http_base_url(value)

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: list[str]) -> list[str]:
        return some_names(value, "resource")

    def signing_secrets(self) -> list[str]:
        """The secrets a callback may be signed with: the current one, and the previous one during a rotation."""
        found = [self.signing_secret.get_secret_value()]
        if self.previous_signing_secret is not None:
            found.append(self.previous_signing_secret.get_secret_value())
        return found

    def summary(self, name: str) -> dict[str, Any]:
        """What GET /api/v1/labs shows: never the key or the secrets, only whether a rotation is under way."""
        return {
            "name": name, "base_url": self.base_url, "resources": self.resources, "description": self.description,
            "rotating_secret": self.previous_signing_secret is not None,
            "registered_by": "operator" if self.project_id is None else "project",
        }  # fmt: skip


async def registered_labs() -> dict[str, Lab]:
    """Every registered lab by name, read from the Prefect API."""
    return await registered(Lab)


async def load_lab(name: str) -> Lab | None:
    try:
        return await Lab.aload(name)
    except ValueError:
        return None


def unknown_lab(name: str, known: list[str], field: str = "input.lab") -> InputInvalid:
    return InputInvalid(
        f"{field}: no lab {name!r} is registered; registered: {', '.join(known) or 'none'} (`kiln labs add`, "
        "POST /api/v1/labs)",
        details=[{"loc": field.split("."), "msg": "unknown lab", "type": "unknown_lab", "input": name,
                  "registered": known}],
    )  # fmt: skip


async def check_booking(job_input: LabBookingInput, settings=None) -> None:
    """At submission (JobType.check): the lab is registered and offers the resource."""
    labs = await TABLE.current(refresh_for=job_input.lab)
    lab = labs.get(job_input.lab)
    if lab is None:
        raise unknown_lab(job_input.lab, sorted(labs))
    if job_input.resource not in lab.resources:
        raise InputInvalid(
            f"input.resource: {job_input.resource!r} is not a resource of lab {job_input.lab!r}; it offers "
            f"{', '.join(lab.resources)}",
            details=[{"loc": ["input", "resource"], "msg": "unknown resource", "type": "unknown_resource",
                      "input": job_input.resource, "offered": lab.resources}],
        )  # fmt: skip


# how old the lab table a process holds may get before it is read again from Prefect's blocks
LABS_TTL_SECONDS = 5.0


class LabTable:
    """The registered labs (their secrets in memory only), as one process knows them: read again after
    LABS_TTL_SECONDS, and at once (unless younger than a second) for a lab it does not know or a signature no
    secret it holds matches — a lab registered, or a secret rotated, a moment ago."""

    def __init__(self) -> None:
        self.labs: dict[str, Lab] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def current(self, refresh_for: str | None = None) -> dict[str, Lab]:
        age = time.monotonic() - self._read_at
        if age > LABS_TTL_SECONDS or (refresh_for is not None and refresh_for not in self.labs and age > 1.0):
            await self.read()
        return self.labs

    async def read(self) -> dict[str, Lab]:
        async with self._lock:
            self.labs, self._read_at = await registered_labs(), time.monotonic()
        return self.labs

    @property
    def age(self) -> float:
        return time.monotonic() - self._read_at

    def forget(self) -> None:
        self._read_at = float("-inf")


# the process's table: the callback hook, submissions' checks and the lab watch read it
TABLE = LabTable()
