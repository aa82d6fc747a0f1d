import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


@pytest.fixture
def cli(capsys):
    """Run the gate2deploy CLI in-process; returns (exit code, stdout, stderr)."""
    from gate2deploy.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
