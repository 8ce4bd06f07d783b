"""Backups per stack: a scheduled rag-backup container (daily backup + verify + prune,
weekly restore drill), its own encrypted backups volume, and metrics into monitoring.

The image is built by Pulumi on the Docker host from ``docker/backup/Dockerfile`` (no
registry). The job joins the stack's internal backend network, and only when an off-host
target is configured also ``rag-S-offsite-egress`` (its only way out), reads the data it
backs up (PostgreSQL and Redis over the network with its own credentials and client
certificate; the Chroma volume, mounted writable only so that it can hold SQLite's lock
during the snapshot), writes its backups volume, a scratch volume for drills and the
node_exporter textfile volume. No Docker socket.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_docker as docker

from components.app_stack import BRIDGE_NAME_OPTION, CHROMA_DIR, AppStack
from components.clients import client_pgpass, libpq_env, redis_client_env
from components.config import BackupSettings, OffsiteSettings, StackConfig
from components.containers import (
    CONFIG_DIR,
    ConfigFile,
    NetworkAttachment,
    ServiceSpec,
    bind_mount,
    hardened_container,
    image_by_digest,
    require_success,
    stack_volume,
    volume_mount,
)
from components.images import POSTGRES_MAJOR, image
from components.monitoring import TEXTFILE_DIR, Monitoring
from components.offsite import (
    KNOWN_HOSTS_FILE,
    RCLONE_CONFIG_FILE,
    SSH_KEY_FILE,
    offsite_bridge_name,
    rclone_remote,
    render_rclone_config,
)
from components.redis_tls import RedisTls
from components.service_files import POSTGRES_BACKUP_USER
from components.stack_secrets import StackSecrets

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = "docker/backup/Dockerfile"
BACKUP_DIR = "/backups"
SCRATCH_DIR = "/scratch"
WAL_SPOOL_DIR = f"{SCRATCH_DIR}/wal-spool"
BACKUP_IMAGE_REPOSITORY = "personal-rag/backup"


def logical_weekday_env(schedule: BackupSettings) -> dict[str, str]:
    """Physical base backups daily; the portable logical dump only on one weekday
    (faster, smaller daily backups), unless configured for every backup."""
    if schedule.pg_physical and schedule.pg_logical_weekday:
        return {"RAG_BACKUP_PG_LOGICAL_WEEKDAY": schedule.pg_logical_weekday}
    return {}


def wal_archive_env(schedule: BackupSettings) -> dict[str, str]:
    """Continuous WAL archiving (point-in-time recovery) wherever base backups are physical:
    archived WAL is useless without one. The spool that holds a segment in plaintext while
    it is received is on the scratch volume, never on the backups volume (or host path)
    that is copied and kept."""
    if not schedule.pg_physical:
        return {"RAG_BACKUP_WAL_ARCHIVE": "0"}
    return {"RAG_BACKUP_WAL_ARCHIVE": "1", "RAG_BACKUP_WAL_SPOOL_DIR": WAL_SPOOL_DIR}


def backup_build_args() -> dict[str, str]:
    """The base images (components/images.py) and PostgreSQL's major version."""
    return {
        "POSTGRES_IMAGE": image("postgres"),
        "REDIS_IMAGE": image("redis-debian"),
        "POSTGRES_MAJOR": str(POSTGRES_MAJOR),
    }


def backup_image_tag() -> str:
    """Content hash of what goes into the image: a change rebuilds, nothing else does."""
    digest = hashlib.sha256()
    files = [REPO / DOCKERFILE, *sorted((REPO / "rag_backup").rglob("*.py"))]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    for key, value in sorted(backup_build_args().items()):
        digest.update(f"{key}={value}\0".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class BackupsArgs:
    config: StackConfig
    app: AppStack
    monitoring: Monitoring
    secrets: StackSecrets
    redis_tls: RedisTls


class Backups(pulumi.ComponentResource):
    container: docker.Container
    backups_location: pulumi.Output[str]

    def __init__(
        self, name: str, args: BackupsArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("personal-rag:index:Backups", name, None, opts)
        cfg = args.config
        n = cfg.resource_name
        child = pulumi.ResourceOptions(parent=self)
        schedule = cfg.backup

        image = docker.Image(
            n("backup-image"),
            image_name=f"{BACKUP_IMAGE_REPOSITORY}:{backup_image_tag()}",
            build=docker.DockerBuildArgs(
                context=str(REPO),
                dockerfile=str(REPO / DOCKERFILE),
                platform="linux/amd64",
                args={
                    key: image_by_digest(value, self) if key.endswith("_IMAGE") else value
                    for key, value in backup_build_args().items()
                },
            ),
            skip_push=True,
            opts=child,
        )

        if schedule.host_path:
            backups_mount = bind_mount(schedule.host_path, BACKUP_DIR, read_only=False)
            self.backups_location = pulumi.Output.from_input(schedule.host_path)
        else:
            backups_volume = stack_volume(n("backups"), self, "backups", holds_data=True)
            backups_mount = volume_mount(backups_volume.name, BACKUP_DIR)
            self.backups_location = backups_volume.name
        scratch = stack_volume(n("backup-scratch"), self, "scratch", holds_data=False)
        textfile = args.monitoring.textfile_volume

        # The job runs as the api's user so it can read Chroma's files; this one-shot
        # root step (CHOWN only) hands it the directories it writes.
        owner = cfg.app.user
        volume_init = hardened_container(
            n("backup-volume-init"),
            ServiceSpec(
                service="backup-volume-init",
                image=image.image_name,
                entrypoint=["/bin/sh", "-c"],
                command=[f"chown {owner} {BACKUP_DIR} {SCRATCH_DIR} {TEXTFILE_DIR}"],
                user="0:0",
                capabilities=["CHOWN"],
                mounts=[
                    backups_mount,
                    volume_mount(scratch.name, SCRATCH_DIR),
                    volume_mount(textfile.name, TEXTFILE_DIR),
                ],
                memory_mb=64,
                healthcheck=["NONE"],
                one_shot=True,
            ),
            parent=self,
        )

        networks = [NetworkAttachment(args.app.backend_network)]
        offsite_env: dict[str, str] = {}
        offsite_files: list[ConfigFile] = []
        if schedule.offsite is not None:
            # Egress only for a job with a target: the backend network stays internal.
            egress = docker.Network(
                n("offsite-egress"),
                name=n("offsite-egress"),
                driver="bridge",
                internal=False,
                options={BRIDGE_NAME_OPTION: offsite_bridge_name(cfg.stack)},
                opts=child,
            )
            networks.append(NetworkAttachment(egress))
            offsite_env, offsite_files = offsite_parts(cfg.stack, schedule.offsite)

        tls = args.redis_tls.clients["backup"]
        pgpass = client_pgpass(
            cfg, POSTGRES_BACKUP_USER, args.secrets.postgres_backup_password, "*"
        )
        secrets_dir = f"{CONFIG_DIR}/secrets"
        tls_dir = f"{CONFIG_DIR}/tls"
        self.container = hardened_container(
            n("backup"),
            ServiceSpec(
                service="backup",
                image=image.image_name,
                user=owner,
                files_owner=owner,
                networks=networks,
                mounts=[
                    backups_mount,
                    volume_mount(scratch.name, SCRATCH_DIR),
                    volume_mount(textfile.name, TEXTFILE_DIR),
                    # Read-write only because a consistent snapshot takes SQLite's write
                    # lock on chroma.sqlite3 (docs/backup.md); the job writes no file there.
                    volume_mount(args.app.volume_names["chroma"], CHROMA_DIR),
                ],
                tmpfs={"/tmp": "rw,noexec,nosuid,size=64m"},
                memory_mb=1024,
                cpu_shares=256,  # backups yield to the api
                healthcheck=["CMD", "python3", "-m", "rag_backup.schedule", "--check"],
                health_start_period="120s",
                env={
                    "BACKUP_DIR": BACKUP_DIR,
                    "RAG_BACKUP_KEY_FILE": f"{secrets_dir}/backup_passphrase",
                    "RAG_BACKUP_METRICS_DIR": TEXTFILE_DIR,
                    "RAG_BACKUP_TIME": schedule.time_of_day,
                    "RAG_DRILL_WEEKDAY": schedule.drill_weekday,
                    "RAG_DRILL_TIME": schedule.drill_time,
                    "RAG_BACKUP_KEEP_DAILY": str(schedule.keep_daily),
                    "RAG_BACKUP_KEEP_WEEKLY": str(schedule.keep_weekly),
                    "RAG_BACKUP_KEEP_MONTHLY": str(schedule.keep_monthly),
                    "RAG_BACKUP_PG_PHYSICAL": "1" if schedule.pg_physical else "0",
                    "RAG_BACKUP_PG_BIN_DIR": f"/usr/lib/postgresql/{POSTGRES_MAJOR}/bin",
                    **logical_weekday_env(schedule),
                    **wal_archive_env(schedule),
                    "TMPDIR": SCRATCH_DIR,
                    **libpq_env(cfg, POSTGRES_BACKUP_USER, f"{secrets_dir}/pgpass"),
                    **redis_client_env(cfg, "backup", tls_dir, f"{secrets_dir}/redis_password"),
                    "CHROMA_DIR": CHROMA_DIR,
                    **offsite_env,
                },
                files=[
                    ConfigFile(
                        "secrets/backup_passphrase", args.secrets.backup_passphrase, secret=True
                    ),
                    ConfigFile("secrets/pgpass", pgpass, secret=True),
                    ConfigFile(
                        "secrets/redis_password",
                        args.secrets.redis_passwords["backup"],
                        secret=True,
                    ),
                    ConfigFile("tls/ca.crt", args.redis_tls.ca_cert_pem),
                    ConfigFile("tls/client.crt", tls.cert_pem),
                    ConfigFile("tls/client.key", tls.key_pem, secret=True),
                    *offsite_files,
                ],
            ),
            parent=self,
            depends_on=[volume_init, args.app.containers["postgres"], args.app.containers["redis"]],
        )
        self.image_name = image.image_name
        self.register_outputs(
            {
                "backupsLocation": self.backups_location,
                "backupImage": image.image_name,
                "volumeInit": require_success(volume_init, n("backup-volume-init")),
            }
        )


def offsite_parts(stack: str, target: OffsiteSettings) -> tuple[dict[str, str], list[ConfigFile]]:
    """The job's environment (paths only) and files for the off-host copy: the rclone
    config (holds S3 keys: secret), and for SFTP the private key (secret) and the pinned
    host key."""
    config_path = f"{CONFIG_DIR}/{RCLONE_CONFIG_FILE}"
    env = {
        "RAG_BACKUP_OFFSITE_RCLONE_CONFIG": config_path,
        "RAG_BACKUP_OFFSITE_REMOTE": rclone_remote(stack, target),
    }
    s3_key_id = target.s3_access_key_id.reveal() if target.s3_access_key_id else ""
    s3_secret = target.s3_secret_access_key.reveal() if target.s3_secret_access_key else ""
    rendered = render_rclone_config(
        target,
        ssh_key_path=f"{CONFIG_DIR}/{SSH_KEY_FILE}",
        known_hosts_path=f"{CONFIG_DIR}/{KNOWN_HOSTS_FILE}",
        s3_access_key_id=s3_key_id,
        s3_secret_access_key=s3_secret,
    )
    files = [ConfigFile(RCLONE_CONFIG_FILE, pulumi.Output.secret(rendered), secret=True)]
    if target.kind == "sftp":
        assert target.ssh_key is not None  # config requires it
        files += [
            # OpenSSH wants the key's last line terminated; `pulumi config set` may drop it.
            ConfigFile(
                SSH_KEY_FILE,
                target.ssh_key.output().apply(lambda key: key.rstrip("\n") + "\n"),
                secret=True,
            ),
            ConfigFile(KNOWN_HOSTS_FILE, target.known_hosts),
        ]
    return env, files
