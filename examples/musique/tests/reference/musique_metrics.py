"""Independent Python reference for the official MuSiQue metrics (evaluate_v1.0.py semantics).

Written for flowtune's tests from the behaviour of StonyBrookNLP/musique's evaluator:
SQuAD normalisation with Python's `re`/`str` semantics, answer EM/F1 as a max over
answer + aliases, support F1 over idx sets (both empty -> 1), answer/support averaged over
answerable records, group (Full) metrics keyed by id: a pair scores the answerable twin's
F1 when both predicted sufficiencies equal the gold ones (input order), else 0.
No rounding (the official script rounds to 3 decimals).

Usage: python musique_metrics.py IN.json OUT.json
IN: {"strings": [...], "pairs": [[pred, gold], ...],
     "evaluations": [{"gold": "gold.jsonl", "predictions": "pred.jsonl"}, ...]}
"""
import collections
import json
import re
import string
import sys

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize(text):
    text = text.lower()
    text = "".join(c for c in text if c not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text):
    return normalize(text).split() if text else []


def f1(pred, gold):
    p, g = tokens(pred), tokens(gold)
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def em(pred, gold):
    return float(normalize(pred) == normalize(gold))


def support_f1(pred, gold):
    p, g = set(map(int, pred)), set(map(int, gold))
    if not p and not g:
        return 1.0
    tp = len(p & g)
    precision = tp / len(p) if p else 0.0
    recall = tp / len(g) if g else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def evaluate(gold_path, pred_path):
    golds, preds = read_jsonl(gold_path), read_jsonl(pred_path)
    assert len(golds) == len(preds)
    ans_f1, ans_em, sup_f1, n_ans, suff_right = 0.0, 0.0, 0.0, 0, 0
    groups = {}
    for g, p in zip(golds, preds):
        assert g["id"] == p["id"]
        answers = [g["answer"]] + g["answer_aliases"]
        a_f1 = max(f1(p["predicted_answer"], a) for a in answers)
        a_em = max(em(p["predicted_answer"], a) for a in answers)
        gold_sup = [q["idx"] for q in g["paragraphs"] if q["is_supporting"]]
        s_f1 = support_f1(p["predicted_support_idxs"], gold_sup)
        if g["answerable"]:
            ans_f1 += a_f1
            ans_em += a_em
            sup_f1 += s_f1
            n_ans += 1
        suff_right += int(p["predicted_answerable"] == g["answerable"])
        grp = groups.setdefault(str(g["id"]), {"pred": [], "gold": []})
        grp["pred"].append(p["predicted_answerable"])
        grp["gold"].append(g["answerable"])
        if g["answerable"]:
            grp["scores"] = (a_f1, s_f1)
    out = {
        "answer_f1": ans_f1 / n_ans if n_ans else 0.0,
        "answer_em": ans_em / n_ans if n_ans else 0.0,
        "support_f1": sup_f1 / n_ans if n_ans else 0.0,
    }
    if any(not g["answerable"] for g in golds):
        complete = [grp for grp in groups.values() if len(grp["gold"]) == 2 and "scores" in grp]
        ga = sum(grp["scores"][0] for grp in complete if grp["pred"] == grp["gold"])
        gs = sum(grp["scores"][1] for grp in complete if grp["pred"] == grp["gold"])
        out["sufficiency_accuracy"] = suff_right / len(golds)
        out["group_answer_sufficiency_f1"] = ga / len(complete) if complete else None
        out["group_support_sufficiency_f1"] = gs / len(complete) if complete else None
        out["complete_pairs"] = len(complete)
    return out


def main():
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    result = {
        "normalized": [normalize(s) for s in job.get("strings", [])],
        "f1": [f1(p, g) for p, g in job.get("pairs", [])],
        "em": [em(p, g) for p, g in job.get("pairs", [])],
        "evaluations": [evaluate(e["gold"], e["predictions"]) for e in job.get("evaluations", [])],
    }
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
