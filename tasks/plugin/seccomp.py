"""The syscalls a plugin may not make: one list, given to runc as an OCI profile and to bwrap as a BPF program.

Default-allow with a deny list, not default-deny: plugins are arbitrary programs (Python, compilers, Go and
Java runtimes), and an allow list must track every syscall each libc and runtime uses or they fail with
puzzling EPERMs. The denied calls are the ones that reach kernel attack surface or the host from a process
that has no capabilities anyway: new namespaces (the way to regain capabilities), mounts, tracing, keyrings,
BPF, perf, io_uring, module and clock changes. Each fails with EPERM, as if the plugin lacked the right.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

DENIED = (
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "open_by_handle_at", "name_to_handle_at",
)  # fmt: skip
# clone() with any of these flags makes a namespace; clone3 hides its flags in memory seccomp cannot read,
# so it answers ENOSYS and libc falls back to clone()
NAMESPACE_FLAGS = {"CLONE_NEWNS": 0x20000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
                   "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                   "CLONE_NEWNET": 0x40000000}  # fmt: skip
# the 32-bit ABIs reach the same kernel through other syscall numbers: filtered too, not left open
OCI_ARCHES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]


def oci_profile() -> dict[str, Any]:
    """The list as `linux.seccomp` of an OCI runtime config (runc)."""
    deny = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    rules = [{"names": list(DENIED), **deny}]
    rules += [{"names": ["clone"], **deny, "args": [{"index": 0, "value": flag, "valueTwo": flag,
                                                      "op": "SCMP_CMP_MASKED_EQ"}]}
              for flag in NAMESPACE_FLAGS.values()]  # fmt: skip
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": OCI_ARCHES, "syscalls": rules}


def write_bpf(path: Path) -> Path:
    """The list compiled to a BPF program at `path`, for `bwrap --seccomp FD` (libseccomp through pyseccomp)."""
    import pyseccomp as seccomp  # only Tier B needs libseccomp's Python binding

    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    if seccomp.system_arch() == seccomp.Arch.X86_64:
        rules.add_arch(seccomp.Arch.X86)
        rules.add_arch(seccomp.Arch.X32)
    for name in DENIED:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
    for flag in NAMESPACE_FLAGS.values():
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with open(path, "wb") as program:
        rules.export_bpf(program)
    return path
