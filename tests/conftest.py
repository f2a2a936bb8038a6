"""Shared fixtures: small synthetic MARS and DukeV trees, built once per test session."""

from __future__ import annotations

import shutil

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mars_tree(tmp_path_factory):
    """A small MARS-layout tree (read-only: copy it with `copy_tree` before changing it)."""
    from prepare.synthetic import generate

    root = tmp_path_factory.mktemp("mars") / "MARS"
    generate("mars", root, num_ids=8, seed=1, min_len=2, max_len=30)
    return root


@pytest.fixture(scope="session")
def dukev_tree(tmp_path_factory):
    from prepare.synthetic import generate

    root = tmp_path_factory.mktemp("dukev") / "DukeV"
    generate("dukev", root, num_ids=8, seed=1, min_len=2, max_len=30)
    return root


@pytest.fixture
def copy_tree(tmp_path):
    """Copy a session tree into this test's folder, so the test may damage it."""
    def copy(src, name="data"):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy
