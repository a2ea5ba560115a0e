"""Private Slurm clusters for the tests in this folder (see tests/slurm_cluster.py), one per session.
Where Slurm cannot run they skip, naming why; under ``CI=true`` they fail instead (tests/helpers/requires.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.helpers.requires import require, under_ci
from tests.slurm_cluster import NamespacesRefused, SlurmCluster, make_root, slurm_available


def _cluster(nodes: int) -> Iterator[SlurmCluster]:
    require(slurm_available())
    root = make_root()
    try:
        cluster = SlurmCluster(root, nodes=nodes).start()
    except NamespacesRefused as err:  # a sandbox without them: the exact refusal, in the skip reason
        shutil.rmtree(root, ignore_errors=True)
        reason = f"no two-node cluster here: {err}"
        if under_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """One node on 127.0.0.1."""
    yield from _cluster(1)


@pytest.fixture(scope="session")
def slurm_two_nodes() -> Iterator[SlurmCluster]:
    """Two nodes, each in its own network namespace."""
    yield from _cluster(2)
