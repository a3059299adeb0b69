"""A synthetic rubric task whose criteria are all checked by rules, generated from a seed.

Each example asks for a short note about a topic. Its rubric is hidden knowledge tied to the topic:
key words the answer should contain (positive points) and one word it should avoid (negative points),
all verified with the `contains` rule; optionally also a format ("Notes:" and at most three words,
a `regex` rule), which closes the loophole of listing many guessed words. The same topic always has
the same rubric, so a policy can learn it; nothing in the prompt reveals it, so without help it is
found only by chance. This is the
exploration bottleneck that rubric scaffolding is meant to break, in miniature: it serves the tiny CPU
config and the exploration-bottleneck experiment.

The warm start of that experiment learns from `demonstration`s on `make_warm_start_examples`: other
topics, fresh random rubrics, so it learns to follow revealed criteria but no topic's hidden words.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from ruscarl_jax.data.types import Example, Message, RubricItem

TOPICS = (
    "river", "castle", "garden", "harbor", "forest", "desert", "bakery", "library", "volcano", "glacier",
    "market", "temple", "canyon", "island", "orchard", "lighthouse", "meadow", "bridge", "museum", "village",
    "mountain", "festival", "workshop", "railway", "observatory", "vineyard", "monastery", "lagoon", "prairie",
    "citadel", "aquarium", "tundra",
)
KEYWORDS = (
    "amber", "breeze", "copper", "dawn", "ember", "fable", "granite", "hollow", "ivory", "jasmine", "kettle",
    "lantern", "marble", "nectar", "oak", "pepper", "quartz", "ripple", "saffron", "thistle", "umber", "velvet",
    "willow", "yarrow", "zephyr", "cobalt", "drift", "echo", "flint", "gale", "honey", "indigo", "juniper",
    "kelp", "lilac", "moss", "nimbus", "onyx", "pebble", "quill",
)
PROMPT_TEMPLATES = (
    "Write a short note about the {topic}.",
    "Describe the {topic} in a few words.",
    "Tell me something about the {topic}.",
    "Give a brief description of the {topic}.",
)
HELD_OUT_TEMPLATES = (
    "What comes to mind about the {topic}?",
    "Say a few words on the {topic}.",
)
POSITIVE_POINTS = (3.0, 2.0, 2.0)
AVOID_POINTS = -2.0
# Topics of the warm-start demonstrations only: disjoint from TOPICS, so the warm start teaches how to
# follow listed key words without teaching any topic's hidden rubric.
WARM_START_TOPICS = (
    "kitchen", "stadium", "airport", "factory", "theater", "cathedral", "palace", "pier", "cave", "waterfall",
    "valley", "swamp", "reef", "plaza", "tower", "mill", "barn", "cottage", "fortress", "quarry", "canal",
    "arena", "gallery", "chapel", "inn", "lake", "hill", "pond", "farm", "school", "garage", "tavern",
)
ANSWER_PREFIX = "Notes:"
ANSWER_WORDS = 3
# The optional format item: the answer is "Notes:" and at most ANSWER_WORDS words (so a long list of
# guessed key words, the same for every topic, cannot collect the key-word points).
FORMAT_PATTERN = r"^Notes:( \w+){0,3}$"
FORMAT_POINTS = 2.0


def format_item() -> RubricItem:
    return RubricItem('The response is "Notes:" followed by at most three words.', FORMAT_POINTS,
                      ("verifier:rule", "function:regex", f"parameters:{FORMAT_PATTERN}", "axis:instruction_following"))


def _keyword_rubric(words: list[str], with_format: bool = False) -> tuple[RubricItem, ...]:
    """Items to include words[:-1] (POSITIVE_POINTS) and to avoid words[-1], checked by `contains`;
    then the format item when `with_format`."""
    items = [RubricItem(f"The response mentions {w}.", points,
                        ("verifier:rule", "function:contains", f"parameters:{w}", "axis:completeness"))
             for w, points in zip(words[:-1], POSITIVE_POINTS)]
    items.append(RubricItem(f"The response uses the word {words[-1]}.", AVOID_POINTS,
                            ("verifier:rule", "function:contains", f"parameters:{words[-1]}", "axis:accuracy")))
    if with_format:
        items.append(format_item())
    return tuple(items)


def topic_rubric(topic_index: int, seed: int, with_format: bool = False) -> tuple[RubricItem, ...]:
    """The hidden rubric of one topic: three key words to include, one to avoid (fixed by the seed),
    and the format item when `with_format` (the same for every topic)."""
    rng = np.random.default_rng([seed, topic_index])
    words = rng.choice(len(KEYWORDS), size=len(POSITIVE_POINTS) + 1, replace=False)
    return _keyword_rubric([KEYWORDS[w] for w in words], with_format)


def make_examples(num_examples: int, seed: int = 0, *, held_out: bool = False, num_topics: int = len(TOPICS),
                  with_format: bool = False) -> list[Example]:
    """`num_examples` examples cycling over topics; held-out ones use prompt wordings never seen in training.
    data/tiny/ is this without the format item."""
    templates = HELD_OUT_TEMPLATES if held_out else PROMPT_TEMPLATES
    rng = np.random.default_rng([seed, 1 if held_out else 0])
    examples = []
    for i in range(num_examples):
        t = i % num_topics
        template = templates[rng.integers(len(templates))]
        prompt = template.format(topic=TOPICS[t])
        examples.append(Example(id=f"{'val' if held_out else 'train'}-{i:04d}-{TOPICS[t]}",
                                messages=(Message("user", prompt),), rubric=topic_rubric(t, seed, with_format)))
    return examples


def make_warm_start_examples(num_examples: int, seed: int = 0, with_format: bool = False) -> list[Example]:
    """Examples for the warm-start demonstrations: WARM_START_TOPICS, each with a FRESH random rubric
    in the task's format (three key words to include, one to avoid, optionally the format item), so no
    topic is tied to any words."""
    rng = np.random.default_rng([seed, 2])
    examples = []
    for i in range(num_examples):
        topic = WARM_START_TOPICS[i % len(WARM_START_TOPICS)]
        template = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))]
        words = rng.choice(len(KEYWORDS), size=len(POSITIVE_POINTS) + 1, replace=False)
        examples.append(Example(id=f"warm-{i:04d}-{topic}", messages=(Message("user", template.format(topic=topic)),),
                                rubric=_keyword_rubric([KEYWORDS[w] for w in words], with_format)))
    return examples


def demonstration(example: Example, shown: tuple[int, ...] | list[int], rng: np.random.Generator) -> str:
    """The answer a policy that follows a scaffold should give when rubric items `shown` are revealed:
    "Notes: w1 w2 w3" with the shown key words to include (in random order), filled up to ANSWER_WORDS
    with random key words, never a shown word to avoid. Unshown items play no part (they are unknown);
    the answer always has the format of `format_item`."""
    include, avoid = [], set()
    for i in shown:
        item = example.rubric[i]
        word = item.tag_value("parameters")
        if item == format_item():
            continue
        if item.tag_value("function") != "contains" or not word:
            raise ValueError(f"example {example.id!r}, rubric item {i}: not a `contains` key-word item")
        if item.points > 0:
            include.append(word)
        else:
            avoid.add(word)
    include = [include[j] for j in rng.permutation(len(include))]
    pool = [w for w in KEYWORDS if w not in avoid and w not in include]
    fill = [pool[j] for j in rng.choice(len(pool), size=max(0, ANSWER_WORDS - len(include)), replace=False)]
    return " ".join([ANSWER_PREFIX, *include, *fill])


def corpus(seed: int = 0) -> list[str]:
    """Text a tokenizer for this task should be trained on (prompts, rubric wording, key words)."""
    texts = [t.format(topic=topic) for t in PROMPT_TEMPLATES + HELD_OUT_TEMPLATES for topic in TOPICS]
    texts += [item.criterion for t in range(len(TOPICS)) for item in topic_rubric(t, seed)]
    texts += [" ".join(KEYWORDS)] * 20  # frequent enough that each key word becomes one token
    return texts


def write_jsonl(examples: list[Example], path: str | pathlib.Path) -> None:
    """Write examples in the HealthBench JSONL layout (prompt_id, prompt, rubrics)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({
                "prompt_id": ex.id,
                "prompt": [m.to_dict() for m in ex.messages],
                "rubrics": [{"criterion": r.criterion, "points": r.points, "tags": list(r.tags)} for r in ex.rubric],
            }) + "\n")
