"""The host step as part of `pulumi up`: scripts/host-firewall.sh for the stack's backend
bridge, applied by pulumi-command on the Docker host itself.

Docker's ``internal`` networks stop forwarding, but a backend container can still open
connections to services listening on the Docker host (sshd, a host exporter) through its
bridge; the script drops NEW connections arriving from that interface. Where the engine
runs: ``command.local.Command`` when the Docker host is this machine, else
``command.remote.Command`` over SSH to the host ``docker:host`` names, with the deploy key
and the host key from known_hosts (verified, never trust-on-first-use).

Lifecycle: the script and the bridge name are the triggers, so a changed rule set is
re-applied (the old rules are removed first: delete-before-replace, otherwise the old
resource's delete would remove the rule the new one just found in place); ``pulumi
destroy`` removes exactly the rules it added. ``hostFirewall: external`` opts out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shlex
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_command as command

from components.config import HostFirewallSettings, SshTarget, StackConfig

REPO = Path(__file__).resolve().parent.parent
FIREWALL_SCRIPT = REPO / "scripts" / "host-firewall.sh"


def firewall_commands(interface: str) -> tuple[str, str]:
    """(create, delete): run the script (given on stdin) as root -- directly when already
    root, else through passwordless sudo (``-n``: fail, never prompt)."""

    def as_root(*args: str) -> str:
        argv = " ".join(shlex.quote(a) for a in args)
        return (
            f'if [ "$(id -u)" -eq 0 ]; then bash -s -- {argv}; else sudo -n bash -s -- {argv}; fi'
        )

    return as_root(interface), as_root("--remove", interface)


def script_text() -> str:
    return FIREWALL_SCRIPT.read_text()


def _known_host_names(target: SshTarget) -> list[str]:
    # known_hosts names a non-default port as [host]:port.
    return [target.host] if target.port == 22 else [f"[{target.host}]:{target.port}"]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # hashed entry: |1|base64(salt)|base64(hmac-sha1)
        _, _, salt, digest = pattern.split("|")
        mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
    return name in pattern.split(",")


def host_key_from_known_hosts(known_hosts: str, target: SshTarget) -> str | None:
    """The first ``keytype base64`` line known_hosts holds for ``target``."""
    names = _known_host_names(target)
    for line in known_hosts.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#") or fields[0].startswith("@"):
            continue
        if any(_matches(fields[0], name) for name in names):
            return f"{fields[1]} {fields[2]}"
    return None


@dataclass(frozen=True)
class FirewallConnection:
    """How to reach the Docker host; read before any resource is registered."""

    ssh: SshTarget | None
    private_key: pulumi.Output[str] | None = None
    host_key: str | None = None


def firewall_connection(settings: HostFirewallSettings) -> FirewallConnection:
    """Read the SSH key and the host key now, so a missing file fails the run cleanly."""
    if settings.ssh is None:
        return FirewallConnection(ssh=None)
    key_file = Path(settings.ssh_key_file).expanduser()
    known_hosts_file = Path(settings.known_hosts_file).expanduser()
    if not key_file.is_file():
        raise ValueError(
            f"personal-rag:hostSshKeyFile = {settings.ssh_key_file!r} is not a readable "
            "file; expected the private key of the SSH user in docker:host (or set "
            "personal-rag:hostFirewall external)"
        )
    known = known_hosts_file.read_text() if known_hosts_file.is_file() else ""
    host_key = host_key_from_known_hosts(known, settings.ssh)
    if host_key is None:
        names = ", ".join(_known_host_names(settings.ssh))
        raise ValueError(
            f"personal-rag:hostSshKnownHostsFile = {settings.known_hosts_file!r} has no "
            f"host key for {names}; expected its line (check `ssh-keyscan` output by hand)"
        )
    return FirewallConnection(
        ssh=settings.ssh,
        private_key=pulumi.Output.secret(key_file.read_text()),
        host_key=host_key,
    )


@dataclass(frozen=True)
class HostFirewallArgs:
    config: StackConfig
    interface: str  # the backend bridge (backend_bridge_name)
    backend_network: pulumi.Resource
    connection: FirewallConnection


class HostFirewall(pulumi.ComponentResource):
    applied: pulumi.Resource

    def __init__(
        self, name: str, args: HostFirewallArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("personal-rag:index:HostFirewall", name, None, opts)
        script = script_text()
        create, delete = firewall_commands(args.interface)
        triggers = [hashlib.sha256(script.encode()).hexdigest(), args.interface]
        resource_name = args.config.resource_name("host-firewall")
        child = pulumi.ResourceOptions(
            parent=self,
            # The bridge exists first and goes last; old rules go before new ones.
            depends_on=[args.backend_network],
            delete_before_replace=True,
        )
        ssh = args.connection.ssh
        if ssh is None:
            self.applied = command.local.Command(
                resource_name,
                create=create,
                delete=delete,
                stdin=script,
                triggers=triggers,
                opts=child,
            )
        else:
            self.applied = command.remote.Command(
                resource_name,
                connection=command.remote.ConnectionArgs(
                    host=ssh.host,
                    port=ssh.port,
                    user=ssh.user,
                    private_key=args.connection.private_key,
                    host_key=args.connection.host_key,
                ),
                create=create,
                delete=delete,
                stdin=script,
                triggers=triggers,
                opts=child,
            )
        self.register_outputs({"interface": args.interface})
