"""The plugin sandbox without running it: its public names, the OCI config tier A writes, the seccomp list, reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln.tasks.plugin as plugin
from kiln.tasks.plugin import Ending, Limits, LimitUnenforceable
from kiln.tasks.plugin.seccomp import DENIED, oci_profile
from kiln.tasks.plugin.tiers import Bundle, oci_config


def test_the_public_names_are_chosen():
    assert plugin.__all__ == sorted(plugin.__all__) == [
        "Confinement", "Ending", "ImageRef", "InvalidImage", "LimitUnenforceable", "Limits", "Outcome", "PluginRun",
        "Sandbox", "SandboxFailed", "TierCheck", "claim_work_dir", "clean_leftovers", "detect_tier", "import_image",
    ]  # fmt: skip


def test_tier_a_config_is_locked_down_and_carries_the_limits():
    limits = Limits(cpus=1.5, memory_mb=256, pids=64, output_mb=10, tmp_mb=32)
    bundle = Bundle(id="kiln-job1-abc123", dir=Path("/w/kiln-job1-abc123"), rootfs=Path("/store/x/bundle/rootfs"),
                    argv=["python3", "-m", "plugin"], env=["PATH=/usr/bin"], cwd="/app", limits=limits)  # fmt: skip
    config = oci_config(bundle)
    process, linux = config["process"], config["linux"]
    assert config["root"] == {"path": "/store/x/bundle/rootfs", "readonly": True}
    assert (process["user"]["uid"], process["user"]["gid"], process["noNewPrivileges"]) == (65534, 65534, True)
    assert all(caps == [] for caps in process["capabilities"].values())
    assert (process["args"], process["cwd"], process["terminal"]) == (["python3", "-m", "plugin"], "/app", False)
    assert {n["type"] for n in linux["namespaces"]} == {"pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert all("path" not in n for n in linux["namespaces"])  # new ones, the network with loopback only
    assert linux["cgroupsPath"] == "kiln-job1-abc123"  # relative: beneath the worker's own cgroup
    assert linux["resources"]["memory"] == {"limit": 256 << 20, "swap": 256 << 20}
    assert linux["resources"]["pids"] == {"limit": 64}
    assert linux["resources"]["cpu"] == {"quota": 150_000, "period": 100_000}
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert "size=32m" in mounts["/tmp"]["options"]
    assert mounts["/in"]["source"] == "/w/kiln-job1-abc123/in" and "ro" in mounts["/in"]["options"]
    assert mounts["/out"]["source"] == "/w/kiln-job1-abc123/out" and "ro" not in mounts["/out"]["options"]
    assert linux["seccomp"] == oci_profile()


def test_the_seccomp_list_denies_namespaces_mounts_and_tracing_with_eperm():
    profile = oci_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert {"SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"} == set(profile["architectures"])
    denied = profile["syscalls"][0]
    assert denied["errnoRet"] == 1 and denied["names"] == list(DENIED)
    for name in ("mount", "umount2", "ptrace", "unshare", "setns", "pivot_root", "chroot", "keyctl", "bpf",
                 "perf_event_open", "userfaultfd", "io_uring_setup"):  # fmt: skip
        assert name in DENIED
    clone_rules = [r for r in profile["syscalls"] if r["names"] == ["clone"]]
    assert {r["args"][0]["value"] for r in clone_rules} >= {0x10000000, 0x20000000, 0x40000000}  # user, pid, net
    assert [r["errnoRet"] for r in profile["syscalls"] if r["names"] == ["clone3"]] == [38]  # ENOSYS: libc falls back


def test_every_ending_has_its_reason_in_a_users_words():
    limits = Limits(memory_mb=256, pids=64, wall_seconds=30, output_mb=10)
    assert [e.reason(limits, 3) for e in Ending] == [
        "completed", "out of memory (limit 256 MB)", "too many processes (limit 64)", "output larger than 10 MB",
        "cpu time limit", "wall time limit (30 s)", "exited with code 3", "cancelled",
    ]  # fmt: skip


def test_an_unenforceable_limit_names_itself():
    refused = LimitUnenforceable("pids", "B", "no writable pids cgroup")
    assert refused.status_code == 400
    assert refused.message.startswith("limits.pids: sandbox tier B on this worker cannot enforce it")
    assert refused.body().errors == [{"loc": ["limits", "pids"], "msg": "no writable pids cgroup",
                                      "type": "limit_unenforceable", "tier": "B"}]  # fmt: skip


def test_limits_are_strict():
    with pytest.raises(ValueError, match="extra"):
        Limits(gpus=1)
    with pytest.raises(ValueError, match="wall_seconds"):
        Limits(wall_seconds=0)


def test_a_run_gets_the_tier_it_asks_for_or_the_best_and_a_missing_one_is_refused_naming_why():
    from kiln.errors import InvalidRequest
    from kiln.tasks.plugin.execute import choose_tier
    from kiln.tasks.plugin.tiers import TierCheck

    both, only_b = TierCheck(("A", "B")), TierCheck(("B",), ("tier A: not root",))
    assert (choose_tier(None, both), choose_tier("B", both), choose_tier(None, only_b)) == ("A", "B", "B")
    with pytest.raises(InvalidRequest, match=r"^tier: the run needs sandbox tier A, and this worker offers only B "
                                             r"\(tier A: not root\)$"):  # fmt: skip
        choose_tier("A", only_b)
    with pytest.raises(InvalidRequest, match=r"^tier: this worker offers no sandbox \(tier B: bwrap not installed\)"):
        choose_tier(None, TierCheck((), ("tier B: bwrap not installed",)))


def test_the_limit_a_run_hit_names_its_ending_memory_first():
    assert Ending.of_hits(set()) is None
    assert Ending.of_hits({"cpu", "pids", "memory"}) is Ending.OUT_OF_MEMORY
    assert Ending.of_hits({"output", "cpu"}) is Ending.OUTPUT_TOO_LARGE


def test_tier_b_holds_a_process_tree_by_cgroups_else_rlimits_and_a_server_cpu_only_by_its_cgroup(monkeypatch):
    from kiln.tasks.plugin.tiers import process_limits

    limits = Limits(cpus=0.5, memory_mb=128, pids=16, wall_seconds=20)
    assert process_limits(limits, {"memory", "pids", "cpu"}) == {
        "memory_mb": "memory cgroup (swap included)", "cpus": "cpu cgroup quota", "pids": "pids cgroup"}  # fmt: skip
    assert process_limits(limits, {"memory", "pids", "cpu"}, persistent=True)["cpus"] == "cpu cgroup quota"
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert process_limits(limits, set()) == {
        "memory_mb": "RLIMIT_AS per process", "cpus": "RLIMIT_CPU 10 s per process",
        "pids": "RLIMIT_NPROC of the sandbox's user"}  # fmt: skip
    # a server has no wall time to turn into CPU seconds: refused rather than stopped after some CPU seconds
    with pytest.raises(LimitUnenforceable, match=r"^limits.cpus: sandbox tier B on this worker cannot enforce it "
                                                 r"\(no writable cpu cgroup, and a server runs until it is stopped"):
        process_limits(limits, {"memory", "pids"}, persistent=True)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    with pytest.raises(LimitUnenforceable, match="RLIMIT_NPROC does not bind root"):
        process_limits(limits, {"memory", "cpu"})


def test_a_command_under_the_worker_needs_cgroups_for_pids_and_a_servers_cpu_and_a_default_is_left_unheld(
        monkeypatch):  # fmt: skip
    from kiln.tasks.plugin.tiers import process_limits

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    limits = Limits()
    # RLIMIT_NPROC would count the worker's own processes: refused when asked, unheld as a default
    with pytest.raises(LimitUnenforceable, match=r"^limits.pids: .*would count the worker's own processes too\); run "
                                                 r"it on a worker that may create cgroups"):
        process_limits(limits, {"memory", "cpu"}, persistent=True, sandboxed=False)
    held = process_limits(limits, set(), persistent=True, sandboxed=False, optional=frozenset({"cpus", "pids"}))
    assert held["memory_mb"] == "RLIMIT_AS per process"
    assert held["cpus"].startswith("not held: no writable cpu cgroup") and held["pids"].startswith("not held:")
