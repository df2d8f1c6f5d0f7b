"""What the plugin sandbox adds to a job: a /bin/true plugin_exec job against a sleep(0) job through kiln, in one run.

Starts its own embedded kiln (Prefect server, kiln API, one kiln worker with one slot) under a temporary
KILN_HOME, registers a busybox image as a plugin with `kiln plugins add … --entrypoint /bin/true`, and times,
in rounds (each round the two kiln jobs, their order alternating, then the two direct runs), so that the
machine's load drifts fall on all four alike:

  - a plugin_exec job of that plugin in tier A: POST → the job's `completed` event over SSE (the client's view,
    as bench/latency.py times sleep jobs);
  - a sleep job with seconds=0, submitted with refresh (each one a run, not a cache hit): the platform's own cost;
  - kiln's PluginRun with tier "A" in this process, with the plugin's image, command, environment and limits as
    the job's executor gives them (tasks/plugin/execute.py): `await PluginRun.run()`, /out's tmpfs and the
    teardown (runc delete, cgroups, bundle) included;
  - a bare `runc run` of a bundle PluginRun prepared (the same config.json kiln writes; /out a plain folder, no
    tmpfs holder, and runc removes the container itself).

The sandbox's added cost is the plugin job's p50 (p95) minus the sleep job's; the goal is ≤ 50 ms. It exits
non-zero unless every timed job ran (common.did_not_run) through a flow run of its own with the output it must
have (plugin: ending "completed" in tier A; sleep: slept 0 s), every direct run completed in tier A, and the
stack's worker offers tier A (else it says why not). As root.

    python bench/plugin_exec.py [--runs 50] [--warmup 3] [--json PATH] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import REPO, did_not_run, embedded_stack, percentile

sys.path.insert(0, str(REPO))

from tests.sandbox.busybox_image import write_layout  # noqa: E402

PLUGIN = "bench-true"
GOAL_MS = 50.0
PLUGIN_JOB, SLEEP_JOB = "kiln plugin_exec job, /bin/true", "kiln sleep job, seconds=0"
PLUGIN_RUN, BARE_RUNC = "PluginRun.run, tier A (in-process)", "bare `runc run` of its bundle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed rounds: one of each of the four per round")
    parser.add_argument("--warmup", type=int, default=3, help="rounds run first and not counted")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here as JSON")
    parser.add_argument("--postgres", metavar="URL", help="put the job index and Prefect on fresh databases of this "
                        "server, e.g. postgresql://kiln:kiln@127.0.0.1:5432 (as `make postgres` sets up)")  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: tier A (runc with cgroups) needs it")
    from kiln.tasks.plugin.tiers import detect_tier

    here = detect_tier()
    if "A" not in here.tiers:
        sys.exit(f"this machine cannot offer sandbox tier A: {'; '.join(here.notes)}")

    load = [os.getloadavg()[0]]
    with embedded_stack(slots=1, postgres=args.postgres) as (settings, _, key):
        register_plugin(settings)
        worker_offers_tier_a(settings)
        times, detail = measure(settings, key, args.runs, args.warmup, load)
    load.append(os.getloadavg()[0])
    figures = report(times, detail, args, load)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures written to {args.json}")


def register_plugin(settings) -> None:
    """The busybox image as plugin PLUGIN, running /bin/true, registered as an operator does."""
    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-image-"))
    try:
        added = subprocess.run([sys.executable, "-m", "kiln.cli", "plugins", "add", PLUGIN, "--image",
                                str(write_layout(folder / "layout")), "--entrypoint", "/bin/true"],
                               capture_output=True, text=True, env=dict(os.environ), cwd=REPO)  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if added.returncode != 0:
        sys.exit(f"`kiln plugins add {PLUGIN}` failed: {added.stderr.strip() or added.stdout.strip()}")


def worker_offers_tier_a(settings) -> None:
    """Exits unless the stack's worker offers tier A, with the reasons this process sees."""
    deadline = time.monotonic() + 60
    while True:
        offered = httpx.get(f"{settings.api_url}/healthz", timeout=10).json()["sandbox_tiers"]
        if offered or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not any("A" in tiers for tiers in offered.values()):
        from kiln.tasks.plugin.tiers import detect_tier

        sys.exit(f"the stack's worker offers no sandbox tier A (offered: {offered or 'no worker'}); "
                 f"here: {'; '.join(detect_tier().notes) or 'tier A is offered in this process'}")  # fmt: skip


def measure(settings, key: str, runs: int, warmup: int, load: list[float]):
    from kiln.blocks.plugin import load_plugin
    from kiln.schemas.plugin_exec import LimitsOverride
    from kiln.sdk import Client
    from kiln.tasks.plugin.images import open_image

    plugin = asyncio.run(load_plugin(PLUGIN))
    image = open_image(Path(plugin.image_path))
    direct = Direct(image, plugin.argv, plugin.env, plugin.limits_for(LimitsOverride()), settings.home_dir / "direct")
    times = {name: [] for name in (PLUGIN_JOB, SLEEP_JOB, PLUGIN_RUN, BARE_RUNC)}
    detail = {"plugin_exec": [], "sleep": []}
    flow_runs: set[str] = set()
    with Client(settings.api_url, key) as client:
        try:
            for i in range(warmup + runs):
                jobs = [("plugin_exec", {"plugin": PLUGIN, "tier": "A"}), ("sleep", {"seconds": 0})]
                timed = {}
                for job_type, job_input in jobs if i % 2 else reversed(jobs):
                    timed[job_type] = timed_job(client, job_type, job_input, flow_runs)
                timed_run = direct.plugin_run(i)
                timed_bare = direct.bare_runc()
                load.append(os.getloadavg()[0])
                if i < warmup:
                    continue
                for job_type, name in (("plugin_exec", PLUGIN_JOB), ("sleep", SLEEP_JOB)):
                    seconds, submitted, job = timed[job_type]
                    times[name].append(seconds)
                    detail[job_type].append({"submit": submitted, **job_detail(job)})
                times[PLUGIN_RUN].append(timed_run)
                times[BARE_RUNC].append(timed_bare)
        finally:
            direct.close()
    return times, detail


def timed_job(client, job_type: str, job_input: dict, flow_runs: set[str]):
    """Seconds from just before the POST to the job's `completed` event over SSE, seconds the POST took, and the
    job read back; exits unless it really ran."""
    started = time.perf_counter()
    # refresh: each one a run, not a cache hit (as latency.py; plugin_exec is never cacheable anyway)
    job = client.jobs.create(type=job_type, input=job_input, refresh=True)
    submitted = time.perf_counter() - started
    elapsed = None
    for event in client.jobs.events(job.id):
        if event.is_terminal:
            if event.event == "completed":
                elapsed = time.perf_counter() - started
            break
    job.refresh()
    problem = did_not_do_its_work(job)
    if problem is None and elapsed is None:
        problem = "its event stream ended with no `completed` event"
    if problem is None and job.flow_run_id in flow_runs:
        problem = f"its flow run {job.flow_run_id} is another job's"
    if problem:
        sys.exit(f"{job_type} job {job.id}: {problem}; every timed job must have run")
    flow_runs.add(job.flow_run_id)
    return elapsed, submitted, job


def did_not_do_its_work(job) -> str | None:
    """Why the job does not count as a run that did its work; None when it does."""
    if problem := did_not_run(job):
        return problem
    out = job.output or {}
    if job.type == "plugin_exec":
        if out.get("ending") != "completed" or out.get("tier") != "A":
            return f"output names ending {out.get('ending')!r} in tier {out.get('tier')!r}, not 'completed' in A"
    elif out.get("slept_seconds") != 0:
        return f"output {out!r} is not a sleep of 0 s"
    return None


def job_detail(job) -> dict:
    """Where the job's time went by the job index's clock, and the sandbox's own seconds (Outcome.seconds)."""
    return {"created_to_started": (job.started_at - job.created_at).total_seconds(),
            "started_to_completed": (job.completed_at - job.started_at).total_seconds(),
            "sandbox": (job.output or {}).get("seconds")}  # fmt: skip


class Direct:
    """The plugin's run without kiln's job around it: kiln's own PluginRun in tier A, and runc on its bundle."""

    def __init__(self, image, argv, env, limits, folder: Path):
        self.image, self.argv, self.env, self.limits, self.folder = image, argv, env, limits, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.loop = asyncio.new_event_loop()
        # a bundle as PluginRun lays it out and RuncTier writes its config.json, for `runc run` to start again
        # and again (without --keep runc deletes the container and its cgroups when /bin/true exits)
        self.bare = self._plugin_run("bare")
        bundle = self.bare.bundle
        # the folders Sandbox.start makes (the plugin has no inputs; /out stays a plain folder here, no tmpfs)
        bundle.in_dir.mkdir(parents=True)
        bundle.out_dir.mkdir()
        bundle.dir.chmod(0o755)
        self.bare_argv = [arg for arg in self.bare.tier.prepare(bundle).argv if arg != "--keep"]

    def _plugin_run(self, run_id: str):
        from kiln.tasks.plugin.sandbox import PluginRun

        # as tasks/plugin/execute.py builds it for a job with no input, files or env of its own
        return PluginRun(self.image, run_id=run_id, work_dir=self.folder, results_dir=self.folder / f"{run_id}.results",
                         limits=self.limits, command=self.argv, input=None, files={}, env=self.env,
                         on_stdout=lambda line: None, tier="A")  # fmt: skip

    def plugin_run(self, i: int) -> float:
        run = self._plugin_run(f"bench{i}")
        started = time.perf_counter()
        outcome = self.loop.run_until_complete(run.run())
        elapsed = time.perf_counter() - started
        shutil.rmtree(run.results_dir, ignore_errors=True)
        if outcome.ending.value != "completed" or outcome.tier != "A":
            sys.exit(f"PluginRun {run.bundle.id} ended {outcome.ending.value} ({outcome.reason}) "
                     f"in tier {outcome.tier}")
        return elapsed

    def bare_runc(self) -> float:
        started = time.perf_counter()
        done = subprocess.run(self.bare_argv, stdin=subprocess.DEVNULL, capture_output=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"`{' '.join(self.bare_argv)}` exited {done.returncode}: {done.stderr.decode().strip()}")
        return elapsed

    def close(self) -> None:
        subprocess.run(["runc", "delete", "--force", self.bare.bundle.id], capture_output=True)
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95 % confidence interval of the median: the order statistics n/2 ∓ 1.96·√n/2."""
    ordered = sorted(values)
    half = 1.96 * len(ordered) ** 0.5 / 2
    return ordered[max(0, int(len(ordered) / 2 - half))], ordered[min(len(ordered) - 1, int(len(ordered) / 2 + half))]


def report(times: dict[str, list[float]], detail: dict[str, list[dict]], args, load: list[float]) -> dict:
    def p(name: str, q: float) -> float:
        return percentile(times[name], q) * 1000

    def of(job_type: str, field: str, q: float) -> float | None:
        values = [d[field] for d in detail[job_type] if d[field] is not None]
        return percentile(values, q) * 1000 if values else None

    added = {q: p(PLUGIN_JOB, q) - p(SLEEP_JOB, q) for q in (50, 95)}
    paired = [a - b for a, b in zip(times[PLUGIN_JOB], times[SLEEP_JOB])]
    low, high = (v * 1000 for v in median_interval(paired))
    met = added[50] <= GOAL_MS and added[95] <= GOAL_MS
    in_worker = of("plugin_exec", "started_to_completed", 50) - of("sleep", "started_to_completed", 50)
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print()
    print(f"/bin/true (busybox) as a plugin, tier A, against sleep(0): 2-core machine shared with other work, load "
          f"average {load[0]:.2f} at the start, {max(load):.2f} at most, {load[-1]:.2f} at the end; one worker slot, "
          f"job index and Prefect on {backend}; {args.runs} rounds after {args.warmup} warm-up, one of each per "
          f"round")  # fmt: skip
    print(f"{'':<40} {'p50':>9} {'p95':>9} {'min':>9} {'max':>9}")
    for name, values in times.items():
        print(f"{name:<40} {p(name, 50):6.1f} ms {p(name, 95):6.1f} ms {min(values) * 1000:6.1f} ms "
              f"{max(values) * 1000:6.1f} ms")  # fmt: skip
    print(f"{'sandbox added (plugin job − sleep job)':<40} {added[50]:+6.1f} ms {added[95]:+6.1f} ms"
          f"   (per round: median {percentile(paired, 50) * 1000:+.1f} ms, 95 % interval {low:+.1f} … {high:+.1f})")
    print(f"goal: added ≤ {GOAL_MS:g} ms at p50 and p95: {'met' if met else 'NOT met'}"
          + (f"; the run cannot tell (the median per-round difference lies anywhere in {low:+.0f} … {high:+.0f} ms)"
             if low <= GOAL_MS < high else ""))  # fmt: skip
    print("the POST, p50: " + ", ".join(f"{job_type} {of(job_type, 'submit', 50):.1f} ms" for job_type in detail))
    print("by the job index's clock, p50: " + "; ".join(
        f"{job_type} created → started {of(job_type, 'created_to_started', 50):.1f} ms, started → completed "
        f"{of(job_type, 'started_to_completed', 50):.1f} ms" for job_type in detail)
        + f"; the plugin job's started → completed is {in_worker:+.1f} ms over the sleep job's")  # fmt: skip
    print(f"the plugin jobs' sandbox in the worker (Outcome.seconds): p50 {of('plugin_exec', 'sandbox', 50):.1f} ms, "
          f"p95 {of('plugin_exec', 'sandbox', 95):.1f} ms")  # fmt: skip
    return {
        "runs": args.runs, "warmup": args.warmup, "backend": backend,
        "load_average": {"start": load[0], "max": max(load), "end": load[-1]},
        "ms": {name: {"p50": p(name, 50), "p95": p(name, 95), "min": min(v) * 1000, "max": max(v) * 1000}
               for name, v in times.items()},
        "added_ms": {"p50": added[50], "p95": added[95], "per_round_median": percentile(paired, 50) * 1000,
                     "per_round_median_95_interval": [low, high], "started_to_completed_p50": in_worker},
        "goal_ms": GOAL_MS, "goal_met": met,
        "job_index_ms": {job_type: {field: {"p50": of(job_type, field, 50), "p95": of(job_type, field, 95)}
                                    for field in ("submit", "created_to_started", "started_to_completed", "sandbox")}
                         for job_type in detail},
        "seconds": times,
    }  # fmt: skip


if __name__ == "__main__":
    main()
