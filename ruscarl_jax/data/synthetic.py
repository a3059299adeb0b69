"""A synthetic rule-verified rubric task with an exploration bottleneck that transfers across prompts.

Every prompt asks for one of four kinds of text (a poem, a story, a letter, a riddle) about a topic,
in one of several wordings; the kind is visible in the prompt, the topic and wording do not matter.
The rubric is fixed by the KIND (and the seed), so what a policy learns on training prompts applies
to held-out prompts of unseen topics and unseen wordings. Each rubric has, all checked by rules:

- two RARE key words to include (3 and 2 points, `contains`), drawn from RARE_WORDS;
- one COMMON word to avoid (-2 points), drawn from COMMON_WORDS;
- the format item: "Notes:" followed by at most three words (2 points, `regex`).

The warm start (an SFT on `demonstration`s of `make_warm_start_examples`: other topics, a fresh random
rubric per example) copies the key words a scaffold shows, from both pools, and otherwise fills its
answer with COMMON words only. So without a scaffold it almost never writes a rare word (the
bottleneck), with one it writes them often, and plain GRPO sees almost no reward for them.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from ruscarl_jax.data.types import Example, Message, RubricItem

KINDS = ("poem", "story", "letter", "riddle")
TOPICS = (
    "river", "castle", "garden", "harbor", "forest", "desert", "bakery", "library", "volcano", "glacier",
    "market", "temple", "canyon", "island", "orchard", "lighthouse", "meadow", "bridge", "museum", "village",
    "mountain", "festival", "workshop", "railway",
)
HELD_OUT_TOPICS = ("observatory", "vineyard", "monastery", "lagoon", "prairie", "citadel", "aquarium", "tundra")
# Topics of the warm-start demonstrations only, disjoint from both.
WARM_START_TOPICS = (
    "kitchen", "stadium", "airport", "factory", "theater", "cathedral", "palace", "pier", "cave", "waterfall",
    "valley", "swamp", "reef", "plaza", "tower", "mill", "barn", "cottage", "fortress", "quarry", "canal",
    "arena", "gallery", "chapel", "inn", "lake", "hill", "pond", "farm", "school", "garage", "tavern",
)
COMMON_WORDS = (
    "amber", "breeze", "copper", "dawn", "ember", "fable", "granite", "hollow", "ivory", "jasmine", "kettle",
    "lantern", "marble", "nectar", "oak", "pepper", "quartz", "ripple", "saffron", "thistle", "umber", "velvet",
    "willow", "yarrow", "zephyr", "cobalt", "drift", "echo", "flint", "gale", "honey", "indigo", "juniper",
    "kelp", "lilac", "moss", "nimbus", "onyx", "pebble", "quill",
)
RARE_WORDS = ("aurora", "basalt", "cinder", "dune", "fjord", "garnet", "heron", "iris", "jade", "kestrel",
              "lotus", "mesa", "nova", "opal", "prism", "raven")
KEYWORDS = COMMON_WORDS + RARE_WORDS
PROMPT_TEMPLATES = (
    "Write a {kind} about the {topic}.",
    "Compose a short {kind} on the {topic}.",
    "I need a {kind} about the {topic}.",
)
HELD_OUT_TEMPLATES = (
    "Please give me a {kind} about the {topic}.",
    "Could you draft a {kind} on the {topic}?",
)
POSITIVE_POINTS = (3.0, 2.0)
AVOID_POINTS = -2.0
ANSWER_PREFIX = "Notes:"
ANSWER_WORDS = 3
FORMAT_PATTERN = r"^Notes:( \w+){0,3}$"
FORMAT_POINTS = 2.0
# Item types (for base rates and breakdowns), named by the axis tag each item carries.
ITEM_TYPES = {"axis:completeness": "rare_word", "axis:accuracy": "avoid_word", "axis:instruction_following": "format"}


def format_item() -> RubricItem:
    return RubricItem('The response is "Notes:" followed by at most three words.', FORMAT_POINTS,
                      ("verifier:rule", "function:regex", f"parameters:{FORMAT_PATTERN}", "axis:instruction_following"))


def item_type(item: RubricItem) -> str:
    """'rare_word', 'avoid_word' or 'format' (from the item's axis tag)."""
    for tag, name in ITEM_TYPES.items():
        if tag in item.tags:
            return name
    raise ValueError(f"rubric item {item.criterion!r} is not an item of the synthetic task")


def _rubric(include: list[str], avoid: str) -> tuple[RubricItem, ...]:
    items = [RubricItem(f"The response mentions {w}.", points,
                        ("verifier:rule", "function:contains", f"parameters:{w}", "axis:completeness"))
             for w, points in zip(include, POSITIVE_POINTS)]
    items.append(RubricItem(f"The response uses the word {avoid}.", AVOID_POINTS,
                            ("verifier:rule", "function:contains", f"parameters:{avoid}", "axis:accuracy")))
    items.append(format_item())
    return tuple(items)


def kind_rubric(kind_index: int, seed: int) -> tuple[RubricItem, ...]:
    """The rubric of every prompt of one kind: two rare words to include, one common word to avoid,
    the format item (fixed by the seed; different kinds get different rare words)."""
    rare = np.random.default_rng([seed, 5]).permutation(len(RARE_WORDS))
    avoid = np.random.default_rng([seed, 6]).permutation(len(COMMON_WORDS))
    n = len(POSITIVE_POINTS)
    include = [RARE_WORDS[i] for i in rare[kind_index * n:(kind_index + 1) * n]]
    return _rubric(include, COMMON_WORDS[avoid[kind_index]])


def make_examples(num_examples: int, seed: int = 0, *, held_out: bool = False) -> list[Example]:
    """`num_examples` examples cycling over the kinds; training ones use TOPICS and PROMPT_TEMPLATES,
    held-out ones HELD_OUT_TOPICS and HELD_OUT_TEMPLATES (both unseen in training). data/tiny/ is this."""
    templates, topics = (HELD_OUT_TEMPLATES, HELD_OUT_TOPICS) if held_out else (PROMPT_TEMPLATES, TOPICS)
    rng = np.random.default_rng([seed, 1 if held_out else 0])
    examples = []
    for i in range(num_examples):
        k = i % len(KINDS)
        topic = topics[rng.integers(len(topics))]
        prompt = templates[rng.integers(len(templates))].format(kind=KINDS[k], topic=topic)
        examples.append(Example(id=f"{'val' if held_out else 'train'}-{i:04d}-{KINDS[k]}-{topic}",
                                messages=(Message("user", prompt),), rubric=kind_rubric(k, seed)))
    return examples


def make_warm_start_examples(num_examples: int, seed: int = 0) -> list[Example]:
    """Examples for the warm-start demonstrations: WARM_START_TOPICS, the training wordings, and a
    FRESH random rubric per example (include words from both pools, avoid word from both), so no kind
    is tied to any words."""
    rng = np.random.default_rng([seed, 2])
    examples = []
    for i in range(num_examples):
        topic = WARM_START_TOPICS[i % len(WARM_START_TOPICS)]
        kind = KINDS[rng.integers(len(KINDS))]
        prompt = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(kind=kind, topic=topic)
        words = rng.choice(len(KEYWORDS), size=len(POSITIVE_POINTS) + 1, replace=False)
        examples.append(Example(id=f"warm-{i:04d}-{kind}-{topic}", messages=(Message("user", prompt),),
                                rubric=_rubric([KEYWORDS[w] for w in words[:-1]], KEYWORDS[words[-1]])))
    return examples


def demonstration(example: Example, shown: tuple[int, ...] | list[int], rng: np.random.Generator) -> str:
    """The answer of a policy that follows a scaffold showing rubric items `shown`: "Notes: w1 w2 w3"
    with the shown words to include (in random order), filled up to ANSWER_WORDS with random COMMON
    words, never a shown word to avoid. Unshown items play no part (they are unknown)."""
    include, avoid = [], set()
    for i in shown:
        item = example.rubric[i]
        if item == format_item():
            continue
        word = item.tag_value("parameters")
        if item.tag_value("function") != "contains" or not word:
            raise ValueError(f"example {example.id!r}, rubric item {i}: not a `contains` key-word item")
        (include.append(word) if item.points > 0 else avoid.add(word))
    include = [include[j] for j in rng.permutation(len(include))]
    pool = [w for w in COMMON_WORDS if w not in avoid and w not in include]
    fill = [pool[j] for j in rng.choice(len(pool), size=max(0, ANSWER_WORDS - len(include)), replace=False)]
    return " ".join([ANSWER_PREFIX, *include, *fill])


def corpus(seed: int = 0) -> list[str]:
    """Text a tokenizer for this task should be trained on (prompts, rubric wording, key words)."""
    texts = [t.format(kind=k, topic=topic) for t in PROMPT_TEMPLATES + HELD_OUT_TEMPLATES for k in KINDS
             for topic in TOPICS + HELD_OUT_TOPICS + WARM_START_TOPICS]
    texts += [item.criterion for k in range(len(KINDS)) for item in kind_rubric(k, seed)]
    texts += [f"The response mentions {w}. The response uses the word {w}." for w in KEYWORDS]
    texts += [" ".join(KEYWORDS), ANSWER_PREFIX] * 20  # frequent enough that each key word becomes one token
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
