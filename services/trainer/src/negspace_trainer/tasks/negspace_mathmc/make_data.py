"""Write this task's data: one-step math word problems, 4 numeric choices, the answer computed.

Deterministic (``random.Random(SEED)``): running it again rewrites identical files, and
``--check`` verifies the committed ones (every answer recomputed from the numbers the item
carries, exactly one correct choice, four distinct choices). ``python make_data.py`` from
anywhere writes ``test.jsonl`` (160 items) and ``fewshot.jsonl`` (8 items) beside this file.

Each item keeps its operands and operation (``a``, ``b``, ``op``) so the check is by code, not
by trust. The choices are "<number> <things>" (see ``item``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 13
N_TEST = 160
N_FEWSHOT = 8
HERE = Path(__file__).resolve().parent

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jonas", "Kemi", "Liam",
         "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vera", "Wei", "Yusuf"]
THINGS = ["apples", "marbles", "stickers", "pencils", "books", "cookies", "coins", "shells", "cards", "stamps"]

# (operation, template); {n} a name, {t} the things, {a} and {b} the operands
TEMPLATES = {
    "+": ["{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
          "A box holds {a} {t}. {n} puts in {b} more. How many {t} are in the box?",
          "{n} collected {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {n} collect in all?"],
    "-": ["{n} has {a} {t} and gives away {b}. How many {t} does {n} have left?",
          "There are {a} {t} on a table. {n} takes {b} of them. How many {t} are still on the table?",
          "{n} had {a} {t} and lost {b}. How many {t} does {n} have now?"],
    "*": ["{n} has {a} bags with {b} {t} in each bag. How many {t} does {n} have in total?",
          "Each of {a} children gets {b} {t}. How many {t} are given out?",
          "{n} buys {a} packs of {t}, each pack holding {b}. How many {t} does {n} buy?"],
    "/": ["{n} shares {a} {t} equally among {b} friends. How many {t} does each friend get?",
          "{a} {t} are packed into {b} equal boxes. How many {t} are in each box?",
          "{n} puts {a} {t} into {b} equal rows. How many {t} are in each row?"],
}
OTHER_OP = {"+": "-", "-": "+", "*": "+", "/": "-"}


def compute(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if a % b:
            raise ValueError(f"{a} / {b} is not a whole number")
        return a // b
    raise ValueError(f"unknown operation {op!r}")


def operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "+":
        return rng.randint(2, 40), rng.randint(2, 30)
    if op == "-":
        b = rng.randint(2, 25)
        return b + rng.randint(3, 40), b
    if op == "*":
        return rng.randint(2, 9), rng.randint(2, 9)
    b = rng.randint(2, 9)
    return b * rng.randint(2, 9), b


def distractors(rng: random.Random, op: str, a: int, b: int, answer: int) -> list[int]:
    """Two wrong numbers: the wrong-operation result (the typical mistake) and a near miss."""
    wrong_op = compute(OTHER_OP[op], a, b)
    near = [answer + d for d in (-3, -2, -1, 1, 2, 3, -10, 10) if answer + d >= 0 and answer + d not in (answer, wrong_op)]
    if wrong_op == answer or wrong_op < 0:
        wrong_op = near.pop(rng.randrange(len(near)))
    return [wrong_op, rng.choice(near)]


def item(rng: random.Random) -> dict:
    """Four choices "<number> <things>": the answer, the wrong-operation result with the right
    things, the answer's number with other things, and a near miss with other things. Knowing
    what is counted alone gives 50%, computing alone 50%; both are needed for 100%."""
    op = rng.choice("+-*/")
    a, b = operands(rng, op)
    answer = compute(op, a, b)
    things = rng.choice(THINGS)
    other = rng.choice([t for t in THINGS if t != things])
    question = rng.choice(TEMPLATES[op]).format(n=rng.choice(NAMES), t=things, a=a, b=b)
    wrong_op, near = distractors(rng, op, a, b, answer)
    correct = f"{answer} {things}"
    choices = [correct, f"{wrong_op} {things}", f"{answer} {other}", f"{near} {other}"]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "label": choices.index(correct),
            "answer": str(answer), "things": things, "a": a, "b": b, "op": op}


def generate() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < N_TEST + N_FEWSHOT:
        r = item(rng)
        if r["question"] not in seen:
            seen.add(r["question"])
            rows.append(r)
    return rows[:N_TEST], rows[N_TEST:]


def check(rows: list[dict]) -> None:
    for i, r in enumerate(rows):
        answer = compute(r["op"], r["a"], r["b"])
        if r["choices"][r["label"]] != f"{answer} {r['things']}" or r["answer"] != str(answer):
            raise AssertionError(f"item {i}: the marked choice is not {r['a']} {r['op']} {r['b']} = {answer}")
        if len(r["choices"]) != 4 or len(set(r["choices"])) != 4:
            raise AssertionError(f"item {i}: needs 4 distinct choices, has {r['choices']}")
        if sum(c.split()[0] == str(answer) and c.split()[1] == r["things"] for c in r["choices"]) != 1:
            raise AssertionError(f"item {i}: more than one correct choice")
        if f" {r['things']}" not in r["question"]:
            raise AssertionError(f"item {i}: the question does not say what is counted")


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="verify the committed files instead of writing them")
    args = p.parse_args(argv)
    test, fewshot = generate()
    check(test + fewshot)
    if args.check:
        committed = (_read(HERE / "test.jsonl"), _read(HERE / "fewshot.jsonl"))
        check(committed[0] + committed[1])
        if committed != (test, fewshot):
            print("the committed files differ from what make_data.py generates", file=sys.stderr)
            return 1
        print(f"ok: {len(test)} test + {len(fewshot)} few-shot items, answers verified")
        return 0
    _write(HERE / "test.jsonl", test)
    _write(HERE / "fewshot.jsonl", fewshot)
    print(f"wrote {len(test)} test + {len(fewshot)} few-shot items to {HERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
