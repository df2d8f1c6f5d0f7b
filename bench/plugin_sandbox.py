"""Start-up of a plugin run of /bin/true (busybox) in tier A (runc) and tier B (bwrap, as nobody), p50 and p95.

Three times per tier, each over --runs runs: the bare tool on the unpacked rootfs (`runc run` of a prepared
bundle; `bwrap` with the same options), the sandbox process alone (Outcome.seconds: /out's tmpfs mounted, the
sandbox started and ended, counters read, /out copied) and the whole `await PluginRun.run()` including its
teardown (runc delete, cgroups removed, bundle deleted). As root; tier B runs in a child dropped to nobody.
Goal (docs/research jobtypes §2.4): p50 ≤ 50 ms in tier A, ≤ 10 ms in tier B.

    python bench/plugin_sandbox.py [--runs 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyseccomp  # noqa: E402,F401 - loaded before tier B drops to nobody, who cannot read /root's interpreter

from kiln.tasks.plugin import Limits, PluginRun, import_image  # noqa: E402
from kiln.tasks.plugin.tiers import NOBODY, Bundle, oci_config  # noqa: E402
from tests.sandbox.busybox_image import write_layout  # noqa: E402
from tests.sandbox.conftest import Forked  # noqa: E402


def quantiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return f"p50 {statistics.median(ms):6.1f} ms  p95 {ms[int(0.95 * (len(ms) - 1))]:6.1f} ms"


def bare(tier: str, image, folder: Path, runs: int) -> list[float]:
    bundle = Bundle(id="kiln-bench-bare", dir=folder / "work" / f"bare-{tier}", rootfs=image.rootfs, argv=["/bin/true"],
                    env=["PATH=/bin"], cwd="/", limits=Limits())  # fmt: skip
    for sub in ("in", "out"):
        (bundle.dir / sub).mkdir(parents=True, exist_ok=True)
    (bundle.dir / "config.json").write_text(json.dumps(oci_config(bundle)))
    argv = ["runc", "run", "--bundle", str(bundle.dir), bundle.id] if tier == "A" else \
        ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--uid", str(NOBODY),
         "--gid", str(NOBODY), "--ro-bind", str(image.rootfs), "/", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "--", "/bin/true"]  # fmt: skip
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True)
        times.append(time.perf_counter() - started)
    return times


def through_kiln(tier: str, image, folder: Path, runs: int) -> tuple[list[float], list[float]]:
    async def main():
        inside, whole = [], []
        for i in range(runs):
            started = time.perf_counter()
            outcome = await PluginRun(image, run_id=f"bench{i}", work_dir=folder / "work", results_dir=folder / f"r{i}",
                                      command=["/bin/true"], tier=tier).run()  # fmt: skip
            whole.append(time.perf_counter() - started)
            assert outcome.ending.value == "completed", outcome.reason
            inside.append(outcome.seconds)
        return inside, whole

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25)
    runs = parser.parse_args().runs
    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-sandbox-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        image = import_image(write_layout(folder / "layout"), folder / "store")
        (folder / "work").mkdir()
        shutil.chown(folder / "work", NOBODY, NOBODY)
        for tier in ("A", "B"):
            nobody = tier == "B"
            raw = Forked(lambda: bare(tier, image, folder, runs), nobody=nobody).result()
            inside, whole = Forked(lambda: through_kiln(tier, image, folder, runs), nobody=nobody).result()
            print(f"tier {tier}  bare tool      {quantiles(raw)}")
            print(f"tier {tier}  sandbox run    {quantiles(inside)}   (Outcome.seconds)")
            print(f"tier {tier}  PluginRun.run  {quantiles(whole)}   (with teardown)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: tier A needs it, and tier B drops to nobody by itself")
    main()
