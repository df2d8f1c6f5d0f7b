"""Input of the `hpc_submit` job: a registered callable or a command line, run as `ntasks` tasks on an HPC cluster."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TASKS = 1000

# name → "module:function"; any callable under kiln.tasks may also be named by its path
CALLABLES: dict[str, str] = {
    "spin": "kiln.tasks.hpc.payloads:spin",
    "allocate": "kiln.tasks.hpc.payloads:allocate",
    "simulation": "kiln.tasks.simulation.replicas:run_replica",
}
COMMAND = "command"

_PATH = re.compile(r"^kiln\.tasks(\.[A-Za-z_]\w*)+:[A-Za-z_]\w*$")


def callable_path(name: str) -> str:
    """The 'module:function' a registered name or a kiln.tasks path stands for; ValueError otherwise."""
    if name in CALLABLES:
        return CALLABLES[name]
    if _PATH.match(name):
        return name
    raise ValueError(
        f"{name!r} is neither a registered callable ({', '.join(sorted(CALLABLES))}) "
        "nor a path 'kiln.tasks.<module>:<function>'"
    )


class HpcSubmitInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    callable: str | None = Field(
        None,
        description=(
            "What each task runs: a registered callable ('spin', 'simulation', …) or a path "
            "'kiln.tasks.<module>:<function>'; it is called with `args`, `kwargs`, the task's own kwargs and "
            "task_id, ntasks, progress. Give this or `command`."
        ),
    )
    command: list[str] | None = Field(
        None,
        min_length=1,
        description="A command line each task runs instead (argv list); KILN_TASK_ID and KILN_NTASKS are set.",
    )
    args: list[Any] = Field(default_factory=list, description="Positional arguments of every task's callable.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of every task's callable.")
    task_kwargs: list[dict[str, Any]] | None = Field(
        None, description="Per-task keyword arguments (one dict per task, in task order), merged over `kwargs`."
    )
    ntasks: int = Field(1, ge=1, le=MAX_TASKS, description="How many tasks to split the work into.")

    @field_validator("callable")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None:
            callable_path(value)
        return value

    @model_validator(mode="after")
    def _one_payload(self) -> HpcSubmitInput:
        if (self.callable is None) == (self.command is None):
            raise ValueError(
                "give exactly one of `callable` (a registered Python callable) or `command` (an argv list)"
            )
        if self.task_kwargs is not None and len(self.task_kwargs) != self.ntasks:
            raise ValueError(
                f"task_kwargs has {len(self.task_kwargs)} entries; give one per task (ntasks={self.ntasks})"
            )
        return self

    @property
    def target(self) -> str:
        return self.callable if self.callable is not None else COMMAND

    def kwargs_of_tasks(self) -> list[dict[str, Any]]:
        return [{**self.kwargs, **(self.task_kwargs[i] if self.task_kwargs else {})} for i in range(self.ntasks)]
