"""A synthetic rubric task whose criteria are all checked by rules, generated from a seed.

Each example asks for a short note about a topic. Its rubric is hidden knowledge tied to the topic:
key words the answer should contain (positive points) and one word it should avoid (negative points),
all verified with the `contains` rule. The same topic always has the same rubric, so a policy can learn
it; nothing in the prompt reveals it, so without help it is found only by chance. This is the
exploration bottleneck that rubric scaffolding is meant to break, in miniature: it serves the tiny CPU
config and the exploration-bottleneck experiment.
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


def topic_rubric(topic_index: int, seed: int) -> tuple[RubricItem, ...]:
    """The hidden rubric of one topic: three key words to include, one to avoid (fixed by the seed)."""
    rng = np.random.default_rng([seed, topic_index])
    words = rng.choice(len(KEYWORDS), size=len(POSITIVE_POINTS) + 1, replace=False)
    items = [
        RubricItem(f"The response mentions {KEYWORDS[w]}.", points,
                   ("verifier:rule", "function:contains", f"parameters:{KEYWORDS[w]}", "axis:completeness"))
        for w, points in zip(words[:-1], POSITIVE_POINTS)
    ]
    avoid = KEYWORDS[words[-1]]
    items.append(RubricItem(f"The response uses the word {avoid}.", AVOID_POINTS,
                            ("verifier:rule", "function:contains", f"parameters:{avoid}", "axis:accuracy")))
    return tuple(items)


def make_examples(num_examples: int, seed: int = 0, *, held_out: bool = False, num_topics: int = len(TOPICS)) -> list[Example]:
    """`num_examples` examples cycling over topics; held-out ones use prompt wordings never seen in training."""
    templates = HELD_OUT_TEMPLATES if held_out else PROMPT_TEMPLATES
    rng = np.random.default_rng([seed, 1 if held_out else 0])
    examples = []
    for i in range(num_examples):
        t = i % num_topics
        template = templates[rng.integers(len(templates))]
        prompt = template.format(topic=TOPICS[t])
        examples.append(Example(id=f"{'val' if held_out else 'train'}-{i:04d}-{TOPICS[t]}",
                                messages=(Message("user", prompt),), rubric=topic_rubric(t, seed)))
    return examples


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
