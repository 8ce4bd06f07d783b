"""personal-rag: one Docker host, isolated stacks (staging, prod), one component per capability."""

import pulumi

from components.app_stack import AppStack, AppStackArgs, backend_bridge_name
from components.backups import Backups, BackupsArgs
from components.config import load_stack_config
from components.gitinfo import read_git_state
from components.host_firewall import HostFirewall, HostFirewallArgs, firewall_connection
from components.monitoring import Monitoring, MonitoringArgs
from components.redis_tls import RedisTls, RedisTlsArgs
from components.registry import Registry, RegistryArgs
from components.stack_secrets import StackSecrets, StackSecretsArgs

config = load_stack_config()
# Read before any resource exists, so a bad app repo fails the run cleanly.
app_git = read_git_state(config.image.build_context) if config.image.build_context else None
# Likewise the SSH key and host key the host firewall step needs (if it runs over SSH).
firewall = firewall_connection(config.host_firewall) if config.host_firewall.managed else None

secrets = StackSecrets("secrets", StackSecretsArgs(config))
registry = Registry("registry", RegistryArgs(config.image, git_state=app_git))
redis_tls = RedisTls("redis-tls", RedisTlsArgs(config))
app = AppStack("app", AppStackArgs(config, registry.image_ref, secrets, redis_tls))
monitoring = Monitoring("monitoring", MonitoringArgs(config, app, secrets, redis_tls))
backups = Backups("backups", BackupsArgs(config, app, monitoring, secrets, redis_tls))
if firewall is not None:  # else: hostFirewall external, managed outside Pulumi
    bridge = backend_bridge_name(config.stack)
    HostFirewall("host-firewall", HostFirewallArgs(config, bridge, app.backend_network, firewall))

pulumi.export("stack", config.stack)
pulumi.export("imageRef", registry.image_ref)
pulumi.export("frontendNetwork", app.frontend_network.name)
pulumi.export("backendNetwork", app.backend_network.name)
pulumi.export("backendBridge", backend_bridge_name(config.stack))
pulumi.export("caddyHttpUrl", f"http://127.0.0.1:{config.ports.http}")
pulumi.export("caddyHttpsUrl", f"https://{config.domain}:{config.ports.https}")
pulumi.export("prometheusUrl", f"http://127.0.0.1:{config.ports.prometheus}")
pulumi.export("alertmanagerUrl", f"http://127.0.0.1:{config.ports.alertmanager}")
pulumi.export("redisCaCertPem", redis_tls.ca_cert_pem)
pulumi.export("backupsLocation", backups.backups_location)
# Store offline: without it the stack's backups cannot be decrypted (README, "Keys").
pulumi.export("backupPassphrase", secrets.backup_passphrase)
