"""``python -m negspace_bench.diagnose`` (``make diagnose``): the mechanism check of issue 21.

Does guidance push the distribution away from the existing instructions, or does it only sharpen
it? For each base instruction, a fixed set of existing instructions X (``instructions.py``) and
each variant (``decode.VARIANTS``: a negative format and a combine, plus a sharpening control),
a few seeded completions are decoded by sampling from the GUIDED distribution, and at every step
the positive's distribution is compared with the guided one (``measures``): entropy, the share of
steps where guidance lowered it, KL, and the mass on X's tokens. Sharpening lowers entropy
everywhere; pushing away should change it only where X would be copied and lower the mass on X.
"""
