"""Stand-in for hypothesis on machines without it: property tests are skipped, the rest runs."""

import pytest


class _Any:
    def __call__(self, *a, **k):
        return self

    def __getattr__(self, name):
        return self

    def __or__(self, other):
        return self


class settings:
    def __init__(self, *a, **k):
        pass

    def __call__(self, fn):
        return fn

    @staticmethod
    def register_profile(*a, **k):
        pass

    @staticmethod
    def load_profile(*a, **k):
        pass


def given(*a, **k):
    return pytest.mark.skip(reason="hypothesis not installed on this machine")


def assume(*a, **k):
    return True


def example(*a, **k):
    return lambda fn: fn


strategies = _Any()
HealthCheck = _Any()
