import importlib
import os
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


@pytest.fixture(scope="module")
def triton_interpreted():
    """runtimes.triton_kernels imported and run under Triton's interpreter (TRITON_INTERPRET=1
    is read both when the kernels are decorated and when they launch, so the module is
    re-imported), the environment and module restored afterwards."""
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop("gate2deploy.runtimes.triton_kernels", None)
    try:
        module = importlib.import_module("gate2deploy.runtimes.triton_kernels")
        assert module.INTERPRETED
        yield module
    finally:
        sys.modules.pop("gate2deploy.runtimes.triton_kernels", None)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
