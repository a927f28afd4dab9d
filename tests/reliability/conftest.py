"""Hypothesis profiles of the fuzz tests: few examples in the default run, many in the
slow-marked run that CI executes (``make test-slow``); see ``test_fuzz.py``."""
from hypothesis import HealthCheck, settings

#: examples per property: the default run and the CI (slow) run
FUZZ_EXAMPLES = {"dev": 40, "ci": 1000}

for _name, _n in FUZZ_EXAMPLES.items():
    settings.register_profile(f"fwi-{_name}", max_examples=_n, deadline=None, database=None, derandomize=False,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much])
