"""Registry image: what image every stack runs, always as ``image@sha256:...``.

Build mode (``buildContext`` set): build ``Dockerfile.prod`` target ``runtime`` for
linux/amd64 from the app repo, push it to GHCR tagged from git (full SHA, short SHA,
branch, ``latest`` only from a clean main; a dirty tree gets ``-dirty`` tags) and run
the pushed digest. Resolve mode (no build): ``imageDigest`` if set, else the registry's
current digest of ``image:imageTag``. Local mode (``localImageId``, ``up.sh --demo``):
an image built on the Docker host, run by its image id (``sha256:...``). Rollback =
``pulumi config set imageTag <sha>`` and ``pulumi up``: the tag resolves to that build's
digest.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from components.config import ImageSettings
from components.gitinfo import GitState, compute_image_tags, image_ref_with_digest

GHCR = "ghcr.io"
PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class RegistryArgs:
    image: ImageSettings
    # Only in build mode: the app repo's git state, read once by the caller.
    git_state: GitState | None = None


class Registry(pulumi.ComponentResource):
    image_ref: pulumi.Output[str]
    tags: list[str]

    def __init__(
        self, name: str, args: RegistryArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("personal-rag:index:Registry", name, None, opts)
        settings = args.image
        self.tags = []
        if settings.local_image_id is not None:
            # Built on this Docker host (the demo app): its image id is its content digest.
            self.image_ref = pulumi.Output.from_input(settings.local_image_id)
        elif settings.build_context is not None:
            if args.git_state is None:
                raise ValueError("Registry: build mode needs the app repo's git state")
            self.image_ref = self._build_and_push(settings, args.git_state)
        elif settings.digest is not None:
            self.image_ref = pulumi.Output.from_input(
                image_ref_with_digest(settings.repository, settings.digest)
            )
        else:
            resolved = docker.get_registry_image_output(
                name=f"{settings.repository}:{settings.tag}",
                opts=pulumi.InvokeOutputOptions(parent=self),
            )
            self.image_ref = resolved.sha256_digest.apply(
                lambda digest: image_ref_with_digest(settings.repository, digest)
            )
        self.register_outputs({"imageRef": self.image_ref})

    def _build_and_push(self, settings: ImageSettings, git: GitState) -> pulumi.Output[str]:
        self.tags = compute_image_tags(git)
        assert settings.ghcr_token is not None  # config validation requires it in build mode
        registry = docker.RegistryArgs(
            server=GHCR,
            username=settings.ghcr_username,
            password=settings.ghcr_token.output(),
        )
        primary = docker.Image(
            "app-image",
            image_name=f"{settings.repository}:{self.tags[0]}",
            build=docker.DockerBuildArgs(
                context=settings.build_context,
                dockerfile=f"{settings.build_context}/Dockerfile.prod",
                target="runtime",
                platform=PLATFORM,
            ),
            registry=registry,
            opts=pulumi.ResourceOptions(parent=self),
        )
        # The other tags point at the same pushed image.
        for tag in self.tags[1:]:
            target = f"{settings.repository}:{tag}"
            tagged = docker.Tag(
                f"app-image-tag-{tag}",
                source_image=primary.image_name,
                target_image=target,
                opts=pulumi.ResourceOptions(parent=self, depends_on=[primary]),
            )
            docker.RegistryImage(
                f"app-image-push-{tag}",
                name=tagged.target_image,
                keep_remotely=True,  # a rollback needs old tags to stay in GHCR
                opts=pulumi.ResourceOptions(parent=self),
            )
        return primary.repo_digest
