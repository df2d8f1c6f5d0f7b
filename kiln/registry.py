"""The job types this installation runs: every JobType registered under the `kiln.job_types` entry-point group.

kiln's own types are registered in its pyproject.toml; a lab adds its own from a separate package with

    [project.entry-points."kiln.job_types"]
    my_type = "my_package.flows:JOB_TYPE"

and no change to kiln. A type whose module does not import, or whose libraries are missing, is
left out with a warning, so one broken package never takes the others down.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import entry_points

from kiln.errors import UnknownJobType
from kiln.schemas.job_types import JobType

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kiln.job_types"


@lru_cache(maxsize=1)
def job_types() -> dict[str, JobType]:
    """Every registered job type by name, kiln's own first, whether or not its libraries are installed."""
    found: dict[str, JobType] = {}
    points = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: (not p.value.startswith("kiln."), p.name))
    for point in points:
        try:
            job_type = point.load()
        except Exception as exc:  # noqa: BLE001 - a broken package must not hide the other types
            log.warning("job type %r (%s) could not be loaded: %s", point.name, point.value, exc)
            continue
        if not isinstance(job_type, JobType) or job_type.name != point.name:
            log.warning("entry point %r (%s) is not a JobType named %r; ignored", point.name, point.value, point.name)
            continue
        if job_type.name in found:
            log.warning("job type %r is registered twice; %s ignored", job_type.name, point.value)
            continue
        found[job_type.name] = job_type
    return found


def available_job_types() -> dict[str, JobType]:
    """The registered types whose libraries are installed here."""
    return {name: jt for name, jt in job_types().items() if jt.available}


def job_type(name: str, offered: set[str] | None = None) -> JobType:
    """The type called `name`, or UnknownJobType listing the types there are (those in `offered`, when given)."""
    types = available_job_types()
    if offered is not None:
        types = {n: jt for n, jt in types.items() if n in offered}
    if name not in types:
        raise UnknownJobType(name, list(types))
    return types[name]
