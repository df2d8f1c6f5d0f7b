"""Where an mcp_host replica's process runs, as a Launcher: a command under the worker held to plugin_exec's tier B
limits (ConfinedLauncher), a plugin image in plugin_exec's sandbox (SandboxLauncher); `launcher_for` picks one.

Both name what they make after the job's flow run, `kiln-<flow run id>-<random>`, in the worker's sandbox folder,
as plugin_exec's runs are named: a worker that dies leaves nothing the next one (or its own cleanup of the run)
does not remove.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.schemas.mcp_host import McpHostInput, PluginServer, UrlServer
from kiln.schemas.plugins import Limits
from kiln.tasks.mcp.errors import ReplicaFailed
from kiln.tasks.mcp.process import STDOUT_LIMIT, Launcher, ServerProcess, command_env
from kiln.tasks.plugin.images import ImageRef
from kiln.tasks.plugin.limits import SandboxFailed
from kiln.tasks.plugin.sandbox import Confinement, Sandbox
from kiln.tasks.plugin.tiers import TIERS


# what tier B holds a command to (the rest of Limits is a sandbox's: /out, /tmp, a wall time)
COMMAND_LIMITS = ("cpus", "memory_mb", "pids")


@dataclass
class ConfinedLauncher:
    """Starts a command under the worker, its process tree held to `limits` as tier B holds a plugin's; those in
    `optional` (defaults nobody asked for) only where the worker can hold them (tiers.process_limits)."""

    limits: Limits
    work_dir: Path
    run_id: str
    optional: frozenset[str] = frozenset()

    def check(self) -> dict[str, str]:
        """How each limit is held on this worker; LimitUnenforceable, naming it, for one asked for that cannot be."""
        return Confinement(run_id=self.run_id, work_dir=self.work_dir, limits=self.limits,
                           optional=self.optional).enforcement  # fmt: skip

    async def __call__(self, argv: Sequence[str], env: Mapping[str, str], stdio: bool) -> ServerProcess:
        confinement = Confinement(run_id=self.run_id, work_dir=self.work_dir, limits=self.limits,
                                  optional=self.optional)  # fmt: skip
        try:
            return await ServerProcess.start(argv, command_env(env), stdio=stdio, enclosure=confinement,
                                             preexec=confinement.preexec())  # fmt: skip
        except BaseException:
            await asyncio.shield(confinement.teardown())
            raise


@dataclass
class SandboxLauncher:
    """Starts a plugin image's server in plugin_exec's sandbox (tier A or B), long-running, speaking stdio over its
    pipes; its stop tears the container, cgroups and mounts down."""

    image: ImageRef
    tier: str
    limits: Limits
    work_dir: Path
    run_id: str

    async def __call__(self, argv: Sequence[str], env: Mapping[str, str], stdio: bool) -> ServerProcess:
        if not stdio:  # refused at submission: the sandbox's network is its own loopback
            raise ReplicaFailed("a plugin's server speaks stdio only", "not stdio")
        sandbox = Sandbox(self.image, run_id=self.run_id, work_dir=self.work_dir, limits=self.limits, command=argv,
                          env=env, tier=self.tier, persistent=True)  # fmt: skip
        try:
            process = await sandbox.start(stream_limit=STDOUT_LIMIT)
        except SandboxFailed as failed:
            raise ReplicaFailed(str(failed), "sandbox failed") from None
        return ServerProcess(process, sandbox)


async def launcher_for(spec: McpHostInput, run_id: str | None) -> tuple[Launcher | None, list[str] | None]:
    """How the deployment's replicas start, and the command a plugin's run (None: a command's own); (None, None)
    for a url. A plugin that is not registered, a tier or a limit this worker cannot give is refused here, before
    any replica starts, naming it."""
    from kiln.blocks.plugin import plugin_for_run
    from kiln.tasks.plugin.execute import choose_tier, offered_tiers, work_dir
    from kiln.tasks.plugin.images import open_image

    run_id = run_id or f"local-{secrets.token_hex(4)}"
    if isinstance(spec.server, PluginServer):
        plugin = await plugin_for_run(spec.server.plugin, field="input.server.plugin")
        tier = choose_tier(plugin.tier, offered_tiers())
        limits = spec.limits.over(plugin.limits)
        TIERS[tier].enforcement(limits, persistent=True)  # LimitUnenforceable, naming the limit
        launcher = SandboxLauncher(open_image(Path(plugin.image_path)), tier, limits, work_dir(), run_id)
        return launcher, plugin.argv
    if isinstance(spec.server, UrlServer):
        return None, None
    asked = frozenset(spec.limits.model_dump(exclude_none=True))
    launcher = ConfinedLauncher(spec.limits.over(Limits()), work_dir(), run_id, frozenset(COMMAND_LIMITS) - asked)
    launcher.check()  # LimitUnenforceable, naming the limit
    return launcher, None
