"""Measurements of one policy on the kind-rubric task (exploration_bottleneck.py): held-out greedy answers
and their rare words, training-prompt greedy, held-out greedy with every criterion shown, Best-of-k, and
the base rates of a warm start. Every sample uses the run's own sampling settings (its engine schedule)
with the evaluation's temperature and length."""
from __future__ import annotations

import dataclasses as dc
import pathlib
from typing import Any, Sequence

import jax

from ruscarl_jax.data import synthetic
from ruscarl_jax.data.types import Example
from ruscarl_jax.judge.verifiers import check_rule


def _sampling(tokenizer: Any, settings: Any):
    from ruscarl_jax.trainer.setup import stop_token_ids

    return dc.replace(settings.sampling, max_new_tokens=10, stop_token_ids=stop_token_ids(tokenizer),
                      pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0, top_k=0, greedy=False,
                      prompt_bucket_min=16)


def _texts(tokenizer, sample) -> list[str]:
    return tokenizer.batch_decode([t[:n] for t, n in zip(sample.tokens, sample.lengths)], skip_special_tokens=True)


def kind_of(example: Example) -> str:
    """The requested kind of a synthetic example (its id is <split>-<index>-<kind>-<topic>)."""
    kind = example.id.split("-")[2]
    if kind not in synthetic.KINDS:
        raise ValueError(f"example {example.id!r}: not a kind-rubric example")
    return kind


def rare_words(examples: Sequence[Example], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per kind, the fraction of answers to its prompts that contain both of its rare words, at least one,
    and a rare word of another kind (each tested with the rubric's own rule)."""
    own = {kind_of(ex): [i for i in ex.rubric if synthetic.item_type(i) == "rare_word"] for ex in examples}
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(own):
        pairs = [(ex, a) for ex, a in zip(examples, answers) if kind_of(ex) == kind]
        met = [[check_rule(item, a) for item in own[kind]] for _, a in pairs]
        other = [any(check_rule(item, a) for k, items in own.items() if k != kind for item in items) for _, a in pairs]
        out[kind] = {"both": sum(all(m) for m in met) / len(pairs), "any": sum(any(m) for m in met) / len(pairs),
                     "other_kind": sum(other) / len(pairs), "prompts": len(pairs)}
    return out


def evaluate_policy(params, cfg, tokenizer, examples, settings, mesh, rules, seen, num_samples: int, seed: int) -> dict:
    """Held-out greedy without (answers kept in prompt order, with their rare words) and with the full
    scaffold, Best-of-k of temperature-1 samples, and greedy on `seen` training prompts."""
    from ruscarl_jax.evaluation import report as report_lib
    from ruscarl_jax.evaluation.responses import sample_responses
    from ruscarl_jax.judge.judge import Judge
    from ruscarl_jax.judge.settings import JudgeSettings
    from ruscarl_jax.sampler.generate import generate
    from ruscarl_jax.scaffold.prompts import build_prompts

    sampling = _sampling(tokenizer, settings)
    greedy = dc.replace(sampling, greedy=True)
    out: dict[str, Any] = {}
    with Judge(JudgeSettings(api_key_env=None)) as judge:
        def score(texts: list[str], exs=examples) -> float:
            return report_lib.build_report(exs, [[g] for g in judge.grade(list(zip(exs, texts)))], [1]).overall["score"]

        plain = [row[0] for row in sample_responses(params, cfg, tokenizer, examples, 1, greedy, jax.random.key(seed),
                                                    mesh=mesh, rules=rules)]
        out["greedy"], out["greedy_answers"], out["rare_words"] = score(plain), plain, rare_words(examples, plain)
        train = sample_responses(params, cfg, tokenizer, seen, 1, greedy, jax.random.key(seed), mesh=mesh, rules=rules)
        out["greedy_train"] = score([row[0] for row in train], seen)
        full = build_prompts(examples, 1, None, None, dc.replace(settings.scaffold, rule="linear"), seed, tokenizer)
        sample = generate(params, cfg, [r.sampling_ids for r in full.records], jax.random.key(seed), greedy, mesh=mesh,
                          rules=rules)
        out["greedy_full_scaffold"] = score(_texts(tokenizer, sample))
        if num_samples:
            texts = sample_responses(params, cfg, tokenizer, examples, num_samples, sampling, jax.random.key(seed + 1),
                                     mesh=mesh, rules=rules)
            grades = judge.grade([(ex, t) for ex, row in zip(examples, texts) for t in row])
            grades = [grades[i * num_samples:(i + 1) * num_samples] for i in range(len(examples))]
            ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= num_samples]
            out["best_of"] = {str(k): v["score"] for k, v in report_lib.build_report(examples, grades, ks).best_of.items()}
    return out


def base_rates(params, cfg, tokenizer, examples, settings, mesh, rules, num_samples: int, seed: int) -> dict:
    """Per rubric item type, the fraction of (temperature-1 sample, item) pairs whose item is met, on
    `examples` without a scaffold and with every criterion shown; and the samples counted."""
    from ruscarl_jax.evaluation.responses import prompt_ids
    from ruscarl_jax.sampler.generate import generate
    from ruscarl_jax.scaffold.prompts import build_prompts

    sampling = _sampling(tokenizer, settings)
    full = build_prompts(examples, 1, None, None, dc.replace(settings.scaffold, rule="linear"), seed, tokenizer)  # all shown
    modes = {"unscaffolded": prompt_ids(tokenizer, examples), "scaffolded": [r.sampling_ids for r in full.records]}
    out: dict = {}
    for mode, ids in modes.items():
        prompts = [p for p in ids for _ in range(num_samples)]
        texts = _texts(tokenizer, generate(params, cfg, prompts, jax.random.key(seed + 7), sampling, mesh=mesh, rules=rules))
        met: dict[str, list[bool]] = {}
        for i, text in enumerate(texts):
            for item in examples[i // num_samples].rubric:
                met.setdefault(synthetic.item_type(item), []).append(bool(check_rule(item, text)))
        for kind, values in met.items():
            out.setdefault(kind, {})[mode] = sum(values) / len(values)
        out.setdefault("_samples", {})[mode] = len(texts)
    return out


def load_final_params(run_dir: pathlib.Path):
    import orbax.checkpoint as ocp

    checkpoints = run_dir.absolute() / "checkpoints"
    step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    return ocp.StandardCheckpointer().restore(checkpoints / str(step) / "state")["params"]
