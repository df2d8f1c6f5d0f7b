"""lab_booking at scale against the lab simulator: N bookings (500 by default) whose callbacks come at random delays,
a share duplicated and a share preceded by a forged copy.

    python bench/lab_booking.py [--bookings 500] [--slots 2] [--duplicate-rate 0.1] [--forged-rate 0.05] [--json F]

It starts its own kiln stack (SQLite) and `kiln labs simulate`, registers the simulator as a lab, submits the
bookings as one batch, and reports:
- callback → job completed: from the simulator's send of the first final callback kiln accepted (200) to the job's
  completed_at in the index (p50, p95);
- what the waiting bookings hold, sampled every 2 s while none of them has its outcome yet and all are booked:
  the batch slots the index counts busy, the flow runs Prefect has Running or Pending, the suspended jobs (goal: 0
  slots, 0 runs);
- jobs with other than exactly one outcome: a final event count on the SSE stream other than 1, or another status
  than completed (goal: 0);
- forged copies refused (401) and duplicates answered 200.
It exits non-zero unless every job completed through its own flow run with its booking's results, exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime

import httpx

from common import REPO, did_not_run, embedded_stack, percentile

sys.path.insert(0, str(REPO))
from tests.lab.support import simulator  # noqa: E402

FINAL = ("completed", "failed", "cancelled")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bookings", type=int, default=500)
    parser.add_argument("--slots", type=int, default=2, help="kiln worker slots")
    parser.add_argument("--duplicate-rate", type=float, default=0.1)
    parser.add_argument("--forged-rate", type=float, default=0.05)
    parser.add_argument("--delay", type=float, default=1.0, help="wall seconds each callback waits at least")
    parser.add_argument("--start-in-hours", type=float, default=None,
                        help="the slots start this many lab hours ahead (1 lab hour = 1 wall second), so that every "
                        "booking is made and waiting before the first run starts; 4 per booking by default (a "
                        "booking flow run takes 1-5 s on the loaded 2-core machine)")
    parser.add_argument("--max-minutes", type=float, default=150.0,
                        help="stop waiting for the jobs after this long (those not ended count as not exactly once)")
    parser.add_argument("--jitter", type=float, default=30.0, help="up to this many more, per callback")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    if args.start_in_hours is None:
        args.start_in_hours = 4.0 * args.bookings

    env = {"KILN_LAB_POLL_FIRST_SECONDS": "600"}  # callbacks, not asks, are what is measured
    with embedded_stack(slots=args.slots, env=env) as (settings, stack, key), simulator(
        duplicate_rate=args.duplicate_rate, forged_rate=args.forged_rate, callback_delay_s=args.delay,
        callback_jitter_s=args.jitter, progress_steps=0, retry_attempts=10, retry_base_s=1.0,
    ) as lab:  # fmt: skip
        return run(args, settings, key, lab)


def register(lab) -> None:
    added = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "labs", "add", "bench-lab", "--base-url", lab.url, "--resource", "xrd-1",
         "--resource", "furnace-1", "--resource", "synth-1", "--key-env", "LAB_KEY", "--secret-env", "LAB_SECRET"],
        capture_output=True, text=True, env={**os.environ, "LAB_KEY": lab.api_key, "LAB_SECRET": lab.secret},
    )  # fmt: skip
    if added.returncode != 0:
        raise SystemExit(f"kiln labs add failed: {added.stderr}")


def run(args, settings, key: str, lab) -> int:
    register(lab)
    api = httpx.Client(base_url=settings.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    prefect = httpx.Client(base_url=settings.prefect_api, timeout=60)
    resources = ("xrd-1", "furnace-1", "synth-1")
    from datetime import timedelta, timezone

    earliest = (datetime.now(timezone.utc) + timedelta(hours=args.start_in_hours)).isoformat()
    entries = [{"type": "lab_booking", "input": {"lab": "bench-lab", "resource": resources[i % 3], "earliest": earliest,
                "duration_minutes": 1, "deadline_hours": args.start_in_hours + 100, "protocol": {"sample": i}}}
               for i in range(args.bookings)]  # fmt: skip
    submitted = time.monotonic()
    answer = api.post("/api/v1/jobs/submit-batch", json={"jobs": [{"job": e} for e in entries]})
    answer.raise_for_status()
    lines = answer.json()["jobs"]
    ids = [line["job_id"] for line in lines if line.get("job_id")]
    print(f"submitted {len(ids)} bookings in {time.monotonic() - submitted:.2f} s")
    if len(ids) != args.bookings:
        print("refused entries:", [line["error"] for line in lines if not line.get("job_id")][:5])
        return 1

    samples: list[dict] = []
    all_waiting = None
    while True:
        try:
            health = httpx.get(f"{settings.api_url}/healthz", timeout=60).json()
            counts = {state: prefect.post("/flow_runs/count", json={"flow_runs": {"state": {"type": {
                "any_": [state]}}}}).json() for state in ("RUNNING", "PENDING", "COMPLETED")}  # fmt: skip
            bookings = len(lab.client.get("/_sim/bookings").json()["bookings"])
            delivered = sum(1 for d in lab.deliveries() if d["kind"] == "genuine" and d["answer"] == 200
                            and d["status"] in FINAL)  # fmt: skip
        except httpx.HTTPError as exc:  # a loaded machine: sample again
            print(f"sample failed ({type(exc).__name__}); again")
            time.sleep(2)
            continue
        sample = {"t": round(time.monotonic() - submitted, 1), "busy_slots": health["busy_slots"],
                  "suspended": health["suspended_jobs"], "bookings": bookings, "final_callbacks": delivered,
                  **{f"runs_{k.lower()}": v for k, v in counts.items()}}  # fmt: skip
        if bookings >= len(ids) and delivered == 0 and sample["suspended"] >= len(ids):
            samples.append(sample)  # all booked and waiting, none has its outcome: what does waiting hold?
            all_waiting = all_waiting or sample["t"]
        print(sample)
        if sample["runs_completed"] >= len(ids) or time.monotonic() - submitted > 60 * args.max_minutes:
            break
        time.sleep(2)

    jobs = {job_id: api.get(f"/api/v1/jobs/{job_id}").json() for job_id in ids}
    deliveries = lab.deliveries()
    first_final = {}
    for d in sorted(deliveries, key=lambda d: d["sent_at"] or ""):
        if d["kind"] == "genuine" and d["answer"] == 200 and d["status"] in FINAL:
            first_final.setdefault(d["booking"], datetime.fromisoformat(d["sent_at"].replace("Z", "+00:00")))
    latencies, bad = [], []
    for job_id, job in jobs.items():
        if job["status"] not in FINAL:  # its event stream stays open until it ends
            bad.append((job_id, f"{job['status']} ({job['status_reason']})", None, None))
            continue
        ends = [line for line in api.get(f"/api/v1/jobs/{job_id}/events", timeout=60).text.splitlines()
                if line.startswith("event: ") and line[7:] in FINAL]  # fmt: skip
        output = job.get("output") or {}
        ran = job["flow_run_id"] and prefect.get(f"/flow_runs/{job['flow_run_id']}").json()["state"]["type"]
        if (did_not_run(job) or len(ends) != 1 or ran != "COMPLETED"
                or (output.get("results") or {}).get("reference") != job_id):  # fmt: skip
            bad.append((job_id, did_not_run(job) or job["status"], len(ends), ran))
            continue
        sent = first_final.get(output["booking"])
        if sent is not None and output.get("source") == "callback":
            latencies.append((datetime.fromisoformat(job["completed_at"]) - sent).total_seconds())
    refused = [d for d in deliveries if d["kind"] == "forged"]
    duplicates = [d for d in deliveries if d["kind"] == "duplicate"]
    figures = {
        "bookings": len(ids),
        "callback_to_completed_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "callback_to_completed_p95_s": round(percentile(latencies, 95), 3) if latencies else None,
        "timed": len(latencies),
        "all_booked_and_suspended_after_s": all_waiting,
        "waiting_samples": len(samples),
        "max_suspended_while_waiting": max((s["suspended"] for s in samples), default=None),
        "max_busy_slots_while_waiting": max((s["busy_slots"] for s in samples), default=None),
        "max_runs_running_or_pending_while_waiting": max((s["runs_running"] + s["runs_pending"] for s in samples),
                                                         default=None),  # fmt: skip
        "jobs_without_exactly_one_outcome": len(bad),
        "forged_copies": len(refused), "forged_refused_401": sum(1 for d in refused if d["answer"] == 401),
        "duplicates": len(duplicates), "duplicates_answered_200": sum(1 for d in duplicates if d["answer"] == 200),
        "total_s": round(time.monotonic() - submitted, 1),
    }  # fmt: skip
    print(json.dumps(figures, indent=2))
    for item in bad[:10]:
        print("NOT EXACTLY ONCE:", item)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"figures": figures, "samples": samples[:50]}, out, indent=2)
    ok = not bad and figures["forged_refused_401"] == figures["forged_copies"] and len(ids) == args.bookings
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
