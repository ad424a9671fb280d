"""What each method does to the sandbox model, judged by the sandbox judge (and the refusal judge
beside it), calling the core functions directly (no Ray, no store).

On the held-out harmful prompts (first `--prompts` of each group), the published defaults for every method
except F-SOUR's and RoSais's answer length (`--max-new-tokens`, as the quickstart; the sandbox's
answers end well before it). The functions take the methods' params, so tests run them small.
- F-SOUR: per prompt, the unattacked answer, then restarts until jailbroken (restart 0, then 1..R-1 for
  those it left, as the plan runs them); ASR of the reported restart against the unattacked ASR, and the
  share of searches that reached the threshold.
- RoSais: scores on every layer, layer ranking, ASR(L) for L = 0..L_max.
- SAFEx: decode counts of Regular and Jailbreak, bootstrap, HRCG; refusal of Regular before,
  after disabling HRCG, and after disabling as many random experts in the same layers (mean over
  `--random-draws` draws).

    PYTHONPATH=. python benchmarks/sandbox_effects.py [--prompts 64] [--methods fsour,rosais,safex]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from statistics import fmean

from core.datasets import load_prompts
from core.chat import JudgePanel
from core.fsour import FsourParams, fsour_answers, fsour_precheck, search_row, select_restart
from core.judges import RefusalJudge, SandboxJudge
from core.models import load_model
from core.rosais import RosaisParams, rank_layers, rosais_attack, rosais_scores
from core.safex import (SafexParams, bootstrap_selection, expert_sets, random_controls, safex_counts,
                        safex_validation, stack_counts)
from core.sandbox import build_sandbox


def panel() -> JudgePanel:
    """The sandbox judge decides; the refusal judge grades the same answers beside it."""
    return JudgePanel({"sandbox": SandboxJudge(), "refusal": RefusalJudge()})


def share(flags) -> float:
    decided = [flag for flag in flags if flag is not None]
    return fmean(decided) if decided else math.nan


def refusal_judge_says(generation: dict) -> bool | None:
    return generation["verdicts"][1].jailbroken


def fsour_effect(lm, prompts, judge: JudgePanel, params: FsourParams) -> dict:
    """F-SOUR as its plan runs it: the unattacked answers, restart 0 for the prompts they leave unjailbroken,
    restarts 1..R-1 for those restart 0 leaves; each round's answers in one batch."""
    prechecks, precheck_gens = fsour_precheck(lm, prompts, judge, params)
    rows = {item.id: [row] for item, row in zip(prompts, prechecks)}
    gens = {item.id: [gen] for item, gen in zip(prompts, precheck_gens)}
    todo = [item for item, row in zip(prompts, prechecks) if not row["jailbroken"]]
    for round_, restarts in enumerate(((0,), range(1, params.restarts))):
        if round_:
            todo = [item for item in todo if not rows[item.id][1]["jailbroken"]]
        pairs = [(item, search_row(lm, item, restart, params)) for item in todo for restart in restarts]
        if not pairs:
            continue
        answered, answered_gens = fsour_answers(lm, [item for item, _ in pairs], [s for _, s in pairs], judge, params)
        for (item, _), row, gen in zip(pairs, answered, answered_gens):
            rows[item.id].append(row)
            gens[item.id].append(gen)
    unattacked, attacked, by_refusal_judge, converged, restarts = [], [], [], [], []
    for item in prompts:
        tried = rows[item.id]
        chosen = select_restart(tried)
        unattacked.append(tried[0]["jailbroken"])
        attacked.append(tried[chosen]["jailbroken"])
        by_refusal_judge.append(refusal_judge_says(gens[item.id][chosen]))
        if tried[chosen]["restart"] >= 0:
            converged.append(tried[chosen]["joint_logprob"] >= math.log(params.threshold))
            restarts.append(tried[chosen]["restart"])
    return {"asr": share(attacked), "asr_baseline": share(unattacked), "converged": share(converged),
            "searched": len(converged), "restart_histogram": {r: restarts.count(r) for r in sorted(set(restarts))},
            "asr_refusal_judge": share(by_refusal_judge)}


def rosais_effect(lm, prompts, judge: JudgePanel, params: RosaisParams) -> dict:
    scores = rosais_scores(lm, prompts, params=params)
    ranking = rank_layers(scores)
    attack_rows, gens = rosais_attack(lm, prompts, ranking, scores, judge=judge, params=params)
    Ls = sorted({row["L"] for row in attack_rows})
    asr = {L: share(row["jailbroken"] for row in attack_rows if row["L"] == L) for L in Ls}
    asr_refusal = {L: share(refusal_judge_says(gen) for row, gen in zip(attack_rows, gens) if row["L"] == L)
                   for L in Ls}
    best_L = max(asr, key=lambda L: (asr[L], -L))
    return {"ranking": ranking, "asr_by_L": asr, "best_L": best_L, "gain": asr[best_L] - asr[0],
            "asr_by_L_refusal_judge": asr_refusal}


def safex_effect(lm, regular, jailbreak, judge: JudgePanel, params: SafexParams, draws: int) -> dict:
    selected = {}
    for group, prompts in (("regular", regular), ("jailbreak", jailbreak)):
        counts, tokens = stack_counts(safex_counts(lm, prompts, group, params))
        selected[group] = bootstrap_selection(counts, tokens, params.rounds, params.alpha,
                                              params.per_layer, params.seed)
    sets = expert_sets(selected["regular"], selected["jailbreak"], params.rounds, params.pi)
    hrcg = sets["HRCG"]

    def refusal(disabled, condition, group="regular", prompts=regular) -> tuple[float, float]:
        """Refusal rate by the deciding judge and by the refusal judge."""
        rows, gens = safex_validation(lm, prompts, group, disabled, condition, judge, params)
        return (share(row["refused"] for row in rows),
                1.0 - share(refusal_judge_says(gen) for gen in gens))

    controls = random_controls(hrcg, lm.control.num_experts, params.seed, draws)
    before, after = refusal({}, "before"), refusal(hrcg, "after")
    random_after = [refusal(control, condition) for condition, control in controls.items()]
    return {"expert_sets": {name: {str(l): e for l, e in members.items()} for name, members in sets.items()},
            "refusal_before": before[0], "refusal_after": after[0],
            "refusal_after_random": fmean(r[0] for r in random_after),
            "refusal_after_random_draws": [r[0] for r in random_after],
            "random_controls": [{str(l): e for l, e in c.items()} for c in controls.values()],
            "refusal_judge": {"before": before[1], "after": after[1],
                              "after_random": fmean(r[1] for r in random_after)},
            "jailbreak_refusal_before": refusal({}, "before", "jailbreak", jailbreak)[0],
            "jailbreak_refusal_after": refusal(hrcg, "after", "jailbreak", jailbreak)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=None, help="first N prompts of each group (default all)")
    parser.add_argument("--methods", default="fsour,rosais,safex")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--model", default=None, help="sandbox model directory (default: build/reuse the cached one)")
    args = parser.parse_args()
    model_dir = args.model or str(build_sandbox())
    lm = load_model(model_dir)
    regular = load_prompts("sandbox", split="regular", limit=args.prompts)
    jailbreak = load_prompts("sandbox", split="jailbreak", limit=args.prompts)
    judge = panel()
    report = {"model_dir": model_dir, "judges": list(judge.judges), "n_prompts": len(regular),
              "max_new_tokens": args.max_new_tokens}
    for method in args.methods.split(","):
        started = time.perf_counter()
        if method == "fsour":
            report[method] = fsour_effect(lm, regular, judge, FsourParams(max_new_tokens=args.max_new_tokens))
        elif method == "rosais":
            report[method] = rosais_effect(lm, regular, judge, RosaisParams(max_new_tokens=args.max_new_tokens))
        elif method == "safex":
            # SAFEx's own default answer length (128) is kept: its counts are of the answer's tokens
            report[method] = safex_effect(lm, regular, jailbreak, judge, SafexParams(), args.random_draws)
        else:
            parser.error(f"--methods: unknown method {method!r} (fsour, rosais, safex)")
        report[method]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
