import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tests share two cores, and results compare byte for byte."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
