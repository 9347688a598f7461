"""reinitd test suite."""
