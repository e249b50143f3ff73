"""The test suite: a package, so its modules import each other by full name
(``tests.support...``) from the repository root, which pytest's ``pythonpath`` puts
on sys.path."""
