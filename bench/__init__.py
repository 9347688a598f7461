"""The benchmark program behind `make bench` (`python -m bench --help`); not a test suite."""
