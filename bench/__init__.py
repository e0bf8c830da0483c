"""Benchmarks; each module is one command (docs/performance.md lists them)."""
import os


def write_report(path: str, text: str) -> None:
    """Write a benchmark's Markdown report to ``path`` (making its folder) and print it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
