import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Many small ops: on a shared 2-core box one thread is several times faster than two.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
