"""Two test hosts on this machine, joined by a real network link, for tests/test_two_hosts.py.

Each host is a network namespace (its own interface eth0 and address on a bridge of the root
namespace, no default route, as on an air-gapped cluster) holding a PID namespace (a host's
`ray stop` sees only that host's processes), a UTS namespace (its own hostname) and a mount
namespace in which a folder of the host's own is bound at /tmp/ray (Ray's sockets and session
files); the rest of the filesystem is shared, as a shared filesystem holds the data, the results
and the virtualenv on real nodes. PID 1 of each host is its sshd, with a key made for the test:
Ray's launcher reaches the hosts over ssh exactly as it reaches two servers. The bridge's own
address plays the user's machine, which runs `ray up` and `ray job submit`.

The ssh account is root, whose home /root is, in each host's mount namespace, a folder of the
test (the launcher's file mounts, its bootstrap config and key land there, shared by both hosts
like a home on NFS), with this machine's Python bound back into it when it lives under /root.

Every name (namespaces, bridge) is fixed, so that `clean()` removes what a killed test
left behind before a new start, and again at the end whatever happened. Needs root, iproute2,
unshare (util-linux), openssh-server and rsync. Addresses come from 198.18.0.0/15, the range
reserved for network tests, and exist only on the bridge.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BRIDGE = "frcnn-br0"
NETWORK = "198.18.0"
CLIENT_IP = f"{NETWORK}.1"
HOSTS = {"frcnn-head": f"{NETWORK}.10", "frcnn-worker": f"{NETWORK}.11"}
USER = "root"
SSHD = "/usr/sbin/sshd"


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def missing_tools() -> list[str]:
    needed = ["ip", "unshare", "ssh", "ssh-keygen", "rsync"]
    return [tool for tool in needed if shutil.which(tool) is None] + ([] if os.path.exists(SSHD) else [SSHD])


def netns_pids(namespace: str) -> list[int]:
    done = run("ip", "netns", "pids", namespace, check=False)
    return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []


def wait_until_empty(namespace: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while netns_pids(namespace) and time.time() < deadline:
        time.sleep(0.1)
    assert not netns_pids(namespace), f"processes of {namespace} survived its PID namespace"


def clean() -> None:
    """Removes every host and the bridge of this harness, whoever left them: a killed host's
    processes die with its PID namespace's first process."""
    for namespace in HOSTS:
        for pid in netns_pids(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until_empty(namespace)
        run("ip", "netns", "delete", namespace, check=False)
    run("ip", "link", "delete", BRIDGE, check=False)


class Hosts:
    """The two hosts and the bridge; their keys, configurations, logs and the ssh account's home
    under `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.home = folder / "home"
        self.key = folder / "id_ed25519"
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        clean()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(mode=0o700)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.folder / "host_key"))
        (self.home / ".ssh").mkdir(mode=0o700)
        (self.home / ".ssh" / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "address", "add", f"{CLIENT_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        Path("/tmp/ray").mkdir(exist_ok=True)  # where each host binds its own
        for name, address in HOSTS.items():
            run("ip", "netns", "add", name)
            run("ip", "link", "add", f"{name[-6:]}-veth", "type", "veth", "peer", "name", "eth0", "netns", name)
            run("ip", "link", "set", f"{name[-6:]}-veth", "master", BRIDGE, "up")
            run("ip", "-n", name, "address", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", name, "link", "set", "eth0", "up")
            run("ip", "-n", name, "link", "set", "lo", "up")
            (self.folder / name / "tmp-ray").mkdir(parents=True)
            self.boot(name)
        for name in HOSTS:
            self.wait_for_ssh(name)

    def boot(self, name: str) -> None:
        """Starts the host's PID namespace with sshd as its first process, as a server boots."""
        host = self.folder / name
        config = host / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {HOSTS[name]}", f"HostKey {self.folder / 'host_key'}", "PidFile none",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "UsePAM no", f"AllowUsers {USER}", "Subsystem sftp internal-sftp", ""]))
        # This machine's Python and virtualenv, where they lie under /root, bound back into the home.
        binds = []
        for path in sorted({Path(p) for p in (sys.base_prefix, sys.prefix) if Path(p).is_relative_to("/root")}):
            target = self.home / path.relative_to("/root")
            binds.append(f"mkdir -p {target} && mount --bind {path} {target}")
        script = " && ".join([f"mount --bind {host / 'tmp-ray'} /tmp/ray", *binds, f"mount --rbind {self.home} /root",
                              f"hostname {name}", f"exec {SSHD} -D -e -f {config}"])
        with open(host / "sshd.log", "a") as log:
            self.processes[name] = subprocess.Popen(
                ["ip", "netns", "exec", name, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount",
                 "--propagation", "private", "--uts", "sh", "-c", script],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str) -> None:
        """Every process of the host at once, as when it loses power: its PID namespace goes with
        its first process, which `unshare --kill-child` takes down with it."""
        process = self.processes.pop(name)
        process.kill()
        process.wait()
        wait_until_empty(name)

    def ssh(self, name: str, command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"{USER}@{HOSTS[name]}", command],
            capture_output=True, text=True, timeout=timeout)
        assert not check or done.returncode == 0, f"{name}: {command}: {done.stdout}{done.stderr}"
        return done

    def wait_for_ssh(self, name: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while self.ssh(name, "true", check=False).returncode != 0:
            assert self.processes[name].poll() is None, (self.folder / name / "sshd.log").read_text()
            assert time.time() < deadline, f"no ssh to {name} in {timeout} s"
            time.sleep(0.5)

    def client(self, command: list[str], **options) -> subprocess.CompletedProcess:
        """`command` on the user's machine: this machine's network namespace, with a /tmp/ray of its
        own (where `ray up` keeps the cluster's state)."""
        tmp_ray = self.folder / "client" / "tmp-ray"
        tmp_ray.mkdir(parents=True, exist_ok=True)
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount --bind "$0" /tmp/ray && exec "$@"', str(tmp_ray), *command], **options)

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
            process.wait()
        self.processes.clear()
        clean()
