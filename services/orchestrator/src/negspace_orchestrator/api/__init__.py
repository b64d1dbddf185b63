"""Thin routers, one module per resource (each a ``router``): parse, call ``Orchestrator``
(``serving.py``), return the contracts' models; ``app.py`` includes them."""
