"""Rule verifiers: criteria tagged `verifier:rule`, `function:NAME`, `parameters:VALUE` are checked by
code instead of the LLM judge. The registry implements exactly `RULE_FUNCTIONS` of data/types.py.

A rule returns whether the criterion is met (for a negative-points item, "met" means the response does
the undesirable thing, as with the LLM judge):
- `contains` / `not_contains`: VALUE does / does not occur in the response, after both are normalised.
- `exact`: the whole response equals VALUE after normalisation.
  Normalisation (these two and `contains`): Unicode case folding, then every run of whitespace becomes
  one space, then leading and trailing spaces are dropped. Punctuation is kept.
- `regex`: `re.search(VALUE, response)` finds a match (Python syntax; case-sensitive unless VALUE says
  `(?i)`). VALUE must compile, checked when the item is validated.
- `math_verify`: the response's final answer (the last `\\boxed{...}`, else the last number) is
  mathematically equal to VALUE, by the `math-verify` package (`\\frac{1}{2}` equals `0.5`).

`validate_rule_item` rejects an unknown function, a missing or empty VALUE and a regex that does not
compile, naming the item; the judge calls it on every item of a batch before any request is sent.
"""
from __future__ import annotations

import re
import threading
import types
from collections.abc import Callable, Mapping

from ruscarl_jax.data.types import RULE_FUNCTIONS, RubricItem

# The longest final answer handed to math-verify. Its own timeouts use SIGALRM, which only works on the
# main thread; off the main thread (the judge's event loop) we bound the input instead.
MAX_ANSWER_CHARS = 1000


def normalize_text(text: str) -> str:
    """Case-folded, whitespace collapsed to single spaces, stripped."""
    return " ".join(text.casefold().split())


def _contains(response: str, value: str) -> bool:
    return normalize_text(value) in normalize_text(response)


def _not_contains(response: str, value: str) -> bool:
    return not _contains(response, value)


def _exact(response: str, value: str) -> bool:
    return normalize_text(response) == normalize_text(value)


def _regex(response: str, value: str) -> bool:
    return re.search(value, response) is not None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def final_answer(response: str) -> str | None:
    """The last `\\boxed{...}` of the response (braces balanced, returned with the \\boxed wrapper),
    else the last number (a fraction `a/b` counts as one number), else None."""
    start = response.rfind("\\boxed{")
    while start >= 0:
        depth = 0
        for j in range(start + len("\\boxed"), len(response)):
            if response[j] == "{":
                depth += 1
            elif response[j] == "}":
                depth -= 1
                if depth == 0:
                    return response[start:j + 1]
        start = response.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def math_equal(answer: str, gold: str) -> bool:
    """math-verify equivalence of two answers (LaTeX or plain expressions)."""
    import math_verify  # imported here: it pulls in sympy, which rule-free runs never need

    on_main = threading.current_thread() is threading.main_thread()
    limit = 5 if on_main else None

    def parse(text: str) -> list:
        # bare LaTeX such as \sqrt{2} is only recognised inside math delimiters
        return math_verify.parse(text, parsing_timeout=limit) or math_verify.parse(f"${text}$", parsing_timeout=limit)

    gold_parsed, answer_parsed = parse(gold), parse(answer)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, answer_parsed, timeout_seconds=limit))


def _math_verify(response: str, value: str) -> bool:
    answer = final_answer(response)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return False
    return math_equal(answer, value)


VERIFIERS: Mapping[str, Callable[[str, str], bool]] = types.MappingProxyType({
    "math_verify": _math_verify,
    "exact": _exact,
    "contains": _contains,
    "regex": _regex,
    "not_contains": _not_contains,
})
if set(VERIFIERS) != set(RULE_FUNCTIONS):  # the loaders accept exactly RULE_FUNCTIONS
    raise RuntimeError(f"verifier registry {sorted(VERIFIERS)} != RULE_FUNCTIONS {sorted(RULE_FUNCTIONS)}")


def rule_spec(item: RubricItem, where: str = "rubric item") -> tuple[str, str]:
    """(function name, parameter value) of a rule item; ValueError naming `where` if either is bad."""
    function = item.tag_value("function")
    if function not in VERIFIERS:
        problem = "has no 'function:NAME' tag" if function is None else f"names unknown function {function!r}"
        raise ValueError(f"{where}: 'verifier:rule' item {problem} (valid: {', '.join(sorted(VERIFIERS))})")
    value = item.tag_value("parameters")
    if not value:
        raise ValueError(f"{where}: rule function {function!r} needs a non-empty 'parameters:VALUE' tag")
    return function, value


def validate_rule_item(item: RubricItem, where: str = "rubric item") -> None:
    """Raise ValueError (naming `where`) unless the rule item can be checked."""
    function, value = rule_spec(item, where)
    if function == "regex":
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{where}: 'parameters' is not a valid regular expression: {err}") from None


def check_rule(item: RubricItem, response: str) -> bool:
    """Whether `response` meets the rule item."""
    function, value = rule_spec(item)
    return VERIFIERS[function](response, value)
