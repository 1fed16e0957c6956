"""The `curate` command line: thin over the pipeline runner, the stages and the report."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from curate.config import ConfigError

log = logging.getLogger("curate")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "bokeh", "tornado", "PIL", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_synth(a: argparse.Namespace) -> int:
    from curate.synth import synthesize

    paths = synthesize(a.out, samples=a.samples, shards=a.shards, seed=a.seed)
    print(f"wrote {len(paths)} shard(s) and ground_truth.parquet to {a.out}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from curate.config import load_pipeline, load_run_config
    from curate.io.shards import InputError
    from curate.pipeline import run_pipeline
    from curate.stats import format_funnel, funnel

    pipe = load_pipeline(a.pipeline)
    overrides = {"workdir": a.workdir, "input": a.input}
    cfg = load_run_config(a.config, overrides)
    if cfg.input is None:
        raise ConfigError(f"{a.config or '<command line>'}: input: no input shards (set `input` or pass --input)")
    try:
        summary = run_pipeline(pipe, cfg, only=a.stages.split(",") if a.stages else None)
    except InputError as e:
        raise ConfigError(str(e)) from None
    print(format_funnel(funnel(summary.workdir)))
    if not summary.ok:
        print("\nrun finished with problems:", file=sys.stderr)
        for p in summary.problems():
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"\nrun {summary.run_id} complete; work dir {summary.workdir}")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    from curate.stats import format_funnel, funnel

    if not Path(a.workdir).is_dir():
        raise ConfigError(f"{a.workdir}: work dir not found")
    rows = funnel(a.workdir)
    print(json.dumps(rows, indent=2) if a.json else format_funnel(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="Curate web-scale image-text pairs.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write a synthetic pool with injected defects and ground truth")
    s.add_argument("--out", required=True)
    s.add_argument("--samples", type=int, default=5000)
    s.add_argument("--shards", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)

    r = sub.add_parser("run", help="run a pipeline (YAML) with a run config")
    r.add_argument("pipeline")
    r.add_argument("--config", default=None)
    r.add_argument("--input", default=None, help="path, glob, brace pattern or list file of shards")
    r.add_argument("--workdir", default=None)
    r.add_argument("--stages", default=None, help="comma-separated stage ids to run (others skipped)")
    r.set_defaults(fn=cmd_run)

    st = sub.add_parser("stats", help="print the funnel read back from the stats Parquet")
    st.add_argument("workdir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
