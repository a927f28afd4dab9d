import pytest

from .helpers import datasets


@pytest.fixture
def data():
    """(train, val) tiny in-memory datasets: 16 and 8 samples of families A and B."""
    return datasets()
