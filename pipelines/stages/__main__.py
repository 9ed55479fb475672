"""``python -m pipelines.stages STAGE [CONFIG] [flags]``: the DAG up to and including one stage.

The same as ``k2pipe run [CONFIG] --until STAGE [flags]`` (earlier stages are reused when complete); the
flags are those of ``k2pipe run``, and ``--debug``/``--verbose``. The DAG (``pipelines.dag``) is the only
place that chains stages.
"""

from __future__ import annotations

import sys

from pipelines.dag import STAGES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m pipelines.stages {{{','.join(STAGES)}}} [CONFIG] [k2pipe run flags]\n"
              f"error: the first argument names the last stage to run: one of {', '.join(STAGES)}",
              file=sys.stderr)
        return 2
    from ray_jobs.cli import main as k2pipe

    global_flags = [a for a in argv[1:] if a in ("--debug", "--verbose")]
    rest = [a for a in argv[1:] if a not in global_flags]
    return k2pipe([*global_flags, "run", "--until", argv[0], *rest])


if __name__ == "__main__":
    sys.exit(main())
