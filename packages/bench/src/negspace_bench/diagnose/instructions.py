"""The fixed existing instructions X of the mechanism check, per base instruction.

Realistic augmentations of each tuning base (``negspace_cli.study.spec.DEFAULT_BASES``, split
"tune"), the kind a capable model writes again and again (issue 21: a 1.5B model's plain samples
per base were near-copies of such templates). They stand in for the controller's dense-region
instructions, so the check needs no run and gives the same prompts every time. A base without an
entry here needs ``--existing`` (a JSON file ``{base: [X, ...]}``).
"""

from __future__ import annotations

EXISTING: dict[str, list[str]] = {
    "Write a math problem.": [
        "Write a word problem about two trains that leave stations 300 km apart at different speeds, "
        "and ask when they meet.",
        "Write a probability problem about drawing colored marbles from a bag without replacement.",
        "Write an algebra problem that asks students to solve a system of two linear equations with "
        "integer solutions.",
        "Write a geometry problem asking for the area of a trapezoid whose parallel sides are 8 cm and 14 cm.",
    ],
    "Write a poem.": [
        "Write a haiku about autumn leaves falling in a quiet forest.",
        "Write a sonnet about the ocean at night, using the rhyme scheme ABAB CDCD EFEF GG.",
        "Write a free-verse poem about a grandmother's kitchen, rich in the smells and sounds of cooking.",
        "Write a limerick about a cat who wants to become a famous chef.",
    ],
    "Write a Python programming task.": [
        "Write a Python function that checks whether a string is a palindrome, ignoring spaces and punctuation.",
        "Write a Python program that reads a CSV file of sales records and prints the total revenue per month.",
        "Write a Python class for a bank account with deposit, withdraw and balance methods that raises an "
        "error on overdraft.",
        "Write a Python script that fetches the current weather for a city from a public API and prints it.",
    ],
}
