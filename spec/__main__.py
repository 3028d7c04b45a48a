"""``python -m spec``: print the conventions table and a worked example.

``python -m spec --write-vectors DIR`` regenerates the golden vectors into DIR;
``python -m spec --check-vectors [DIR]`` re-checks them (default: the shipped spec/vectors/).
Exit status: 0 success, 1 a vector differs from the spec, 2 bad input (a one-line message
on stderr, no traceback: a missing or unwritable DIR, an unreadable manifest or vector).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import spec


def conventions_markdown() -> str:
    """The §5 conventions as a Markdown table, for the terminal (spec/vectors.py writes them as JSON)."""
    rows = [
        "| convention | momentum weights | default momentum | default eps | running variance |",
        "|---|---|---|---|---|",
    ]
    for c in spec.list_conventions():
        rows.append(
            f"| {c.name} | {c.momentum_weights} value | {c.default_momentum} | {c.default_eps:g} "
            f"| {c.running_variance} |"
        )
    return "\n".join(rows)


def worked_example() -> str:
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 60.0]])  # (N=4, C=2)
    y, mean, var = spec.batch_norm_train(x, np.ones(2), np.zeros(2), axis=1, eps=1e-5)
    lines = [
        f"x (N=4, C=2) = {x.tolist()}",
        f"batch mean = {mean.tolist()}, biased var = {var.tolist()}",
        f"y = {np.round(y, 6).tolist()}",
        "one update from running (0, 1), each convention at its default:",
    ]
    for c in spec.list_conventions():
        m, v = spec.update_running_stats(
            np.zeros(2), np.ones(2), mean, var, 4, convention=c.name, num_batches_tracked=0
        )
        lines.append(f"  {c.name:6s} mean={np.round(m, 6).tolist()} var={np.round(v, 6).tolist()}")
    return "\n".join(lines)


EXIT_USAGE = 2  # argparse's own status for bad arguments; file problems share it


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block), exit status 2 as argparse's."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = _OneLineParser(prog="python -m spec", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write-vectors", metavar="DIR", help="write the golden vectors and manifest into DIR")
    group.add_argument(
        "--check-vectors",
        metavar="DIR",
        nargs="?",
        const="",
        help="re-check golden vectors against the spec (default: the shipped spec/vectors/)",
    )
    args = parser.parse_args(argv)
    if args.write_vectors is None and args.check_vectors is None:
        print(conventions_markdown())
        print()
        print(worked_example())
        return 0
    from spec.vectors import VECTOR_DIR, check_vectors, write_vectors

    directory = args.write_vectors if args.write_vectors is not None else args.check_vectors or VECTOR_DIR
    try:
        if args.write_vectors is not None:
            paths = write_vectors(directory)
            print(f"wrote {len(paths)} files to {directory}")
            return 0
        problems = check_vectors(directory)
    # What a user's DIR can cause (missing, unwritable, not JSON, wrong layout); a bug elsewhere keeps its traceback.
    except (OSError, ValueError, KeyError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        print(f"python -m spec: error: {directory}: {what}", file=sys.stderr)
        return EXIT_USAGE
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{directory}: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'all vectors pass'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
