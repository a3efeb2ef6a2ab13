"""Shared by every test file: global state a test changes is put back after it, so each file passes alone and in
any order."""
import pytest
import torch


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """A test (or the code it runs, e.g. shapes.py's workers) may set torch's thread count; the next test gets the
    count the session started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
