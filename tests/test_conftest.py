"""tests/conftest.py's tier check: a collected test without exactly one of the markers unit, integration
and distributed stops the run at collection, naming the test, so that no new test escapes the tiers
(`make test-fast` runs the unit tier alone). The tests below collect hand-made test files in a
temporary directory (pytester) and hand their items to the hook."""

import pytest

import conftest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

FILE = """
import pytest

@pytest.mark.unit
def test_marked():
    pass

def test_unmarked():
    pass

@pytest.mark.unit
@pytest.mark.integration
def test_in_two_tiers():
    pass

@pytest.mark.distributed
@pytest.mark.parametrize("x", [1, 2])
def test_parametrized(x):
    pass

@pytest.mark.parametrize("x", [1])
def test_parametrized_unmarked(x):
    pass
"""

MODULE_MARKED = """
import pytest

pytestmark = pytest.mark.integration

def test_by_its_module():
    pass

@pytest.mark.unit
def test_also_marked_itself():
    pass
"""


def test_a_test_in_no_tier_or_in_two_is_named(pytester):
    items = pytester.getitems(FILE)
    assert conftest.tier_problems(items) == [
        "test_a_test_in_no_tier_or_in_two_is_named.py::test_unmarked: no tier marker",
        "test_a_test_in_no_tier_or_in_two_is_named.py::test_in_two_tiers: integration + unit",
        "test_a_test_in_no_tier_or_in_two_is_named.py::test_parametrized_unmarked[1]: no tier marker"]


def test_a_module_pytestmark_counts_and_a_second_mark_on_the_test_is_refused(pytester):
    items = pytester.getitems(MODULE_MARKED)
    assert conftest.tier_problems(items) == [
        "test_a_module_pytestmark_counts_and_a_second_mark_on_the_test_is_refused.py::test_also_marked_itself: "
        "unit + integration"]


def test_the_hook_stops_the_run_naming_every_untiered_test(pytester):
    with pytest.raises(pytest.UsageError, match=r"exactly one of the markers unit, integration, distributed") as e:
        conftest.pytest_collection_modifyitems(pytester.getitems(FILE))
    assert str(e.value).count("\n  ") == 3 and "::test_unmarked: no tier marker" in str(e.value)
    conftest.pytest_collection_modifyitems([i for i in pytester.getitems(FILE) if "unmarked" not in i.name
                                             and "two" not in i.name])  # all in one tier: no error


def test_files_with_more_slow_tests_come_first_and_each_file_stays_whole_and_in_order():
    class Item:
        def __init__(self, path, tier):
            self.path, self.tier = path, tier

        def get_closest_marker(self, name):
            return name if name == self.tier else None

    items = [Item("a", "unit"), Item("b", "integration"), Item("a", "unit"), Item("c", "distributed"),
             Item("c", "integration"), Item("b", "unit"), Item("d", "unit")]
    got = conftest.heavy_files_first(items)
    assert [(i.path, i.tier) for i in got] == [("c", "distributed"), ("c", "integration"), ("b", "integration"),
                                               ("b", "unit"), ("a", "unit"), ("a", "unit"), ("d", "unit")]
