import os

import pytest
import torch

# The suite's models are tiny: one intra-op thread is fastest and avoids OpenMP spin-waits on 2-core CI.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
