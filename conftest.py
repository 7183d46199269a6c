# test_infinite_context.py is a top-level script (a long streaming run), not part of the test suite.
collect_ignore = ["test_infinite_context.py", "stress_test_massive.py"]
