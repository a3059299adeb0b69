"""Rule verifiers: the registry, each function's semantics, math equivalence (also off the main thread),
and load-time validation errors."""
import concurrent.futures

import pytest

from ruscarl_jax.data.types import RULE_FUNCTIONS, RubricItem
from ruscarl_jax.judge.verifiers import VERIFIERS, check_rule, final_answer, math_equal, normalize_text, validate_rule_item


def rule(function: str, value: str | None, points: float = 1.0) -> RubricItem:
    tags = ("verifier:rule", f"function:{function}") + ((f"parameters:{value}",) if value is not None else ())
    return RubricItem(f"rule {function}", points, tags)


def test_registry_is_exactly_rule_functions():
    assert set(VERIFIERS) == set(RULE_FUNCTIONS)


def test_normalisation():
    assert normalize_text("  Hello\t\nWORLD  ") == "hello world"
    assert normalize_text("Straße") == "strasse"  # case folding, not lower()


@pytest.mark.parametrize("function, value, response, met", [
    ("contains", "Paris", "The capital is  paris.", True),
    ("contains", "new   york", "I love New\nYork!", True),
    ("contains", "Rome", "The capital is Paris.", False),
    ("not_contains", "Rome", "The capital is Paris.", True),
    ("not_contains", "paris", "The capital is PARIS.", False),
    ("exact", "The answer is 42.", "  the ANSWER is\n42. ", True),
    ("exact", "42", "The answer is 42.", False),
    ("regex", r"\b\d{3}-\d{4}\b", "call 555-1234 now", True),
    ("regex", r"^yes$", "Yes", False),  # case-sensitive unless the pattern says otherwise
    ("regex", r"(?i)^yes$", "Yes", True),
    ("math_verify", r"\frac{1}{2}", r"So the result is \boxed{0.5}.", True),
    ("math_verify", "0.5", r"We get $x = \boxed{\frac{1}{2}}$", True),
    ("math_verify", r"\frac{1}{2}", "First 3, then 7, finally 1/2", True),  # last number, a fraction
    ("math_verify", r"\frac{1}{2}", r"\boxed{0.5} was wrong, it is \boxed{0.75}", False),  # the LAST box
    ("math_verify", r"\sqrt{2}", r"\boxed{\sqrt{2}}", True),
    ("math_verify", "3", "no numbers at all", False),
    ("math_verify", "10", "I computed 9.", False),
])
def test_rule_semantics(function, value, response, met):
    assert check_rule(rule(function, value), response) is met


def test_final_answer_extraction():
    assert final_answer(r"a \boxed{\frac{1}{2}} b") == r"\boxed{\frac{1}{2}}"
    assert final_answer(r"\boxed{1} then \boxed{{2}+1}") == r"\boxed{{2}+1}"
    assert final_answer(r"ok \boxed{unbalanced") is None
    assert final_answer(r"ok 7 \boxed{unbalanced") == "7"  # an unclosed box falls back to the last number
    assert final_answer("values 3 and -4.5") == "-4.5"
    assert final_answer("nothing") is None


def test_math_verify_works_off_the_main_thread():
    # math-verify's own timeouts use SIGALRM, which raises off the main thread; ours must not.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda a: math_equal(a, r"\frac{1}{2}"), ["0.5", "1/2", r"\boxed{0.25}"]))
    assert results == [True, True, False]


@pytest.mark.parametrize("item, message", [
    (rule("sympy_equal", "1"), "unknown function 'sympy_equal'"),
    (RubricItem("r", 1.0, ("verifier:rule",)), "no 'function:NAME' tag"),
    (rule("contains", None), "non-empty 'parameters:VALUE'"),
    (rule("regex", "(unclosed"), "not a valid regular expression"),
])
def test_validation_errors_name_the_item(item, message):
    with pytest.raises(ValueError, match="example 'e7' rubric\\[3\\]") as err:
        validate_rule_item(item, "example 'e7' rubric[3]")
    assert message in str(err.value)


def test_parameters_may_contain_colons():
    assert check_rule(rule("contains", "ratio 1:2"), "Mix at a ratio 1:2.") is True
