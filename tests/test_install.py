"""The torch floor: setup.py's requirement and the import-time check agree,
and the check compares versions as numbers."""
import re
from pathlib import Path

import pytest

import segops


def test_setup_requires_the_torch_segops_checks_for():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', setup)
    assert floor is not None
    assert tuple(map(int, floor.groups())) == segops.MIN_TORCH


@pytest.mark.parametrize("version", ["2.7.0", "2.7.1+cu126", "2.10.0", "2.14.1+cu130", "3.0.0a0"])
def test_supported_torch_imports(version):
    segops._require_torch(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.4.1+cu121", "1.13.1", "nightly"])
def test_older_torch_is_an_import_error_naming_both_versions(version):
    with pytest.raises(ImportError, match=rf"torch >= 2\.7, found torch {re.escape(version)}"):
        segops._require_torch(version)
