import os

import pytest
import torch

# rich sizes its tables by the terminal; pytest-xdist workers have none (80 columns), which wraps the words
# the CLI tests look for.  One width for every worker and for a plain run.
os.environ.setdefault("COLUMNS", "200")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's training steps on one intra-op thread.

    The CPU box is shared: OpenMP with 2 threads on 2 busy cores ran 10-50x
    slower than 1 thread.  Restored afterwards.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
