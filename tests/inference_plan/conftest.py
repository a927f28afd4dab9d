import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every planner test runs on one torch thread (tests/conftest.py's ``one_thread``)."""
