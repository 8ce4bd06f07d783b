"""localImageId (`scripts/up.sh STACK --demo`): an image built on the Docker host runs by
its image id, its content digest; a malformed id is refused naming the key. The deploy
itself is proven on the engine: tests/stack runs both stacks' api this way."""

from __future__ import annotations

import pytest

from components.config import ConfigError
from tests.pulumi_harness import run_program, stack_config


def test_local_image_id_is_what_the_api_runs() -> None:
    image_id = "sha256:" + "cd" * 32
    run = run_program("staging", stack_config("staging", localImageId=image_id))
    assert run.containers["rag-staging-api"].inputs["image"] == image_id
    assert run.exports["imageRef"][0] == image_id


def test_a_malformed_local_image_id_is_refused_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"localImageId.*'latest'.*sha256:"):
        run_program("staging", stack_config("staging", localImageId="latest"))
