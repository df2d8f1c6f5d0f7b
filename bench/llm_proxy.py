"""LLM call overhead: time to first token and total, direct to llmock, through kiln, and through LiteLLM, in one run.

Starts llmock (the test suite's mock provider) on loopback, its own embedded kiln under a temporary
KILN_HOME with llmock registered as an OpenAI and an Anthropic provider (`kiln llm providers add`), and,
unless --no-litellm, LiteLLM's proxy from a venv of its own (made at --litellm-venv with pip when missing;
LiteLLM is never installed into kiln's environment) with a config pointing at the same llmock. Every path
is driven by the same client code, the official `openai` and `anthropic` SDKs, only base_url and key
differing, one call at a time; the paths take turns call by call (each round starting at the next path),
so the machine's noise falls on all alike.

TTFT is from just before the SDK sends the request to the first chunk carrying text (for a call that does
not stream, TTFT = total); total is to the end of the stream or of the parsed answer.

The speed goal (kiln adds ≤ 5 ms p95 TTFT over direct) is reported, never asserted. The run exits
non-zero unless every kiln call really ran, warm-up included: its job (x-kiln-job-id) read back as an
llm_proxy job that ran (common.did_not_run: completed, with its flow run and started_at) with the usage and
text the client received; and unless every direct and kiln call got a real answer (text and a non-zero output
token count).

    python bench/llm_proxy.py [--calls 200] [--warmup 20] [--protocols openai,anthropic]
                              [--litellm-venv /tmp/venv-litellm | --no-litellm]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai

from common import did_not_run, embedded_stack, free_port, percentile, stop

MESSAGES = [{"role": "user", "content": "What is BaTiO3?"}]
MAX_TOKENS = 30
MODELS = {"openai": "mock-gpt", "anthropic": "mock-claude"}
UPSTREAM_KEY = "sk-bench-upstream"  # llmock takes any key; kiln and LiteLLM hold this one for it
LITELLM_KEY = "sk-litellm-bench"
# the release `litellm[proxy]` resolved to on this machine; pinned so runs on different days measure one proxy
LITELLM = "litellm[proxy]==1.108.7"
GOAL_TTFT_P95_MS = 5.0
DIRECT, KILN = "direct to llmock", "through kiln"
LLMOCK = [sys.executable, "-c", "from llmock.cli import app; app()"]


@dataclass(frozen=True)
class Mode:
    protocol: str  # openai or anthropic
    stream: bool

    def __str__(self) -> str:
        api = "OpenAI chat.completions" if self.protocol == "openai" else "Anthropic messages"
        return f"{api}, {'streaming' if self.stream else 'not streaming'}"


@dataclass
class Target:
    """One way to the provider: its name in the report and an SDK client of each protocol pointed along it."""

    name: str
    clients: dict[str, openai.OpenAI | anthropic.Anthropic]


@dataclass
class Call:
    target: str
    mode: Mode
    ttft: float = math.nan
    total: float = math.nan
    text: str = ""
    output_tokens: int = 0
    job_id: str | None = None
    error: str | None = None
    timed: bool = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per path and mode")
    parser.add_argument("--warmup", type=int, default=20, help="calls per path and mode first, not timed")
    parser.add_argument("--protocols", default="openai,anthropic", help="openai, anthropic, or both (comma-separated)")
    parser.add_argument("--litellm-venv", type=Path, default=Path("/tmp/venv-litellm"),
                        help=f"LiteLLM's own venv; made there with `pip install '{LITELLM}'` when missing")  # fmt: skip
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    args = parser.parse_args()
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or set(protocols) - set(MODELS):
        parser.error(f"--protocols: {args.protocols!r}; give openai, anthropic or openai,anthropic")
    modes = [Mode(protocol, stream) for protocol in protocols for stream in (False, True)]

    load_before = os.getloadavg()[0]
    started = []
    try:
        llmock, llmock_port = start_llmock()
        started.append(llmock)
        upstream = f"http://127.0.0.1:{llmock_port}"
        with embedded_stack(slots=1) as (settings, _, key):
            register_providers(upstream)
            kiln = f"{settings.api_url}/api/v1/llm"
            targets = [
                target(DIRECT, f"{upstream}/v1", f"{upstream}/anthropic", UPSTREAM_KEY),
                target(KILN, f"{kiln}/openai/v1", f"{kiln}/anthropic", key),
            ]
            litellm_note = "LiteLLM left out (--no-litellm)"
            if not args.no_litellm:
                litellm, litellm_note = start_litellm(args.litellm_venv, upstream, settings.home_dir)
                if litellm is not None:
                    process, port = litellm
                    started.append(process)
                    # one root serves both: Chat Completions at /v1, Messages at /v1/messages
                    litellm_root = f"http://127.0.0.1:{port}"
                    targets.append(target(litellm_note, f"{litellm_root}/v1", litellm_root, LITELLM_KEY))
            print(f"{args.warmup} warm-up and {args.calls} timed calls per path and mode; paths: "
                  f"{', '.join(p.name for p in targets)}", flush=True)  # fmt: skip
            calls = measure(targets, modes, args.calls, args.warmup)
            with httpx.Client(base_url=settings.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
                unrecorded = kiln_calls_not_recorded(http, [c for c in calls if c.target == KILN])
    finally:
        for process in started:
            stop(process)

    unanswered = {p.name: [c for c in calls if c.target == p.name and not answered(c)] for p in targets}
    report(targets, modes, calls, args, litellm_note, load_before, unanswered)
    failures = unanswered[DIRECT] + unanswered[KILN]
    if failures or unrecorded:
        for call in failures[:5]:
            print(f"no real answer: {call.target}, {call.mode}: {call.error or repr(call.text)}, "
                  f"{call.output_tokens} output tokens")  # fmt: skip
        for problem in unrecorded[:5]:
            print(f"kiln call not recorded as run: {problem}")
        raise SystemExit(f"{len(failures)} direct or kiln calls without a real answer, {len(unrecorded)} kiln calls "
                         f"not recorded as a completed llm_proxy job with its usage: the figures do not count")  # fmt: skip
    kiln_calls = sum(c.target == KILN for c in calls)
    print(f"every kiln call ({kiln_calls}, warm-up included) is a completed llm_proxy job recording the usage and "
          f"text its client received; every direct call got an answer")  # fmt: skip


# the providers


def serve(argv: list[str], port: int, probe: str, log: Path | None = None, env: dict | None = None,
          timeout: float = 60) -> subprocess.Popen:  # fmt: skip
    """Starts a server and waits until it answers `probe`; raises RuntimeError with its log's tail if it exits."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log else []
            raise RuntimeError(f"exited with {process.returncode}: {' | '.join(tail) or 'no output'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{probe}", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.terminate()
    process.wait()
    raise RuntimeError(f"did not answer {probe} within {timeout:g} s")


def start_llmock() -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [*LLMOCK, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return serve(argv, port, "/v1/models"), port


def register_providers(upstream: str) -> None:
    """llmock as kiln's providers, registered as a user would."""
    for kind, base_url in (("openai", f"{upstream}/v1"), ("anthropic", f"{upstream}/anthropic")):
        subprocess.run([sys.executable, "-m", "kiln.cli", "llm", "providers", "add", f"bench-{kind}", "--kind", kind,
                        "--base-url", base_url, "--model", MODELS[kind], "--key-env", "BENCH_LLM_KEY", "--overwrite"],
                       check=True, capture_output=True, env={**os.environ, "BENCH_LLM_KEY": UPSTREAM_KEY})  # fmt: skip


def start_litellm(venv: Path, upstream: str, workdir: Path) -> tuple[tuple[subprocess.Popen, int] | None, str]:
    """LiteLLM's proxy in front of llmock, from its own venv: ((process, port), its name), or (None, why not)."""
    command, python = venv / "bin" / "litellm", venv / "bin" / "python"
    if not command.exists():
        print(f"installing {LITELLM} into {venv}, a venv of its own (a minute or two)", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", LITELLM], check=True, capture_output=True,
                           text=True, timeout=1200)  # fmt: skip
        except subprocess.CalledProcessError as exc:
            errors = [line for line in exc.stderr.splitlines() if line.startswith("ERROR")] or exc.stderr.splitlines()
            return None, f"LiteLLM left out: installing it into {venv} failed: {' | '.join(errors[-2:])}"
        except subprocess.TimeoutExpired:
            return None, f"LiteLLM left out: installing it into {venv} took over 20 minutes"
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    name = f"LiteLLM {version}" if version else f"LiteLLM (no version found in {venv})"
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODELS['openai']}\n"
        f"    litellm_params: {{model: openai/{MODELS['openai']}, api_base: '{upstream}/v1', api_key: {UPSTREAM_KEY}}}\n"
        f"  - model_name: {MODELS['anthropic']}\n"
        f"    litellm_params: {{model: anthropic/{MODELS['anthropic']}, api_base: '{upstream}/anthropic', "
        f"api_key: {UPSTREAM_KEY}}}\n"
        f"general_settings: {{master_key: {LITELLM_KEY}}}\n"
    )
    port = free_port()
    # its bundled price table, not the one it would fetch; no database, so no spend log (its default)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    argv = [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    log = workdir / "litellm.log"
    try:
        process = serve(argv, port, "/health/liveliness", log, env, timeout=120)
    except RuntimeError as exc:
        return None, f"{name} left out: its proxy did not start ({exc}); log at {log}"
    return (process, port), f"through {name}"


# the calls


def target(name: str, openai_base: str, anthropic_base: str, key: str) -> Target:
    """The two SDK clients along one path: from path to path only base_url and key differ."""
    return Target(name, {
        "openai": openai.OpenAI(base_url=openai_base, api_key=key, max_retries=0, timeout=60),
        "anthropic": anthropic.Anthropic(base_url=anthropic_base, api_key=key, max_retries=0, timeout=60),
    })  # fmt: skip


def openai_call(client: openai.OpenAI, call: Call) -> None:
    request = {"model": MODELS["openai"], "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    started = time.perf_counter()
    if not call.mode.stream:
        raw = client.chat.completions.with_raw_response.create(**request)
        answer = raw.parse()
        call.ttft = call.total = time.perf_counter() - started
        call.text = answer.choices[0].message.content or ""
        call.output_tokens = answer.usage.completion_tokens if answer.usage else 0
        call.job_id = raw.headers.get("x-kiln-job-id")
        return
    parts = []
    with client.chat.completions.with_streaming_response.create(
        **request, stream=True, stream_options={"include_usage": True}
    ) as response:
        for chunk in response.parse():
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                if not parts:
                    call.ttft = time.perf_counter() - started
                parts.append(text)
            if chunk.usage:
                call.output_tokens = chunk.usage.completion_tokens
        call.total = time.perf_counter() - started
        call.job_id = response.headers.get("x-kiln-job-id")
    call.text = "".join(parts)


def anthropic_call(client: anthropic.Anthropic, call: Call) -> None:
    request = {"model": MODELS["anthropic"], "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    started = time.perf_counter()
    if not call.mode.stream:
        raw = client.messages.with_raw_response.create(**request)
        message = raw.parse()
        call.ttft = call.total = time.perf_counter() - started
        call.text = "".join(block.text for block in message.content if block.type == "text")
        call.output_tokens = message.usage.output_tokens
        call.job_id = raw.headers.get("x-kiln-job-id")
        return
    parts = []
    with client.messages.with_streaming_response.create(**request, stream=True) as response:
        for event in response.parse():
            if event.type == "content_block_delta" and event.delta.type == "text_delta" and event.delta.text:
                if not parts:
                    call.ttft = time.perf_counter() - started
                parts.append(event.delta.text)
            elif event.type == "message_delta":
                call.output_tokens = event.usage.output_tokens
        call.total = time.perf_counter() - started
        call.job_id = response.headers.get("x-kiln-job-id")
    call.text = "".join(parts)


CALLERS = {"openai": openai_call, "anthropic": anthropic_call}


def measure(targets: list[Target], modes: list[Mode], rounds: int, warmup: int) -> list[Call]:
    """Every call, warm-up included: in each round one call per path and mode, the paths taking turns."""
    calls = []
    clock = time.monotonic()
    for r in range(warmup + rounds):
        for mode in modes:
            # each round starts at the next path, so none always goes first or always follows the same one
            for target in targets[r % len(targets):] + targets[: r % len(targets)]:
                call = Call(target.name, mode, timed=r >= warmup)
                try:
                    CALLERS[mode.protocol](target.clients[mode.protocol], call)
                except (openai.APIError, anthropic.APIError) as exc:
                    call.error = f"{type(exc).__name__}: {exc}"
                calls.append(call)
        if (r + 1) % 50 == 0:
            print(f"  round {r + 1} of {warmup + rounds}, {time.monotonic() - clock:.0f} s", flush=True)
    return calls


def answered(call: Call) -> bool:
    return call.error is None and bool(call.text) and call.output_tokens > 0


def kiln_calls_not_recorded(http: httpx.Client, calls: list[Call]) -> list[str]:
    """The kiln calls whose job is not a completed llm_proxy job with the usage and text the client got."""
    problems = []
    # jobs are recorded off the response's path, and their flow runs made after that: the last ones may lag
    deadline = time.monotonic() + 60
    for call in calls:
        if call.job_id is None:
            problems.append(f"{call.mode}: no x-kiln-job-id ({call.error or 'answered without one'})")
            continue
        while True:
            response = http.get(f"/api/v1/jobs/{call.job_id}")
            job = response.json() if response.status_code == 200 else None
            if (job and job["status"] != "running" and job["flow_run_id"]) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if job is None:
            problems.append(f"job {call.job_id}: GET answered {response.status_code}")
            continue
        out = job.get("output") or {}
        if job["type"] != "llm_proxy":
            problems.append(f"job {call.job_id}: a {job['type']} job")
        elif problem := did_not_run(job):
            problems.append(problem)
        elif not out.get("usage") or not out.get("tokens", {}).get("output"):
            problems.append(f"job {call.job_id}: completed with no usage ({out.get('usage')!r})")
        elif out.get("text") != call.text:
            problems.append(f"job {call.job_id}: recorded {out.get('text')!r}, the client got {call.text!r}")
    return problems


# the report


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


def added(seconds: float) -> str:
    return f"{seconds * 1000:+9.2f} ms"


def report(targets, modes, calls, args, litellm_note, load_before, unanswered) -> None:
    print()
    print(f"LLM calls against llmock 0.2.2 on loopback, one at a time, 2-core machine shared with other work "
          f"(load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")  # fmt: skip
    print(f"{args.calls} timed calls per path and mode after {args.warmup} warm-up; TTFT = request sent → first "
          f"chunk with text (not streaming: = total); official openai {openai.__version__} / anthropic "
          f"{anthropic.__version__} SDKs on every path")  # fmt: skip
    if len(targets) == 2:
        print(litellm_note)
    else:
        print("LiteLLM's proxy as configured here: one worker, no database (so no spend log), its bundled price table; "
              "kiln records every call as a job")
    goal = []
    for mode in modes:
        figures = {}
        print()
        print(f"{str(mode):<42}" + "".join(f"{column:>12}" for column in ("TTFT p50", "TTFT p95", "total p50",
                                                                           "total p95")))  # fmt: skip
        for target in targets:
            timed = [c for c in calls if c.target == target.name and c.mode == mode and c.timed and answered(c)]
            if not timed:
                print(f"  {target.name:<40}no answered calls")
                continue
            row = [percentile([getattr(c, what) for c in timed], q) for what in ("ttft", "total") for q in (50, 95)]
            figures[target.name] = row
            short = f"   n={len(timed)}" if len(timed) != args.calls else ""
            print(f"  {target.name:<40}" + "".join(ms(v) for v in row) + short)
        direct = figures.get(DIRECT)
        for target in targets[1:]:
            if direct and target.name in figures:
                label = f"{target.name.removeprefix('through ')} adds"
                print(f"  {label:<40}" + "".join(added(v - d) for v, d in zip(figures[target.name], direct)))
        if direct and KILN in figures:
            over = (figures[KILN][1] - direct[1]) * 1000
            goal.append(f"  {str(mode):<40}{over:+9.2f} ms  {'met' if over <= GOAL_TTFT_P95_MS else 'NOT met'}")
    for target in targets[2:]:  # the peer: its failures are reported, not fatal
        if unanswered[target.name]:
            first = unanswered[target.name][0]
            print(f"\n{target.name}: {len(unanswered[target.name])} calls without a real answer, left out of its figures "
                  f"(first: {first.mode}: {first.error or repr(first.text)})")  # fmt: skip
    print()
    print(f"goal: kiln adds ≤ {GOAL_TTFT_P95_MS:g} ms p95 to TTFT over direct (reported, not asserted)")
    print("\n".join(goal))


if __name__ == "__main__":
    main()
