"""Benchmarks; each module is one command (docs/performance.md lists them)."""
import os


def checkouts(root: str, baseline) -> list:
    """[(label, path)]: the checkout at ``root``, and ``baseline`` (another checkout) when given."""
    trees = [("this checkout", root)]
    if baseline:
        trees.append(("baseline " + os.path.abspath(baseline), os.path.abspath(baseline)))
    return trees


def require_tools(command: str, *tools: str, install: str = "apt install valgrind") -> None:
    """Exit with what to install when one of ``tools`` is not on PATH."""
    import shutil

    if any(shutil.which(t) is None for t in tools):
        raise SystemExit(f"{command} needs {' and '.join(tools)} on PATH ({install})")


def write_report(path: str, text: str) -> None:
    """Write a benchmark's Markdown report to ``path`` (making its folder) and print it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
