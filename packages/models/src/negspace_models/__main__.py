"""``python -m negspace_models prepare`` / ``resolve MODEL``."""

from negspace_models.bundled import main

if __name__ == "__main__":
    raise SystemExit(main())
