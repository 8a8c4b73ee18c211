#!/usr/bin/env python3
"""Dev-only: the released CapRL Prism scoring on answer/gold pairs, for tests/fixtures/prism_ref/cases.jsonl.

  PYTHONPATH=CAPRL_REPO python3 scripts/prism_reference.py IN.jsonl OUT.jsonl

Needs math-verify 0.8.0 and latex2sympy2_extended 1.10.2 (with the antlr4 runtime, Debian's python3-antlr4) and,
on PYTHONPATH, a checkout of the CapRL repository for openrlhf/models/remote_rm/vqa_eval.py (relaxed_accuracy and
anls). verify_math and verify_chart below restate Eval_CapRL.py's functions (spec/caprl.md section 9.2). IN holds
{"prediction", "answer", "type": "math" | "chart" | "info"} records; OUT gets the same records with
"release_score". The test (tests/unit/test_eval_score.c) compares caprl with these scores; rows where caprl knowingly
differs carry a "known_difference" reason, added by hand.
"""
import json
import re
import sys

import numpy as np
from math_verify import LatexExtractionConfig, parse, verify

BOXED = re.compile(r"</think>\s*<answer>.*?\\boxed{(.*)}.*?</answer>", re.DOTALL)


def math_parse(content):
    return parse(content, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])


def boxed_answer(content):
    found = re.findall(BOXED, content)
    return found[-1] if found else ""


def verify_math(content, sol):
    gold = math_parse(sol)
    if not gold:
        return 1.0
    answer = boxed_answer(content)
    try:
        return max(float(verify(answer, gold)), float(verify(math_parse(f"${answer}$"), gold)))
    except Exception:
        return 0.0


def verify_chart(content, sol, use_anls):
    from openrlhf.models.remote_rm.vqa_eval import process_line
    truth = sol[1:-1]
    try:
        student = math_parse(f"${boxed_answer(content)}$")[-1]
    except Exception:  # the release's bare except
        student = ""
    reward = 0.0
    try:
        value = float(student)
        for scale in (1, 0.01, 100):
            got = process_line({"prediction": str(scale * value), "answer": truth}, "relaxed_accuracy")
            reward = max(reward, np.max(got["match"]))
    except (ValueError, IndexError):
        got = process_line({"prediction": student, "answer": truth}, "relaxed_accuracy")
        reward = np.max(got["match"])
    if not use_anls:
        return float(reward)
    got = process_line({"prediction": student, "answer": truth}, "anls")
    similarity = 1 - np.min(got["match"])
    return max(float(reward), 0.0 if similarity < 0.5 else similarity)


def score(record):
    rule, gold = record["type"], "$" + record["answer"] + "$"
    math = verify_math(record["prediction"], gold)
    if rule in ("chart", "info"):
        return max(verify_chart(record["prediction"], gold, rule == "info"), math)
    return math


def main(src, dst):
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            record = json.loads(line)
            record["release_score"] = score(record)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
