"""`negspace study`: a grid of base instructions x seeds x arms (run configurations), measured and compared.

measures.py turns each (case, arm) set of generated instructions into plain-float measures
(diversity and quality), stats.py compares arms with paired bootstraps over cases and against the
plain-sampling diversity-vs-quality curve, plots.py draws the figures, eval_models.py prepares the
evaluation embedder.
"""
