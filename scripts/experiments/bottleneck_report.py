"""The exploration-bottleneck results: collected from the run directories into one JSON (`collect`), and
the doc's results block rendered from that JSON alone (`render`), so a committed JSON reproduces the
committed doc. Contrasts are paired by seed with a percentile bootstrap interval over seeds (curves.py)."""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import curves

CONTRASTS = (("ruscarl", "plain_grpo"), ("ruscarl_no_step_decay", "plain_grpo"), ("ruscarl", "ruscarl_no_step_decay"))
RESAMPLES = 10_000


def contrast(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a - b) over paired seeds, its 95% percentile bootstrap interval and the pre-registered reading."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    lo, hi = curves.bootstrap_ci(d, RESAMPLES, seed=0)
    verdict = "beats" if lo > 0 else "loses" if hi < 0 else "inconclusive"
    return {"mean": float(d.mean()), "ci95": [lo, hi], "verdict": verdict, "differences": d.tolist()}


def _arm(rows: list[dict], results: Mapping[int, dict], arm: str, seeds: Sequence[int]) -> dict[str, Any]:
    final = curves.final_values(rows, arm, "heldout_score")
    kl_final = curves.final_values(rows, arm, "kl")
    kl10 = curves.last_window_mean(rows, arm, "kl", 10)
    unscaffolded = curves.last_window_mean(rows, arm, "train_reward_unscaffolded", 10)
    kinds = sorted(results[seeds[0]]["rare_words"])
    return {
        "seeds": list(seeds),
        "heldout_final": [final[s] for s in seeds],
        "heldout_final_recomputed": [results[s]["greedy"] for s in seeds],
        "train_prompts_final": [results[s]["greedy_train"] for s in seeds],
        "heldout_full_scaffold": [results[s]["greedy_full_scaffold"] for s in seeds],
        "train_reward_unscaffolded_last10": [unscaffolded[s] for s in seeds],
        "kl_final": [kl_final[s] for s in seeds],
        "kl_last10": [kl10[s] for s in seeds],
        "best_of": {k: [results[s]["best_of"][k] for s in seeds] for k in sorted(results[seeds[0]].get("best_of", {}), key=int)},
        "rare_words": {kind: {m: [results[s]["rare_words"][kind][m] for s in seeds] for m in ("both", "any", "other_kind")}
                       for kind in kinds},
        "distinct_heldout_answers": [len(set(results[s]["greedy_answers"])) for s in seeds],
        "run_seconds": [results[s]["seconds"] for s in seeds],
    }


def collect(args: Any, arms: Mapping[str, str], numerics: Mapping[str, tuple[str, dict]], jobs: Sequence[tuple],
            job_dir: Callable, wall: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """The results JSON and the curve rows of the finished runs of `jobs`: per numerics with a finished
    warm start, the seeds finished in every arm (all of them once the command has completed)."""
    rows: list[dict] = []
    out: dict[str, Any] = {"arm_labels": dict(arms), "seeds": list(args.seeds), "numerics": {}}
    compute = 0.0
    done = {job for job in jobs if (job_dir(args, job) / "result.json").exists()}
    for name in args.numerics:
        if (name, None, 0) not in done:
            continue
        warm = json.loads((job_dir(args, (name, None, 0)) / "result.json").read_text())
        compute += warm["build_seconds"] + warm["seconds"]
        seeds = [s for s in args.seeds if all((name, arm, s) in done for arm in arms)]
        per_arm: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
        subset: list[dict] = []
        for seed in seeds:
            for arm in arms:
                directory = job_dir(args, (name, arm, seed))
                per_arm[arm][seed] = json.loads((directory / "result.json").read_text())
                compute += per_arm[arm][seed]["seconds"]
                subset.append({"numerics": name, "arm": arm, "seed": seed, "step": 0,
                               "heldout_score": warm["scores"]["greedy"],
                               **{k: math.nan for k in curves.METRIC_KEYS if k != "heldout_score"}})
                subset += curves.read_run(directory / "metrics.jsonl", arm, seed, name)
        rows += subset
        arm_results = {arm: _arm(subset, per_arm[arm], arm, seeds) for arm in arms} if seeds else {}
        scores = warm["scores"]
        out["numerics"][name] = {
            "description": numerics[name][0], "overrides": numerics[name][1], "seeds": seeds,
            "complete": seeds == list(args.seeds), "arms": arm_results,
            "contrasts": {f"{a} - {b}": contrast(arm_results[a]["heldout_final"], arm_results[b]["heldout_final"])
                          for a, b in CONTRASTS} if seeds else {},
            "warm_start": {k: warm[k] for k in ("steps", "demonstrations", "first_loss", "final_loss")} | {
                "heldout_greedy": scores["greedy"], "train_prompts_greedy": scores["greedy_train"],
                "heldout_full_scaffold": scores["greedy_full_scaffold"], "best_of": scores.get("best_of", {}),
                "rare_words": scores["rare_words"], "build_seconds": warm["build_seconds"]},
            "base_rates": {k: v for k, v in warm["base_rates"].items() if not k.startswith("_")},
            "base_rate_samples": warm["base_rates"]["_samples"],
        }
    if not out["numerics"]:
        raise RuntimeError(f"no finished runs in {args.workdir}")
    out["steps"] = int(max((r["step"] for r in rows), default=0))
    out["runs"] = sum(len(r["seeds"]) * len(arms) for r in out["numerics"].values())
    out["compute_minutes"] = round(compute / 60, 2)  # summed over processes
    out["wall_minutes"] = round(wall["seconds"] / 60, 2)
    out["invocations"] = list(wall["invocations"])
    first = args.numerics[0]
    verdicts = {n: r["contrasts"]["ruscarl - plain_grpo"]["verdict"] if r["complete"] else "incomplete"
                for n, r in out["numerics"].items()}
    primary = verdicts.get(first, "incomplete")
    others = [verdicts.get(n, "incomplete") for n in args.numerics[1:]]
    out["verdict"] = {"primary": primary, "numerics": first, "others": others,
                      "robust_to_numerics": bool(others) and primary in ("beats", "loses") and all(v == primary for v in others)}
    return out, rows


def _fmt(values: Sequence[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _ci(c: Mapping[str, Any]) -> str:
    return f"{c['mean']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"


SENTENCES = {"beats": "RuscaRL beats plain GRPO", "loses": "RuscaRL loses to plain GRPO",
             "inconclusive": "RuscaRL vs plain GRPO is inconclusive",
             "incomplete": "none yet: the pre-registered seeds are not all in"}


def render(result: Mapping[str, Any]) -> str:
    """The doc's results block, from the results JSON alone."""
    labels = result["arm_labels"]
    names = list(result["numerics"])
    seeds = result["seeds"]
    v = result["verdict"]
    counts = ", ".join(f"{n.upper()} {len(r['seeds'])} of {len(seeds)} seeds" for n, r in result["numerics"].items())
    if v["primary"] == "incomplete":
        head = f"**Pre-registered verdict: {SENTENCES['incomplete']} ({counts}).** The figures below are interim."
    else:
        primary = result["numerics"][v["numerics"]]["contrasts"]["ruscarl - plain_grpo"]
        robust = ("the same under the other numerics (robust to numerics)" if v["robust_to_numerics"] else
                  "the other numerics " + ("is incomplete" if "incomplete" in v["others"] else "does not agree")
                  + " (not shown robust to numerics)")
        head = (f"**Pre-registered verdict: {SENTENCES[v['primary']]} on the held-out score (numerics "
                f"{v['numerics'].upper()}: mean difference {_ci(primary)}, 95% bootstrap interval over "
                f"{len(seeds)} seeds); {robust}.**")
    lines = [head, "", "Contrasts of the primary measure (mean over seeds of the paired difference, [95% bootstrap "
             "interval], reading):", "",
             "| contrast | " + " | ".join(f"numerics {n.upper()} ({len(result['numerics'][n]['seeds'])} seeds)"
                                         for n in names) + " |", "|---|" + "---|" * len(names)]
    for a, b in CONTRASTS:
        key = f"{a} - {b}"
        cells = [("no runs yet" if key not in result["numerics"][n]["contrasts"] else
                  f"{_ci(result['numerics'][n]['contrasts'][key])} "
                  + (result["numerics"][n]["contrasts"][key]["verdict"] if result["numerics"][n]["complete"] else "(interim)"))
                 for n in names]
        lines.append(f"| {labels[a]} − {labels[b]} | " + " | ".join(cells) + " |")
    for n in names:
        r = result["numerics"][n]
        w = r["warm_start"]
        ks = list(w["best_of"])
        head = ["arm", "held-out, final (greedy) [primary]", "training prompts, final", "held-out, all criteria shown",
                "unscaffolded training reward, last 10 steps", "KL, final step", "KL, last 10 steps"]
        head += [f"best-of-{k}" for k in ks]
        lines += ["", f"**Numerics {r['description']}.** Mean ± std over {len(r['seeds'])} seeds"
                  + (" (no run finished yet: the warm start only)." if not r["seeds"] else "."), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                  "| warm start | " + " | ".join([f"{w['heldout_greedy']:.3f}", f"{w['train_prompts_greedy']:.3f}",
                                                  f"{w['heldout_full_scaffold']:.3f}", "", "", ""]
                                                 + [f"{w['best_of'][k]:.3f}" for k in ks]) + " |"]
        for arm, x in r["arms"].items():
            cells = [labels[arm], _fmt(x["heldout_final"]), _fmt(x["train_prompts_final"]), _fmt(x["heldout_full_scaffold"]),
                     _fmt(x["train_reward_unscaffolded_last10"]), _fmt(x["kl_final"]), _fmt(x["kl_last10"])]
            lines.append("| " + " | ".join(cells + [_fmt(x["best_of"][k]) for k in ks]) + " |")
        kinds = list(w["rare_words"])
        lines += ["", "Held-out greedy answers with their kind's rare words (both / at least one) and with another kind's "
                  "rare word, mean fraction over seeds:", "",
                  "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds),
                  "| warm start | " + " | ".join(f"{w['rare_words'][k]['both']:.2f} / {w['rare_words'][k]['any']:.2f} / "
                                                 f"{w['rare_words'][k]['other_kind']:.2f}" for k in kinds) + " |"]
        for arm, x in r["arms"].items():
            lines.append(f"| {labels[arm]} | " + " | ".join(
                " / ".join(f"{np.mean(x['rare_words'][k][m]):.2f}" for m in ("both", "any", "other_kind")) for k in kinds) + " |")
        rates = r["base_rates"]
        lines += ["", f"Warm start: {w['steps']} SFT steps on {w['demonstrations']} demonstrations (loss "
                  f"{w['first_loss']:.2f} -> {w['final_loss']:.2f}); base rates on the held-out prompts "
                  f"({r['base_rate_samples']['unscaffolded']} temperature-1 samples per mode): "
                  + "; ".join(f"{k}: {x['unscaffolded']:.4f} without a scaffold, {x['scaffolded']:.4f} with every criterion shown"
                              for k, x in rates.items()) + "."]
    loads = "; ".join(f"{i['workers']} processes, {i['seconds'] / 60:.1f} min, load average {i['load_before'][0]:.1f} before "
                      f"and {i['load_after'][0]:.1f} at the end" for i in result["invocations"]) or "no invocation recorded"
    lines += ["", f"Seeds {seeds[0]}-{seeds[-1]} pre-registered ({len(seeds)} per arm); {result['steps']} steps per run, "
              f"{result['runs']} runs finished. Wall time {result['wall_minutes']:.1f} min "
              f"({loads}; {result['invocations'][0]['cpu_count'] if result['invocations'] else '?'} CPU cores, shared); "
              f"compute summed over processes {result['compute_minutes']:.1f} min."]
    return "\n".join(lines)


def write_block(block: str, path: pathlib.Path, name: str) -> bool:
    """Put `block` between the `name` results markers of `path`; False when the file or markers are absent."""
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}", encoding="utf-8")
    return True


def block_of(path: pathlib.Path, name: str) -> str:
    """The text between the `name` results markers of `path` (what `write_block` put there)."""
    text = path.read_text(encoding="utf-8")
    return text.split(f"<!-- results:{name}:begin -->\n", 1)[1].split(f"\n<!-- results:{name}:end -->", 1)[0]
