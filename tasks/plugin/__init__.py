"""The sandbox of plugin_exec: daemonless OCI images run under runc (tier A) or bwrap (tier B) with enforced limits."""

from kiln.tasks.plugin.images import ImageRef, InvalidImage, import_image
from kiln.tasks.plugin.limits import Ending, Limits, LimitUnenforceable, SandboxFailed
from kiln.tasks.plugin.sandbox import Confinement, Outcome, PluginRun, Sandbox, claim_work_dir, clean_leftovers
from kiln.tasks.plugin.tiers import TierCheck, detect_tier

__all__ = [
    "Confinement",
    "Ending",
    "ImageRef",
    "InvalidImage",
    "LimitUnenforceable",
    "Limits",
    "Outcome",
    "PluginRun",
    "Sandbox",
    "SandboxFailed",
    "TierCheck",
    "claim_work_dir",
    "clean_leftovers",
    "detect_tier",
    "import_image",
]
