"""`valind`: run a value-induction study, or one of its stages, from a YAML spec.

exit codes:
  0    ok
  1    a stage or runtime failure (the message says what failed; rerun resumes)
  2    bad input to fix: a spec (every problem is listed with its YAML path), a file, a flag
  130  interrupted (finished units are kept; rerun the same command to resume)
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from evaluation.errors import InputError, ValindError
from evaluation.judges.external import judge_table
from evaluation.judges.registry import external_judges
from runner import cluster_fit
from runner.models import prepare_all, resolve
from runner.preflight import check_spec, on_cluster, run_preflight
from runner.secrets import SECRETS_DIR, check_job_runtime_env, load_secrets, redact
from runner.spec import SpecError, load_spec
from runner.staging import stage as stage_models
from runner.store import write_csv, write_parquet
from runner.tracking import check_cluster_tracking, tracking_uri

EXIT_INTERRUPTED = 130  # 1 and 2 are ValindError.exit_code and InputError.exit_code
SUMMARY, EPILOG = __doc__.split("\n\n", 1)


def _load(path: str):
    """The spec and its text; a bad spec raises SpecError (an InputError: exit 2) up to main()."""
    spec = load_spec(path)
    return spec, Path(path).read_text()


def _study(args):
    from runner.pipeline import Study  # deferred: runner.pipeline imports ray (~0.5 s), which --help need not
    spec, text = _load(args.spec)
    return Study(spec, text)


def cmd_validate(args) -> int:
    spec, _ = _load(args.spec)
    check_spec(spec, args.spec)  # the files it names (preference data, chat templates), the cluster fit
    cells = len(spec.models) * len(spec.conditions()) * len(spec.seeds.values)
    points = len(spec.train.eval_at) - 1
    print(f"{args.spec}: valid — study {spec.study.name!r}, {len(spec.models)} model(s), "
          f"{len(spec.conditions())} condition(s), {len(spec.seeds.values)} seed(s), "
          f"{len(spec.models) + cells} evaluated runs"
          + (f" + {cells * points} part-way adapters (train.eval_at)" if points else "")
          + (" (at most: data.subset_size: all drops values below min_subset_size)"
             if spec.data.subset_size == "all" else ""))
    return 0


NO_PREFLIGHT = "on a cluster (RAY_ADDRESS set), skip `valind preflight`, which otherwise runs before any compute"
AMEND = ("make this spec the study's own although it changes what the study computes (units whose inputs "
         "changed are recomputed, the others kept); without it such a spec is refused")


def cmd_preflight(args) -> int:
    spec, _ = _load(args.spec)
    if args.stage:
        stage_models(spec, args.spec)
    return run_preflight(spec, args.spec)


def cmd_stage_models(args) -> int:
    spec, _ = _load(args.spec)
    stage_models(spec, args.spec, dry_run=args.dry_run)  # StageError: exit 1, naming each item
    return 0


def _preflight_on_cluster(args) -> None:
    """On a cluster, `valind preflight` before any compute: a problem stops the run (exit 2)."""
    if getattr(args, "no_preflight", False) or not on_cluster():
        return
    spec, _ = _load(args.spec)
    # first the refusal that needs no connection: a local tracking file behind a remote head
    check_cluster_tracking(tracking_uri(spec.tracking.uri, spec.output_dir(Path.cwd())))
    if run_preflight(spec, args.spec):
        raise InputError("preflight found the problems above: fix them and rerun (--no-preflight skips the check)")


def cmd_stage(args) -> int:
    _preflight_on_cluster(args)
    study = _study(args)
    out = study.run(until=args.stage, amend=args.amend)
    if args.stage == "analyze":
        _print_where(study, out)
    return 0


def cmd_annotate(args) -> int:
    _preflight_on_cluster(args)
    study = _study(args)
    if args.audit is None and args.audit_labels is None:
        study.run(until="annotate")
    else:
        study.audit(n=args.audit, labels=Path(args.audit_labels) if args.audit_labels else None)
    return 0


def _print_where(study, report) -> None:
    uri = tracking_uri(study.spec.tracking.uri, study.root)
    print(f"report:  {report}")
    print(f"mlflow:  {uri}")
    # the runs table (README: the clicks that group it); without workflowType a fresh browser may open
    # MLflow's GenAI overview
    runs = f"#/experiments/{study.ctx.tracker.experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith("sqlite:///"):
        print(f"open it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        print(f"then:    http://127.0.0.1:5000/{runs}")
    elif uri.startswith("http"):
        print(f"runs:    {uri.rstrip('/')}/{runs}")
    # last: did the adapters change their models, then could the study see an effect at all
    for line in study.adapter_lines() + study.sensitivity_lines():
        print(line)


def cmd_status(args) -> int:
    study = _study(args)
    rows = study.status()
    states = ("done", "failed", "invalid", "missing")
    table = Table(title=f"study {study.spec.study.name} — {study.root}")
    for col in ("stage", *states):
        table.add_column(col)
    for stage in dict.fromkeys(r["stage"] for r in rows):
        rs = [r for r in rows if r["stage"] == stage]
        table.add_row(stage, *(str(sum(r["state"] == s for r in rs)) for s in states))
    Console().print(table)
    done = sum(r["state"] == "done" for r in rows)
    print(f"{done}/{len(rows)} units done" + (" — the study is complete" if done == len(rows) else ""))
    if not study.runs_known():
        print("runs: listed once curate is done (data.subset_size: all drops values below min_subset_size)")
    for r in rows:  # masked again: a _FAILED.json written before redaction covered it keeps its text
        if r["state"] in ("failed", "invalid"):
            print(redact(f"{r['state']}: {r['stage']} {r['unit']}: {r['why']}"
                         + (" (the next run recomputes it)" if r["state"] == "invalid" else "")))
    drops = study.store.info("annotate", study.key("annotate")).get("drops")
    if drops:
        print(f"dropped pairs by reason: {json.dumps(drops)}")
    return 0


def cmd_judge(args) -> int:
    """Score a CSV/JSONL/parquet of (prompt, response) rows with one of the suites' judges."""
    src, dst = Path(args.input), Path(args.output)
    readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}
    if src.suffix not in readers or dst.suffix not in readers:
        raise InputError("--input/--output must end in .csv, .jsonl or .parquet")
    try:
        df = readers[src.suffix](src)
    except Exception as e:
        raise InputError(f"{src}: cannot read ({type(e).__name__}: {e})") from None
    engine = None
    if external_judges()[args.judge][0]:
        if not args.model:
            raise InputError(f"judge {args.judge!r} needs --model (a builtin name, local dir or hub id)")
        from runner.engines import EngineConfig, make_engine  # deferred: runner.engines imports ray (~0.5 s)
        engine = make_engine(EngineConfig(model=resolve(args.model), backend=args.backend, max_model_len=2048))
    try:
        out = judge_table(args.judge, df, args.prompt_col, args.response_col, engine)
    except KeyError as e:
        raise InputError(f"{src}: {e.args[0]}") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".parquet":
        write_parquet(out, dst)
    elif dst.suffix == ".csv":
        write_csv(out, dst)
    else:
        out.to_json(dst, orient="records", lines=True)
    n = int(out["scored"].sum())
    print(f"judge {args.judge}: {len(out)} rows, {n} scored, {len(out) - n} unscored → {dst}")
    return 0


def cmd_rehearse(args) -> int:
    from runner.rehearse import rehearse  # deferred: runner.rehearse imports ray (~0.5 s)
    fig = rehearse(args.spec, args.output_dir, args.models, args.cluster_dir, args.stop_node)
    m = fig["mlflow"]
    return 0 if m["runs"] == m["expected"] and not m["duplicates"] else 1


def cmd_plan(args) -> int:
    from runner.measure import plan_spec  # deferred: runner.pipeline imports ray (~0.5 s)
    spec, _ = _load(args.spec)
    cluster_fit.check(spec, args.spec)  # a cell or pool that never fits the declared cluster: SpecError (exit 2)
    plan_spec(spec, spec.study.name, measure=args.measure, steps=args.measure_steps)  # PlanError: exit 2 in main()
    return 0


def cmd_models(args) -> int:
    for name, path in prepare_all().items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="valind", description=SUMMARY, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a spec; every problem is printed with its YAML path (exit 2)")
    v.add_argument("spec")
    v.set_defaults(fn=cmd_validate)
    r = sub.add_parser("run", help="run the whole study (cached stages are skipped)")
    r.add_argument("spec")
    r.add_argument("--amend", action="store_true", help=AMEND)
    r.add_argument("--no-preflight", action="store_true", help=NO_PREFLIGHT)
    r.set_defaults(fn=cmd_stage, stage="analyze")
    for stage, help_ in [("annotate", "judge the preference pairs for values"),
                         ("curate", "build value subsets, random controls and the held-out split"),
                         ("train", "fine-tune every (model, condition, seed) cell"),
                         ("generate", "generate responses to the evaluation suites"),
                         ("score", "judge the generations"),
                         ("report", "statistics and the HTML report")]:
        s = sub.add_parser(stage, help=f"{help_} (runs earlier stages as needed)")
        s.add_argument("spec")
        s.add_argument("--amend", action="store_true", help=AMEND)
        s.add_argument("--no-preflight", action="store_true", help=NO_PREFLIGHT)
        s.set_defaults(fn=cmd_stage, stage="analyze" if stage == "report" else stage)
        if stage == "annotate":
            s.add_argument("--audit", type=int, metavar="N", help="write N stratified annotations as CSV for labelling")
            s.add_argument("--audit-labels", metavar="CSV", help="score the labelled audit CSV against the judge")
            s.set_defaults(fn=cmd_annotate)
    pf = sub.add_parser("preflight", help="open everything the study reads and check everything it needs "
                                          "(data, models, tracking, nodes, storage, fit): one table, exit 2 on a problem")
    pf.add_argument("spec")
    pf.add_argument("--stage", action="store_true", help="first run `valind stage SPEC` (download and verify "
                                                          "the hub models and datasets into HF_HOME)")
    pf.set_defaults(fn=cmd_preflight)
    sg = sub.add_parser("stage", help="download every hub model, tokenizer and dataset the spec names into the "
                                      "shared cache (HF_HOME), one writer, verified; the job then runs offline")
    sg.add_argument("spec")
    sg.add_argument("--dry-run", action="store_true", help="list what would be downloaded and where; download nothing")
    sg.set_defaults(fn=cmd_stage_models)
    rh = sub.add_parser("rehearse", help="the spec's orchestration on the Ray cluster at RAY_ADDRESS with tiny "
                                         "models: overhead, concurrency, pool hand-overs (docs/REHEARSAL.md)")
    rh.add_argument("spec")
    rh.add_argument("--output-dir", default="studies", help="where the rehearsal study is written (default: studies)")
    rh.add_argument("--models", type=int, metavar="N", help="rehearse only the first N base models (default: all)")
    rh.add_argument("--cluster-dir", help="the state dir of a `python -m runner.local_cluster` cluster")
    rh.add_argument("--stop-node", metavar="STAGE[:SECONDS]",
                    help="SECONDS (default 30) into STAGE, kill the worker node of --cluster-dir that holds one of "
                         "the stage's actors, then start a new node")
    rh.set_defaults(fn=cmd_rehearse)
    st = sub.add_parser("status", help="what is done, cached or failed")
    st.add_argument("spec")
    st.set_defaults(fn=cmd_status)
    pl = sub.add_parser("plan", help="trials, requests, GPU-hours per stage and wall time on the declared cluster")
    pl.add_argument("spec")
    pl.add_argument("--measure", action="store_true",
                    help="probe the cluster (RAY_ADDRESS, else a local one): a few DPO steps per model size, a judge "
                         "batch and a generation batch; print the plan from the measured rates beside the defaults")
    pl.add_argument("--measure-steps", type=int, default=3, help="DPO optimizer steps per model size (default 3)")
    pl.set_defaults(fn=cmd_plan)
    j = sub.add_parser("judge", help="score an outside table of (prompt, response) rows with a judge")
    j.add_argument("judge", choices=sorted(external_judges()))
    j.add_argument("--input", required=True, help="CSV, JSONL or parquet file")
    j.add_argument("--output", required=True, help="CSV, JSONL or parquet file (one row per input row)")
    j.add_argument("--prompt-col", default="prompt")
    j.add_argument("--response-col", default="response")
    j.add_argument("--model", help="judge model for LLM judges (builtin name, local dir or hub id)")
    j.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    j.set_defaults(fn=cmd_judge)
    m = sub.add_parser("models", help="model provisioning")
    msub = m.add_subparsers(dest="models_command", required=True)
    mp = msub.add_parser("prepare", help="build the offline SmolLM2-135M-Instruct dir and the tiny test model")
    mp.set_defaults(fn=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    args = build_parser().parse_args(argv)
    try:
        _secrets()
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted: finished units are kept; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValindError as e:
        return _fail(e)
    except OSError as e:  # a full disk where no store write caught it: a message, never a traceback
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _traceback()
        return _fail(ValindError(f"no space left on the device ({e.filename or e}): free some space and rerun; "
                                 "finished units are kept"))
    except Exception:
        return _traceback()


def _traceback() -> int:
    """An unexpected error: its traceback, with secrets (a URI's password, a token) masked; exit 1."""
    print(redact(traceback.format_exc()), end="", file=sys.stderr)
    return 1


def _secrets() -> None:
    """Secrets from $VALIND_SECRETS_DIR into this process's environment; a Ray job whose runtime env
    carries one is refused (runner.secrets)."""
    check_job_runtime_env()
    names = load_secrets()
    if names:
        print(f"valind: secrets from ${SECRETS_DIR}: {', '.join(names)}", file=sys.stderr)


def _fail(e: ValindError) -> int:
    """Print a valind error without a traceback (secrets redacted) and give its exit code.
    A SpecError prints its own rendering: one line per problem, with its YAML path."""
    text = e.render() if isinstance(e, SpecError) else f"valind: error: {e}"
    print(redact(text), file=sys.stderr)
    return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
