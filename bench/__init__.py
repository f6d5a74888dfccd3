"""Load-test harness: `python -m bench --help`."""
