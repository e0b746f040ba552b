import os

import pytest
import torch

# The suite's models are tiny: one intra-op thread is fastest and avoids OpenMP spin-waits on 2-core CI.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # The minutes-long end-to-end tests (marked slow) first, the rest in their usual order (a stable sort).
    # pyproject runs two workers with xdist's load scheduling one test at a time (--maxschedchunk 1): the two
    # workers start on the long runs and the short tests fill whichever worker frees first. With work stealing
    # over the file order the GZSL targets and planted shapes (6 min together) queued on one worker and the
    # suite took 10:16-11:00 on 17-19 CPU minutes (stop 24).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
