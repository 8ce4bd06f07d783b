"""Every third-party image the program runs or builds from, in one table, by digest.

A tag can be re-pushed (the official images are rebuilt on every base-image update);
``tag@sha256:...`` cannot: the engine pulls exactly the digest, and the tag stays for
people. The PostgreSQL major version lives here too: the server image, the backup
image's binaries (a build argument) and the backup job's PATH all follow it.

Refresh (on a machine with internet; this repository's CI test machine has none):

    bash scripts/refresh-image-digests.sh            # prints the table's current digests
    bash scripts/refresh-image-digests.sh --check    # exit 1 when a committed digest differs

then paste the printed digests here, in one commit, and deploy staging first.

Where a digest came from (``source``): the committed ones were read from public
repositories that pin exactly this tag (a multi-arch index digest, the same in several
independent repositories where noted); none could be verified against the registry from
the machine they were written on. ``digest=None`` means no published digest could be
found there: the program then resolves the tag to the registry's current digest at each
deploy (the container still runs by digest, but a re-pushed tag shows up as a replacement
in the preview instead of never) -- run the refresh script and commit the digest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

POSTGRES_VERSION = "15.10"
POSTGRES_MAJOR = int(POSTGRES_VERSION.split(".")[0])
DIGEST_PREFIX = "sha256:"


@dataclass(frozen=True)
class PinnedImage:
    repository: str
    tag: str
    digest: str | None  # "sha256:<64 hex>" (the index digest), or None: see the module doc
    source: str

    @property
    def tagged(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def ref(self) -> str:
        """``repository:tag@sha256:...`` when pinned, else ``repository:tag`` (resolved to
        its digest at deploy by ``containers.image_by_digest``)."""
        return f"{self.tagged}@{self.digest}" if self.digest else self.tagged


_PUBLIC_PINS = "public pins of this exact tag in {n} independent repositories"

IMAGES: Mapping[str, PinnedImage] = MappingProxyType(
    {
        "redis": PinnedImage(
            "redis",
            "7.4.2-alpine",
            "sha256:02419de7eddf55aa5bcf49efb74e88fa8d931b4d77c07eff8a6b2144472b6952",
            _PUBLIC_PINS.format(n="10+"),
        ),
        # The backup image copies redis-server/redis-cli from the Debian (glibc) variant;
        # "7.4.2" is the official alias of 7.4.2-bookworm.
        "redis-debian": PinnedImage(
            "redis",
            "7.4.2",
            "sha256:fbdbaea47b9ae4ecc2082ecdb4e1cea81e32176ffb1dcf643d422ad07427e5d9",
            _PUBLIC_PINS.format(n="several (one author's benchmark files among them)"),
        ),
        "postgres": PinnedImage(
            "postgres",
            f"{POSTGRES_VERSION}-bookworm",
            None,
            "no published digest of this tag found offline: resolved at deploy",
        ),
        "caddy": PinnedImage(
            "caddy",
            "2.8.4-alpine",
            "sha256:a48e22edad925dc216fd27aa4f04ec49ebdad9b64c9e5a3f1826d0595ef2993c",
            _PUBLIC_PINS.format(n="3") + " (the tag was rebuilt; other, older digests exist)",
        ),
        "prometheus": PinnedImage(
            "prom/prometheus",
            "v2.53.4",
            None,
            "no published digest of this tag found offline: resolved at deploy",
        ),
        "alertmanager": PinnedImage(
            "prom/alertmanager",
            "v0.27.0",
            "sha256:e13b6ed5cb929eeaee733479dce55e10eb3bc2e9c4586c705a4e8da41e5eacf5",
            _PUBLIC_PINS.format(n="5+"),
        ),
        "node-exporter": PinnedImage(
            "prom/node-exporter",
            "v1.8.2",
            "sha256:4032c6d5bfd752342c3e631c2f1de93ba6b86c41db6b167b9a35372c139e7706",
            _PUBLIC_PINS.format(n="5+") + " (quay.io/prometheus publishes the same digest)",
        ),
        # FROM scratch by default (no shell, no wget): the -alpine variant has wget for
        # its healthcheck.
        "redis-exporter": PinnedImage(
            "oliver006/redis_exporter",
            "v1.67.0-alpine",
            "sha256:ef9e3c9afa9072b8a4db8bc2b01471cd582a6a1db23760bc5fdb9e3c21842205",
            _PUBLIC_PINS.format(n="1"),
        ),
        # For the monitoring branch's probes (its MONITORING_IMAGES takes it from here).
        "blackbox-exporter": PinnedImage(
            "prom/blackbox-exporter",
            "v0.25.0",
            "sha256:b04a9fef4fa086a02fc7fcd8dcdbc4b7b35cc30cdee860fdc6a19dd8b208d63e",
            _PUBLIC_PINS.format(n="3"),
        ),
        "postgres-exporter": PinnedImage(
            "prometheuscommunity/postgres-exporter",
            "v0.16.0",
            "sha256:6999a7657e2f2fb0ca6ebf417213eebf6dc7d21b30708c622f6fcb11183a2bb0",
            _PUBLIC_PINS.format(n="1"),
        ),
    }
)


def image(key: str) -> str:
    """The reference the program uses for table entry ``key``."""
    return IMAGES[key].ref


def unpinned() -> list[str]:
    """Table entries without a committed digest (resolved at each deploy)."""
    return sorted(key for key, pinned in IMAGES.items() if pinned.digest is None)


def render_table() -> str:
    """``key<TAB>repository:tag<TAB>digest`` lines: what the refresh script reads."""
    return "".join(
        f"{key}\t{pinned.tagged}\t{pinned.digest or '-'}\n" for key, pinned in IMAGES.items()
    )


if __name__ == "__main__":
    print(render_table(), end="")
