"""``negspace study``: does the guidance diversify more than plain sampling, at equal quality?

A study is a grid of base instructions x seeds x arms (named run configurations, ``arms.py``),
run through the orchestrator (``runner.py``, resumable), measured with an evaluation embedder
that is not the controller's (``measures.py``), compared with paired bootstrap statistics against
the plain-sampling temperature curve (``stats.py``), and written up with plots (``analyze.py``,
``plots.py``).
"""
