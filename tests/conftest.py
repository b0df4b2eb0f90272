"""Shared pytest options."""


def pytest_addoption(parser):
    parser.addoption(
        "--rewrite-golden",
        action="store_true",
        default=False,
        help="rewrite the '<' event lines of tests/golden/*.txt from the engine's output",
    )
