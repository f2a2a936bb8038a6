"""Shared fixtures: small synthetic MARS and DukeV trees, built once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch


def pytest_report_header(config):
    where = config.option.basetemp or tempfile.gettempdir()
    free = shutil.disk_usage(where if os.path.isdir(where) else tempfile.gettempdir()).free
    return (f"temporary files: {where}, {free / 2**30:.1f} GiB free (the suite needs about 6 GiB at its peak: "
            "training runs with 370 MB checkpoints)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`module_tmp(name)`: a new folder for a module's shared fixtures, removed when that module's tests are done.

    A test's own `tmp_path` goes when it passes (`tmp_path_retention_policy = failed` in pytest.ini), so the suite
    holds at most one module's runs and checkpoints (STE-NVAN's are 370 MB each) on disk at a time."""
    made = []

    def make(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


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
