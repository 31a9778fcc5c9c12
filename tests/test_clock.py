"""The time breakdown: parts nest, time goes to the innermost part only, and the parts add up to the total."""

import pytest

from alexnet_dist import clock as clock_module


class FakeTime:
    """perf_counter and the process's age, moved by hand."""

    def __init__(self):
        self.now = 100.0
        self.process_started = 100.0

    def advance(self, seconds: float):
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: fake.now)
    monkeypatch.setattr(clock_module, "process_seconds", lambda: fake.now - fake.process_started)
    return fake


def test_nested_parts_credit_only_the_innermost_and_add_up_to_the_total(fake_time):
    clock = clock_module.Clock()
    fake_time.advance(1.0)  # start-up
    clock.begin("other")
    fake_time.advance(0.5)  # unclaimed: other
    with clock.part("training"):
        fake_time.advance(3.0)
        with clock.part("checkpoints"):  # a checkpoint saved mid-epoch
            fake_time.advance(2.0)
            with clock.part("tracking"):
                fake_time.advance(0.25)
        fake_time.advance(1.0)
    with clock.part("validation"):
        fake_time.advance(0.75)
    values, table = clock.report()
    expected = {"startup": 1.0, "training": 4.0, "checkpoints": 2.0, "tracking": 0.25, "validation": 0.75,
                "other": 0.5, "data": 0.0, "first_steps": 0.0, "final": 0.0}
    assert {name: values[f"time/{name}"] for name in expected} == pytest.approx(expected)
    assert values["time/total"] == pytest.approx(8.5)
    assert sum(values[f"time/{name}"] for name in clock_module.PARTS) == pytest.approx(values["time/total"])
    assert "where the 8.5 s of this command went" in table


def test_time_before_the_clock_existed_is_start_up(fake_time):
    fake_time.advance(2.0)  # imports, before the module's clock is made
    clock = clock_module.Clock()
    fake_time.advance(1.0)
    values, _ = clock.report()
    assert values["time/startup"] == pytest.approx(3.0) and values["time/total"] == pytest.approx(3.0)
