"""negspace command line: `negspace up/down`, `negspace run/runs`, `negspace experiment`."""

__version__ = "0.1.0"
