"""``python -m negspace_models prepare [NAME]`` / ``resolve MODEL`` / ``list``."""

from negspace_models.resolve import main

if __name__ == "__main__":
    raise SystemExit(main())
