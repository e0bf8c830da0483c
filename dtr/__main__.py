"""Command line: `python -m dtr demo`."""
import sys


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo",):
        print("usage: python -m dtr demo [--fraction F] [--steps N] [--policy NAME]", file=sys.stderr)
        return 2
    from .demo import main as demo

    return demo(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
