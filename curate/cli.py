"""The `curate` command line: thin over the pipeline runner, the stages and the report."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

from curate.core.errors import ConfigError, RefusedOutput, WorkDirError
from curate.core.logs import setup_logging

INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C

log = logging.getLogger("curate")


_STORAGE_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "adlfs", "azure")


def storage_failure(e: BaseException) -> str | None:
    """One line for an object store that cannot be reached or refuses us (no credentials, no
    endpoint, a host that does not resolve), or None for any other error."""
    if type(e).__module__.split(".")[0] not in _STORAGE_LIBRARIES:
        return None
    return (f"object storage cannot be reached: {type(e).__name__}: {str(e)[:200]}. Credentials come from the "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS...); an endpoint "
            "other than the provider's (MinIO, a local server) from the run config: pass --config with its "
            "storage_options, e.g. {s3: {endpoint_url: http://host:9000}}")


def _quiet_shutdown() -> None:
    """After an interrupt the user has been told what happened: a Dask cluster interrupted while it
    starts would print tracebacks from its exit handlers and unfinished tasks. They still run, silently."""
    logging.disable(logging.CRITICAL)
    sys.stderr.flush()
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (open until the process exits)


def cmd_synth(a: argparse.Namespace) -> int:
    from curate.tools.synth import synthesize

    from curate.tools.synth import DEFAULT_FRACTIONS, DEFECTS

    fractions = {} if a.clean else dict(DEFAULT_FRACTIONS)
    for item in a.defect or []:
        name, _, share = item.partition("=")
        try:
            fractions[name] = float(share)
        except ValueError:
            print(f"--defect {item!r}: expected NAME=FRACTION, e.g. text_caption=0.1 "
                  f"(defects: {', '.join(DEFECTS)})", file=sys.stderr)
            return 2
    try:
        paths = synthesize(a.out, samples=a.samples, shards=a.shards, seed=a.seed, fractions=fractions)
    except ValueError as e:  # unknown defect, fractions over 1
        print(f"curate synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} shard(s) and ground_truth.parquet to {a.out}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from curate.core.config import load_run_config
    from curate.runner.registry import load_pipeline
    from curate.io.shards import InputError
    from curate.runner.pipeline import run_pipeline
    from curate.report.stats import format_funnel, format_globals, funnel, global_summaries, stale_stages

    pipe = load_pipeline(a.pipeline)
    overrides = {"workdir": a.workdir, "input": a.input}
    cfg = load_run_config(a.config, overrides)
    if cfg.input is None:
        raise ConfigError(f"{a.config or '<command line>'}: input: no input shards (set `input` or pass --input)")
    if a.until:
        pipe = pipeline_until(pipe, a.until, a.pipeline)
    try:
        summary = run_pipeline(pipe, cfg, only=a.stages.split(",") if a.stages else None)
    except InputError as e:
        raise ConfigError(str(e)) from None
    rows = funnel(summary.workdir, summary.run_id)
    print(format_funnel(rows, stale_stages(summary.workdir, summary.run_id)))
    if summary.ok and rows and rows[0]["n_in"] == 0:
        print(f"error: the input holds no sample ({rows[0]['shards_total']} shard(s) read, every one empty): "
              "check --input (an ingest that downloaded nothing leaves empty shards)", file=sys.stderr)
        return 2
    glob = global_summaries(summary.workdir, summary.run_id)
    if glob:
        print("\n" + format_globals(glob, summary.workdir, summary.run_id))
    if not summary.ok:
        print("\nrun finished with problems:", file=sys.stderr)
        for p in summary.problems():
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"\nrun {summary.run_id} complete; work dir {summary.workdir}")
    return 0


def pipeline_until(pipe, stage: str, source: str):
    """The pipeline cut after ``stage``: its id, or else the first stage of that kind. The kept
    stages keep the parameters they resolve to in the whole pipeline (e.g. the image measures that
    a later dedup reads), so the cut run's tables are the ones the whole run would reuse."""
    from curate.runner.registry import build_stages, spec_of

    stages = build_stages(pipe, source)
    pos = next((i for i, st in enumerate(stages) if st.stage_id == stage), None)
    if pos is None:
        pos = next((i for i, st in enumerate(stages) if st.name == stage), None)
    if pos is None:
        raise ConfigError(f"{source}: no stage {stage!r} in pipeline {pipe.name} "
                          f"(stages: {', '.join(st.stage_id for st in stages)}); choose another PIPELINE")
    specs = [spec_of(st) for st in stages[:pos + 1]]
    return pipe.model_copy(update={"stages": specs})


def cmd_train(a: argparse.Namespace) -> int:
    from curate.tools.training import TrainSpec, train_clip

    spec = TrainSpec(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                     device=a.device)
    print(train_clip(a.input, a.out, spec, name=a.name))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from curate.tools.evaluation import evaluate_clip

    res = evaluate_clip(a.model, a.checkpoint, a.eval_dir, max_samples=a.max_samples)
    text = json.dumps(res, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


def _executor_for(config: str | None):
    from curate.core.config import load_run_config
    from curate.engine import make_executor

    return make_executor(load_run_config(config))


def _storage_from(config: str | None) -> None:
    """Storage options (an S3 endpoint...) of a run config, for commands that read a work dir on
    object storage; credentials come from the environment as for `curate run`."""
    from curate.core.config import load_run_config
    from curate.io.storage import set_storage_options

    if config:
        set_storage_options(load_run_config(config).storage_options)


def cmd_export(a: argparse.Namespace) -> int:
    from curate.report.decisions import run_record
    from curate.report.export import ExportSpec, check_output, check_url_output, export, run_storage_options
    from curate.io.storage import is_url, set_storage_options

    _storage_from(a.config)
    run = run_record(a.workdir, a.run)  # a clear error for a folder that is not a work dir
    if is_url(a.out):  # before any worker starts
        set_storage_options(run_storage_options(a.workdir, run["run_id"]))
        check_url_output(a.out, run["shards"], a.overwrite)
    else:
        check_output(Path(a.out).resolve(), a.workdir, run["shards"], a.overwrite)
    spec = ExportSpec(shard_size=a.shard_size, shuffle_seed=a.shuffle_seed, write_pool=not a.no_pool,
                      hf_parquet=a.hf_parquet, overwrite=a.overwrite, run_id=a.run, schema=a.schema,
                      blur_faces=a.blur_faces, redact_pii=a.redact_pii, caption=a.caption)
    with _executor_for(a.config) as ex:
        m = export(a.workdir, a.out, ex, spec)
    print(f"exported {m['samples_kept']} of {m['samples_in']} samples into {m['output_shards']} shard(s) "
          f"under {a.out} (metadata/, shards/, uids.npy, manifest.json)")
    if not m["samples_kept"]:
        print("every sample was dropped: outputs are valid and empty", file=sys.stderr)
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from curate.report.decisions import run_record
    from curate.report.html import write_comparison, write_report

    _storage_from(a.config)
    for w in a.workdir:  # before anything is written: a clear error for a folder that is not a work dir
        run_record(w)
    out = Path(a.out) if a.out else None
    if len(a.workdir) == 2:
        print(write_comparison(*a.workdir, out=out))
        return 0
    if len(a.workdir) > 2:
        raise ConfigError("report takes one work dir, or two to compare")
    print(write_report(a.workdir[0], out=out))
    return 0


def cmd_ingest(a: argparse.Namespace) -> int:
    from curate.tools.ingest import IngestSpec, ingest_folder, ingest_survivors, ingest_urls

    if a.from_work:
        if a.source:
            raise ConfigError("give a source or --from WORK, not both")
        from curate.io.storage import work_path

        _storage_from(a.config)
        if not (work_path(a.from_work) / "index").is_dir():
            raise ConfigError(f"--from {a.from_work}: not a work dir (no index/ folder)")
        r = ingest_survivors(a.from_work, a.out, IngestSpec(processes=a.processes, threads=a.threads,
                                                             samples_per_shard=a.samples_per_shard, timeout=a.timeout))
        print(f"downloaded {r['img2dataset'].get('successes', 0)} of the {r['kept_by_metadata_run']} samples the "
              f"metadata run kept ({r['dropped_before_download']} of {r['pool']} dropped before download: about "
              f"{r['bytes_not_downloaded_estimate'] / 1e6:.1f} MB not fetched); uids kept in each sample's json. "
              f"Next: curate run PIPELINE --input '{a.out}/*.tar' --workdir ANOTHER_WORK")
        return 0
    if not a.source:
        raise ConfigError("ingest needs a source (URL list or image folder) or --from WORK")
    src = Path(a.source)
    if not src.exists():
        raise ConfigError(f"{a.source}: not found")
    if src.is_dir():
        n = ingest_folder(src, a.out, a.samples_per_shard)
        print(f"wrote {n} samples from {src} into shards under {a.out}")
        return 0
    fmt = a.input_format or {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}.get(src.suffix, "txt")
    spec = IngestSpec(input_format=fmt, url_col=a.url_col, caption_col=a.caption_col, processes=a.processes,
                      threads=a.threads, samples_per_shard=a.samples_per_shard, timeout=a.timeout)
    totals = ingest_urls(src, a.out, spec)
    print(f"img2dataset: {totals} (per-shard status and error_message in {a.out}/*.parquet)")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    from curate.report.stats import format_funnel, format_globals, funnel, global_summaries, stale_stages

    _storage_from(a.config)
    rows = funnel(a.workdir, a.run)
    glob = global_summaries(a.workdir, a.run)
    stale = stale_stages(a.workdir, a.run)
    if a.json:
        print(json.dumps({"funnel": rows, "global": glob, "stale": stale}, indent=2))
    else:
        print(format_funnel(rows, stale))
        if glob:
            print("\n" + format_globals(glob, a.workdir, a.run))
    return 0


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Columns as wide as their longest cell, two spaces apart; the last column (a description)
    wrapped to the terminal's width under itself."""
    import shutil
    import textwrap

    widths = [max(len(h), *(len(r[i]) for r in rows)) + 2 for i, h in enumerate(header[:-1])]
    indent = sum(widths)
    room = max(30, shutil.get_terminal_size((100, 24)).columns - indent)
    lines = []
    for row in [header, *rows]:
        head = "".join(v.ljust(w) for v, w in zip(row, widths))
        text = textwrap.wrap(row[-1], room) or [""]
        lines.append(head + text[0])
        lines += [" " * indent + t for t in text[1:]]
    return "\n".join(lines)


def cmd_stages(a: argparse.Namespace) -> int:
    import shutil

    from curate.runner.registry import available_stages, describe_stage

    if not a.name:
        rows = [(n, d["kind"], d["summary"]) for n in available_stages() for d in [describe_stage(n)]]
        print(_table(rows, ("stage", "kind", "what it does")))
        print("\n`curate stages NAME` lists a stage's parameters.")
        return 0
    d = describe_stage(a.name)
    import textwrap

    print(textwrap.fill(f"{d['name']} ({d['kind']} stage{', filter' if d['filters'] else ''}): {d['summary']}",
                        shutil.get_terminal_size((100, 24)).columns) + "\n")
    rows = []
    for r in d["params"]:
        kind, text = r["type"], r["description"]
        if len(kind) > 24:  # a long Literal: named in full under the description, not as a column
            kind, text = kind[:21] + "...", f"{text} (type: {kind})"
        default = json.dumps(r["default"])
        rows.append((r["name"], kind, default if len(default) <= 24 else default[:21] + "...", text))
    print(_table(rows, ("parameter", "type", "default", "description")))
    return 0


def cmd_models_fetch(a: argparse.Namespace) -> int:
    from curate.models.weights import fetch_weights

    _storage_from(a.config)
    try:
        path = fetch_weights(a.model, a.pretrained, a.to)
    except (LookupError, ConnectionError) as e:
        raise ConfigError(str(e)) from None
    print(f"{a.model} {a.pretrained}: {path}\nrun with model_cache: {a.to}")
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default."""


def _common() -> argparse.ArgumentParser:
    """-v / -q, accepted before or after the subcommand."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging and full tracebacks")
    c.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    return c


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    common = _common()
    p = argparse.ArgumentParser(prog="curate", description="Curate web-scale image-text pairs.",
                                parents=[common], formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"curate {version('curate')}")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, parents=[common], formatter_class=_Help)

    sg = add("stages", help="list the stages, or one stage's parameters with types and defaults")
    sg.add_argument("name", nargs="?", default=None, help="a stage kind: list its parameters")
    sg.set_defaults(fn=cmd_stages)

    mo = add("models", help="stage model weights for machines without internet")
    mo_sub = mo.add_subparsers(dest="models_cmd", required=True)
    mf = mo_sub.add_parser("fetch", help="download an open_clip model's weights into a model cache",
                           parents=[common], formatter_class=_Help)
    mf.add_argument("model", help="open_clip model name, e.g. ViT-L-14")
    mf.add_argument("pretrained", help="open_clip pretrained tag, e.g. openai")
    mf.add_argument("--to", required=True, help="the model cache: a folder, or a URL (s3://bucket/models) that "
                                                "workers copy from (set model_cache to it in the run config)")
    mf.add_argument("--config", default=None, help="run config whose storage_options reach a URL cache")
    mf.set_defaults(fn=cmd_models_fetch)

    s = add("synth", help="write a synthetic pool with injected defects and ground truth")
    s.add_argument("--out", required=True, help="folder for the shards and ground_truth.parquet")
    s.add_argument("--samples", type=int, default=5000, help="image-text pairs in the pool")
    s.add_argument("--shards", type=int, default=10, help="tar shards to split them into")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes on every machine")
    s.add_argument("--clean", action="store_true", help="no injected defects (training / held-out sets)")
    s.add_argument("--defect", action="append", metavar="NAME=FRACTION",
                   help="set one defect's share (repeatable), e.g. text_caption=0.1 or templated_caption=0.05 "
                        "(off by default); with --clean, only these")
    s.set_defaults(fn=cmd_synth)

    r = add("run", help="run a pipeline (YAML) with a run config")
    r.add_argument("pipeline", help="the recipe: a YAML of stages (pipelines/*.yaml)")
    r.add_argument("--config", default=None, help="run config: input, work dir, executor, device, model cache, "
                   "storage options, columns (configs/*.yaml; default: an embedded LocalCluster on the CPU)")
    r.add_argument("--input", default=None, help="path, glob, brace pattern or list file of shards")
    r.add_argument("--workdir", default=None, help="where tables, stats and run records go (a folder or a URL); "
                   "overrides the config")
    r.add_argument("--stages", default=None, help="comma-separated stage ids to run (others skipped)")
    r.add_argument("--until", default=None, metavar="STAGE",
                   help="run the pipeline up to and including this stage (id or kind); done stages are skipped")
    r.set_defaults(fn=cmd_run)

    t = add("train", help="train an open_clip model on WebDataset shards (open_clip_train)")
    t.add_argument("input", help="shards: path, glob, brace pattern or list file")
    t.add_argument("--out", required=True, help="folder for the checkpoint and logs")
    t.add_argument("--name", default="proxy", help="run name: the checkpoint goes to OUT/NAME")
    t.add_argument("--model", default="curate-tiny", help="open_clip architecture")
    t.add_argument("--epochs", type=int, default=4, help="passes over the shards")
    t.add_argument("--batch-size", type=int, default=128, help="pairs per step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--seed", type=int, default=0, help="same seed, same checkpoint")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.set_defaults(fn=cmd_train)

    e = add("eval", help="zero-shot accuracy, retrieval R@1 and match AUC on a labelled set")
    e.add_argument("eval_dir", help="folder with shards and ground_truth.parquet (curate synth --clean)")
    e.add_argument("--model", default="curate-tiny", help="open_clip architecture")
    e.add_argument("--checkpoint", default=None, help="weights to evaluate (default: random, seeded)")
    e.add_argument("--max-samples", type=int, default=1000, help="pairs evaluated at most")
    e.add_argument("--out", default=None, help="write the metrics JSON here")
    e.set_defaults(fn=cmd_eval)

    ig = add("ingest", help="URL + caption list (img2dataset) or image folder -> WebDataset shards")
    ig.add_argument("source", nargs="?", help="Parquet/CSV/TSV of URLs and captions, or a folder of images + .txt")
    ig.add_argument("--from", dest="from_work", default=None, metavar="WORK",
                    help="download only the samples a metadata run in WORK kept (uids preserved)")
    ig.add_argument("--out", required=True, help="folder for the WebDataset shards")
    ig.add_argument("--config", default=None, help="with --from: run config whose storage_options reach a work "
                                                   "dir on object storage")
    ig.add_argument("--input-format", default=None, help="parquet, csv, tsv (default: from the suffix)")
    ig.add_argument("--url-col", default="url", help="column of the URLs in the list")
    ig.add_argument("--caption-col", default="caption", help="column of the captions in the list")
    ig.add_argument("--processes", type=int, default=2, help="img2dataset download processes")
    ig.add_argument("--threads", type=int, default=16, help="download threads per process")
    ig.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per output tar")
    ig.add_argument("--timeout", type=int, default=10, help="seconds per download")
    ig.set_defaults(fn=cmd_ingest)

    x = add("export", help="curated Parquet, uids.npy and resharded WebDataset from a work dir")
    x.add_argument("workdir", help="the work dir of a finished run")
    x.add_argument("--out", required=True, help="a new or empty folder (or URL) for the export")
    x.add_argument("--config", default=None, help="run config for the executor (default: LocalCluster) and the "
                                                  "storage options of a work dir on object storage")
    x.add_argument("--shard-size", type=int, default=10_000, help="samples per output tar")
    x.add_argument("--shuffle-seed", type=int, default=None, help="shuffle shards and samples "
                   "within them with this seed (default: input order)")
    x.add_argument("--no-pool", action="store_true", help="skip OUT/pool (every row with its reason)")
    x.add_argument("--hf-parquet", action="store_true", help="also Parquet with embedded image bytes")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (atomically)")
    x.add_argument("--schema", choices=["curate", "datacomp"], default="curate",
                   help="column names of metadata/ and pool/: curate's, or DataComp's (text, "
                        "clip_l14_similarity_score / clip_b32_similarity_score, original_width...)")
    x.add_argument("--blur-faces", action="store_true", help="blur the faces a faces stage found in the shards' "
                   "images (DataComp's blur; images without faces keep their bytes)")
    x.add_argument("--redact-pii", action="store_true", help="replace the personal data caption_pii found in "
                   "captions with <EMAIL>, <PHONE>... (metadata, pool and shards)")
    x.add_argument("--caption", choices=["original", "synthetic", "both"], default="original",
                   help="the shards' .txt: the alt-text, the recaption stage's caption (the alt-text where it "
                        "wrote none), or the alt-text with the synthetic one as KEY.synthetic.txt")
    x.add_argument("--run", default=None, help="run id (WORK/runs/ID); default: the latest run")
    x.set_defaults(fn=cmd_export)

    rp = add("report", help="write WORK/report/index.html with plots and galleries; with two "
                        "work dirs, WORK_A/report/compare.html (two runs side by side)")
    rp.add_argument("workdir", nargs="+", help="a work dir, or two to compare")
    rp.add_argument("--out", default=None, help="folder for the report (default WORK/report; required for a "
                                                "work dir on object storage)")
    rp.add_argument("--config", default=None, help="run config whose storage_options reach a work dir on object "
                                                   "storage")
    rp.set_defaults(fn=cmd_report)

    st = add("stats", help="print the funnel read back from the stats Parquet")
    st.add_argument("workdir", help="the work dir of a run (a folder or a URL)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--config", default=None, help="run config whose storage_options reach a work dir on object "
                                                   "storage")
    st.add_argument("--run", default=None, help="run id (WORK/runs/ID); default: the latest run")
    st.set_defaults(fn=cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose, getattr(args, "quiet", False))
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, RefusedOutput) as e:  # the user's mistake or choice: nothing was written
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkDirError as e:  # full disk, read-only or blocked path: named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `curate stages | head`: the reader has all it wanted
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (Python flushes stdout again at exit)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except Exception as e:
        why = storage_failure(e)
        if why is None or verbose:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        if not verbose:
            _quiet_shutdown()
        return INTERRUPTED


def cli() -> None:
    """The ``curate`` command. After an interrupt the exit code is 130 whatever the cleanup meets:
    the exit handlers (a half-started Dask cluster's among them) run now, a second Ctrl-C ends the
    process at once, and nothing later in the interpreter's shutdown can turn the code into a signal."""
    code = main()
    if code != INTERRUPTED:
        sys.exit(code)
    import atexit
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(INTERRUPTED))
    try:
        sys.stdout.flush()
        atexit._run_exitfuncs()
    finally:
        os._exit(INTERRUPTED)


if __name__ == "__main__":
    cli()
