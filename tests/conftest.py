import pytest
import torch


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
