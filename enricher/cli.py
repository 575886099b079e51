"""`enricher`: the command line.

Settings come from ENRICHER_* variables; the global flags override them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from enricher.broker import EmbeddedBroker
from enricher.config import Settings
from enricher.errors import EnricherError, RequestError, UserError
from enricher.store.queries import jsonable, query_user_ddl
from enricher.store.query import ask, drop_rows, format_table, report_text, store_tables
from enricher.store.query import report as query_report
from enricher.store.reports import REPORTS
from enricher.windows import parse_window

EXIT_USAGE = 2


def _settings(args, **extra) -> Settings:
    return Settings.from_env(data_dir=args.data_dir, broker=args.broker, clickhouse_url=args.clickhouse_url, **extra)


def _registry(settings: Settings):
    from enricher.control.registry import open_registry  # lazy: pyarrow

    return open_registry(settings)


# -- broker ------------------------------------------------------------------
def cmd_broker(args) -> int:
    broker = EmbeddedBroker(args.host, args.port, storage=args.storage).start()

    def on_sigterm(*_):
        # Only interrupt the wait below; stopping (and reaping) the child happens
        # in `finally`, outside the handler, not inside the wait it interrupted.
        raise KeyboardInterrupt

    # Installed before the "listening" line: whoever reads that line may signal
    # at once (CI caught the old order: a SIGTERM right after it killed us
    # with the default action and left Tansu orphaned).
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        print(f"embedded broker (Tansu, {args.storage} storage) listening on {broker.url} "
              f"(pid {broker.process.pid}); Ctrl-C or SIGTERM stops it", flush=True)
        code = broker.process.wait()
        if code:
            print(f"enricher broker: the broker exited with code {code}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        # A second SIGTERM while stopping must not leave the child behind.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        broker.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


# -- models --------------------------------------------------------------------
def cmd_models_register(args) -> int:
    settings = _settings(args)
    try:
        schema = json.loads(Path(args.schema).read_text())
    except FileNotFoundError:
        raise UserError(f"schema file {args.schema!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"schema file {args.schema!r} is not valid JSON: {exc}") from None

    # The same change as `PUT /models/{id}`, through the same control plane: on a model
    # already registered, every enabled enrichment goes back to pending (its old failure
    # forgotten), the change is announced and the trigger trains on the new data.
    control = _control(settings)
    body = {"schema": schema, "reference": args.reference}
    if args.model_file:
        body["model_file"] = args.model_file
    try:
        created, _ = control.put_model(args.model_id, body)
    except RequestError as exc:
        raise UserError(str(exc)) from None
    spec = control.registry.get(args.model_id)
    pending = [n for n, t in control.registry.enrichments(args.model_id).items() if t["enabled"]]
    print(f"{'registered' if created else 're-registered'} {spec.model_id}: {spec.task}, {len(spec.features)} "
          f"features, {len(spec.attributes)} attributes"
          + (f", model file {Path(args.model_file).name}" if args.model_file else "")
          + (f"; to train again: {', '.join(pending)} (pending)" if pending else ""))
    return 0


def cmd_models_list(args) -> int:
    registry = _registry(_settings(args))
    ids = registry.ids()
    if not ids:
        print("no models registered (see `enricher models register --help`)")
    for model_id in ids:
        on = [n for n, t in registry.enrichments(model_id).items() if t["enabled"]]
        print(f"{model_id}\t{registry.get(model_id).task}\tenrichments: {', '.join(on) or 'none'}")
    return 0


def cmd_models_copy_registry(args) -> int:
    from enricher.models.registry import ModelRegistry  # lazy: pyarrow

    settings = _settings(args)
    if settings.control_store == "directory":
        raise UserError("copy-registry copies DATA_DIR/registry into the control store ENRICHER_CONTROL_STORE "
                        "names; set ENRICHER_CONTROL_STORE=clickhouse (and ENRICHER_CLICKHOUSE_URL, "
                        "ENRICHER_ARTIFACT_STORE) first")
    source = ModelRegistry(settings.registry_dir)
    if not source.ids():
        raise UserError(f"no model is registered in {settings.registry_dir}: nothing to copy")
    target = _registry(settings)
    copied = source.copy_to(target)
    print(f"copied {len(copied)} model(s) from {settings.registry_dir} to {target.where()}: {', '.join(copied)}")
    return 0


def cmd_models_show(args) -> int:
    settings = _settings(args)
    registry = _registry(settings)
    spec = registry.get(args.model_id)
    store = settings.artifacts()
    enrichments = {}
    for name, toggle in registry.enrichments(args.model_id).items():
        enrichments[name] = {**toggle, "artifact_version": store.current_version(args.model_id, name),
                             "versions": store.versions(args.model_id, name)}
    doc = {"model_id": spec.model_id, "schema": spec.to_json(),
           "reference_rows": registry.reference(args.model_id).num_rows, "enrichments": enrichments}
    print(json.dumps(doc, indent=2))
    return 0


def cmd_models_drop_rows(args) -> int:
    if not args.yes:
        raise UserError(f"this deletes every enriched row and label of {args.model_id}; "
                        "add --yes to do it")
    drop_rows(_settings(args), args.model_id)
    print(f"deleted the enriched rows, labels and view of {args.model_id} (its registration stays)")
    return 0


def cmd_report(args) -> int:
    """Every window report (store/reports.py): `enricher drift`, `enricher explain`, ..."""
    report = REPORTS[args.report]
    settings = _settings(args)
    doc = query_report(settings, report.name, args.model_id, args.window, args.end,
                       {name: getattr(args, name) for name, _ in report.options})
    plot = getattr(args, "plot", None)
    if plot:
        report.module().plot(doc, plot)
    if args.format == "json":
        print(json.dumps(doc, indent=2))
        return 0
    print(report_text(report.name, doc))
    if plot:
        print(f"chart written to {plot}")
    return 0


# -- storage -------------------------------------------------------------------
def cmd_migrate(args) -> int:
    from enricher.store.migrate import MigrationError, migrate  # lazy: clickhouse_connect, pyarrow

    settings = _settings(args)
    tables = store_tables(settings)
    try:
        report = migrate(tables, _registry(settings), drop_legacy=args.drop_legacy)
    except MigrationError as exc:
        raise UserError(str(exc)) from None
    finally:
        tables.client.close()
    if not report.found:
        print("nothing to migrate: no layout v1 table (inferences) in "
              f"{settings.clickhouse_database}_store")
        return 0
    for model_id, n in report.rows.items():
        print(f"{model_id}: {n} rows copied to layout v2, every one checked in the view")
    if report.unregistered:
        print(f"not registered, left in layout v1: {', '.join(report.unregistered)} "
              "(register them, then run migrate again)")
    print(f"layout v1 table: {report.legacy}")
    return 1 if report.unregistered else 0


# -- enrichments ---------------------------------------------------------------
def _parse_assignment(text: str):
    if "=" not in text:
        raise UserError(f"{text!r}: write NAME=on, NAME=off or NAME.SETTING=VALUE")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _control(settings: Settings):
    from enricher.control.plane import ControlPlane  # lazy: pyarrow

    return ControlPlane.from_settings(settings)


def cmd_enrichments_set(args) -> int:
    """The same change as `PATCH /models/{id}/enrichments`, through the same control plane."""

    settings = _settings(args)
    control = _control(settings)
    current = control.enrichments(args.model_id) if args.model_id in control.registry.ids() else {}
    body: dict[str, dict] = {}
    for item in args.assignments:
        key, value = _parse_assignment(item)
        name, _, setting = key.partition(".")
        change = body.setdefault(name, {})
        if setting:
            change.setdefault("config", dict(current.get(name, {}).get("config", {})))[setting] = value
        elif value in ("on", True, "true"):
            change["enabled"] = True
        elif value in ("off", False, "false"):
            change["enabled"] = False
        else:
            raise UserError(f"{item!r}: {name} takes on or off")
    try:
        control.patch_enrichments(args.model_id, body)
    except RequestError as exc:
        raise UserError(str(exc)) from None
    return cmd_enrichments_show(args)


def cmd_enrichments_retrain(args) -> int:
    """The same as `POST /models/{id}/enrichments/retrain`: back to pending; the trigger runs them."""
    settings = _settings(args)
    try:
        _control(settings).retrain(args.model_id, {"enrichments": args.enrichment} if args.enrichment else {})
    except RequestError as exc:
        raise UserError(str(exc)) from None
    return cmd_enrichments_show(args)


def cmd_enrichments_show(args) -> int:
    try:
        enrichments = _control(_settings(args)).enrichments(args.model_id)
    except RequestError as exc:
        raise UserError(str(exc)) from None
    for name, e in enrichments.items():
        trained = f"artifact v{e['version']}" if e["version"] else "not trained"
        made = f"\tby {e['workflow']}" if e["workflow"] else ""
        why = f"\t{e['message']}" if e["message"] else ""
        print(f"{name}\t{'on' if e['enabled'] else 'off'}\t{e['status']}\t{trained}\t"
              f"config {json.dumps(e['config'])}{made}{why}")
    return 0


# -- the sample model, for a stack to show something (docker/compose.yaml's producer) --------
def cmd_sample_register(args) -> int:
    """The sample model (credit_default) with 10,000 reference rows, registered through the
    control plane like `models register`, and the enrichments named turned on (the trigger trains them)."""
    import pyarrow.parquet as pq  # lazy: pyarrow

    from enricher import sample  # lazy: pyarrow

    settings = _settings(args)
    unknown = sorted(set(args.enable) - set(_enrichment_names()))
    if unknown:
        raise UserError(f"--enable: unknown enrichment(s) {unknown}; known: {', '.join(_enrichment_names())}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    reference = settings.data_dir / "sample-reference.parquet"
    pq.write_table(sample.reference_table(10_000), reference)
    control = _control(settings)
    try:
        created, _ = control.put_model(sample.MODEL_ID, {"schema": sample.SCHEMA, "reference": str(reference)})
        if args.enable:
            control.patch_enrichments(sample.MODEL_ID, {n: {"enabled": True} for n in args.enable})
    except RequestError as exc:
        raise UserError(str(exc)) from None
    print(f"{'registered' if created else 're-registered'} {sample.MODEL_ID} (10,000 reference rows)"
          + (f"; turned on: {', '.join(args.enable)}" if args.enable else ""))
    return 0


def cmd_sample_stream(args) -> int:
    """Sample inferences at about --rate a second (one JSON array message per second), and
    the labels of --label-share of them --label-delay seconds later, until --count or Ctrl-C."""
    import collections

    from enricher import sample  # lazy: pyarrow
    from enricher.stream.producer import InferenceProducer  # lazy: confluent_kafka, pyarrow
    from enricher.stream.topics import ensure_topics  # lazy: confluent_kafka

    if args.rate < 1 or args.count < 0 or not 0 <= args.label_share <= 1 or args.label_delay < 0:
        raise UserError("--rate >= 1, --count >= 0 (0: forever), --label-share in [0, 1], --label-delay >= 0")
    settings = _settings(args)
    ensure_topics(settings)
    producer = InferenceProducer(settings, batch="json", batch_rows=max(args.rate, 1))
    late: collections.deque = collections.deque()  # (when due, label messages)
    sent, second = 0, 0
    try:
        while args.count == 0 or sent < args.count:
            started = time.monotonic()
            n = args.rate if args.count == 0 else min(args.rate, args.count - sent)
            labels: list[bytes] = []
            messages, _ = sample.inferences(n, anomalies=1 if second % 10 == 9 else 0, seed=second,
                                            id_prefix=f"s{int(time.time())}-{second}", labels=labels)
            producer.send_many(messages)
            keep = labels[: round(len(labels) * args.label_share)]
            late.append((started + args.label_delay, keep))
            while late and late[0][0] <= time.monotonic():
                producer.send_many(late.popleft()[1])
            producer.flush()
            sent += n
            second += 1
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        for _, labels in late:  # the labels still owed, before leaving
            producer.send_many(labels)
        producer.flush()
    except KeyboardInterrupt:
        pass
    print(f"sent {sent:,} inferences to {settings.inference_topic}")
    return 0


def _enrichment_names() -> list[str]:
    from enricher.models import ENRICHMENTS  # lazy: pyarrow

    return sorted(ENRICHMENTS)


def cmd_train(args) -> int:
    """One model: its enrichments, each step said as it goes. Several (IDs, or --all): in one
    process (--jobs processes), a progress line, each model published as it finishes, and a
    summary naming each model that failed and why (exit 2 if any did; the others are published)."""
    # The CLI composes both halves; the streaming modules never import training.
    from enricher.pipelines.labelled import LabelledRows  # lazy: pyarrow
    from enricher.pipelines.train import candidates, train, train_many  # lazy: pyarrow

    if args.all and args.model_ids:
        raise UserError("give model ids or --all, not both")
    if not args.all and not args.model_ids:
        raise UserError("name the models to train (enricher train ID [ID ...]) or --all for every registered "
                        "model with an enrichment on")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs: at least 1, got {args.jobs}")
    settings = _settings(args)
    registry = _registry(settings)
    if not args.all and len(args.model_ids) == 1:
        train(registry, settings.artifacts(), args.model_ids[0], only=args.enrichment or None,
              labelled=LabelledRows(settings))
        return 0
    model_ids = candidates(registry, args.enrichment) if args.all else list(dict.fromkeys(args.model_ids))
    if not model_ids:
        print("no registered model has " + (f"{' or '.join(args.enrichment)}" if args.enrichment
                                            else "an enrichment") + " on: nothing to train")
        return 0
    jobs = min(args.jobs or os.cpu_count() or 1, len(model_ids))
    started = time.monotonic()
    show = ProgressLine(sys.stderr, started)
    from enricher.control.registry import open_registry  # lazy: pyarrow

    outcomes = train_many(settings, registry, model_ids, args.enrichment or None, jobs=jobs, progress=show,
                          open_registry=open_registry)
    show.end()
    failed = [o for o in outcomes if o.failure]
    published = sum(len(o.published) for o in outcomes)
    print(f"trained {len(outcomes) - len(failed):,} of {len(outcomes):,} models ({published:,} artifacts "
          f"published) in {time.monotonic() - started:.1f} s with {jobs} process(es)")
    if failed:
        print(f"{len(failed)} failed (each keeps serving its current version, if any):", file=sys.stderr)
        for o in failed:
            kept = f" [published: {', '.join(sorted(o.published))}]" if o.published else ""
            print(f"  {o.model_id}: {o.failure}{kept}", file=sys.stderr)
        return EXIT_USAGE
    return 0


class ProgressLine:
    """`trained 120/1000 models, 2 failed, 14.2/s, about 62 s left`, rewritten in place on a
    terminal; elsewhere (a log) one line per tenth of the way."""

    def __init__(self, stream, started: float):
        self.stream, self.started = stream, started
        self.tty = stream.isatty()
        self.shown = 0

    def __call__(self, done: int, failed: int, total: int) -> None:
        step = max(total // 10, 1)
        if not self.tty and done % step and done != total:
            return
        rate = done / max(time.monotonic() - self.started, 1e-9)
        line = (f"trained {done:,}/{total:,} models, {failed:,} failed, {rate:.1f}/s, "
                f"about {(total - done) / rate:.0f} s left")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()
        self.shown += 1

    def end(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")


# -- training runs ---------------------------------------------------------------
def cmd_trigger(args) -> int:
    import logging

    from enricher.control.trigger import run_trigger  # lazy: hera, confluent_kafka

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"runner": args.runner} if args.runner else {}
    run_trigger(_settings(args, **overrides))
    return 0



def cmd_pipeline(args) -> int:
    """One step of a training workflow (the command each workflow step runs).

    Exit 0: done. Exit 3 (EXIT_PERMANENT): failed for a reason a retry will
    not change; the workflow's retry strategy does not retry it. Anything
    else (exit 1, a crash, a kill at the step's deadline) is retried."""
    from enricher.control.plane import ControlEvents  # lazy: pyarrow
    from enricher.models.reference import ReferenceDataError  # lazy: pyarrow
    from enricher.models.registry import UnknownModel  # lazy: pyarrow
    from enricher.models.spec import SpecError  # lazy: pyarrow
    from enricher.pipelines import steps  # lazy: pyarrow
    from enricher.pipelines.labelled import LabelledRows  # lazy: pyarrow
    from enricher.pipelines.workflow import EXIT_PERMANENT  # lazy: hera, pyarrow

    settings = _settings(args)
    registry, store = _registry(settings), settings.artifacts()
    if args.step != "cleanup" and not args.model:
        raise UserError(f"{args.step} needs --model ID")
    if args.step in ("train", "validate", "publish") and not args.enrichment:
        raise UserError(f"{args.step} needs --enrichment NAME")
    try:
        if args.step == "prepare":
            steps.prepare(registry, store, args.model, args.run)
        elif args.step == "train":
            try:
                config = json.loads(args.config or "{}")
            except json.JSONDecodeError as exc:
                raise UserError(f"--config is not JSON: {exc}") from None
            steps.train(registry, store, args.model, args.run, args.enrichment, config, LabelledRows(settings))
        elif args.step == "validate":
            steps.validate(registry, store, args.model, args.run, args.enrichment)
        elif args.step == "publish":
            steps.publish(registry, store, args.model, args.run, args.enrichment, ControlEvents(settings).send)
        else:
            steps.cleanup(store, args.run)
    except (steps.StepError, UnknownModel, SpecError, ReferenceDataError) as exc:
        print(f"enricher pipeline {args.step}: failed: {exc}", file=sys.stderr)
        return EXIT_PERMANENT
    return 0


# -- artifacts -------------------------------------------------------------------
def cmd_artifacts_list(args) -> int:
    from enricher.models import ENRICHMENTS  # lazy: pyarrow

    settings = _settings(args)
    _registry(settings).get(args.model_id)  # an unknown model is an error, not an empty list
    store = settings.artifacts()
    names = [args.enrichment] if args.enrichment else sorted(ENRICHMENTS)
    rows = []
    for name in names:
        if name not in ENRICHMENTS:
            raise UserError(f"unknown enrichment {name!r}; known: {', '.join(sorted(ENRICHMENTS))}")
        current = store.current_version(args.model_id, name)
        for m in store.manifests(args.model_id, name):
            rows.append([name, f"v{m.version}", "*" if m.version == current else "", m.created_at,
                         str(m.training_rows), m.workflow or ""])
    if not rows:
        print(f"no artifacts for {args.model_id} (kept in {store.files.location})")
        return 0
    print(format_table(["enrichment", "version", "current", "created_at", "training_rows", "workflow"], rows))
    return 0


def cmd_artifacts_rollback(args) -> int:
    settings = _settings(args)
    registry = _registry(settings)
    registry.get(args.model_id)
    version = int(args.version.lstrip("v")) if args.version.lstrip("v").isdigit() else None
    if version is None:
        raise UserError(f"{args.version!r}: give a version number, e.g. 3 or v3 (see `enricher artifacts list`)")
    manifest = settings.artifacts().set_current(args.model_id, args.enrichment, version)
    registry.touch()
    from enricher.control.plane import ControlEvents  # lazy: pyarrow

    # running workers switch at once on the announcement (or at their next refresh)
    ControlEvents(settings).send("artifact_published", args.model_id, enrichment=args.enrichment,
                                 version=manifest.version, rollback=True)
    print(f"{args.model_id}/{args.enrichment}: serving v{manifest.version} (made {manifest.created_at})")
    return 0


# -- bias mitigation ---------------------------------------------------------------
def cmd_bias_curve(args) -> int:
    from enricher.control import bias  # lazy: pyarrow

    try:
        doc = bias.curves(_control(_settings(args)), args.model_id, args.constraint)
    except RequestError as exc:
        raise UserError(str(exc)) from None
    if args.plot:
        bias.plot(doc, args.plot)
    if args.format == "json":
        print(json.dumps(doc, indent=2))
        return 0
    for part in bias.text(doc):
        print(part if isinstance(part, str) else format_table(*part))
    if args.plot:
        print(f"chart written to {args.plot}")
    return 0


def cmd_bias_choose(args) -> int:
    from enricher.control import bias  # lazy: pyarrow

    body = {"index": args.index, **({"constraint": args.constraint} if args.constraint else {})}
    try:
        done = bias.choose(_control(_settings(args)), args.model_id, body)
    except RequestError as exc:
        raise UserError(str(exc)) from None
    q = done["quality"]
    print(f"{args.model_id}: bias mitigation v{done['version']} serves {q['constraint']} point {q['point']}: "
          f"accuracy {q['accuracy']:.4f}, gap {q['gap']:.4f} on the reference rows ({q['mode']})")
    return 0


# -- streaming -----------------------------------------------------------------
def cmd_worker(args) -> int:
    from enricher.worker import run_worker  # lazy: faust, clickhouse_connect

    overrides = {k: v for k, v in {"http_port": args.http_port, "batch_size": args.batch_size,
                                   "batch_timeout": args.batch_timeout}.items() if v is not None}
    run_worker(_settings(args, **overrides), loglevel=args.log_level)
    return 0


def cmd_produce(args) -> int:
    """Send JSON lines to the inference topic, and say beforehand what the worker will
    refuse, by the worker's own validation (contract.parse_batch) against the models
    registered here. Refused lines are still sent (the worker dead-letters them with
    their reason and position, nothing is lost) unless --check: then nothing is sent."""
    from collections import Counter

    from enricher.stream.contract import parse_batch  # lazy: pyarrow

    if args.batch_rows < 1:
        raise UserError(f"--batch-rows: a positive number, got {args.batch_rows}")
    settings = _settings(args)
    registry = _registry(settings)
    known = {m: registry.get(m) for m in registry.ids()}
    producer = None
    if not args.check:
        from enricher.stream.producer import InferenceProducer  # lazy: confluent_kafka, pyarrow
        from enricher.stream.topics import ensure_topics  # lazy: confluent_kafka

        ensure_topics(settings)
        producer = InferenceProducer(settings, topic=args.topic, batch=args.batch, batch_rows=args.batch_rows)
    try:
        source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as exc:
        raise UserError(f"cannot read {args.file!r}: {exc.strerror}") from None
    counts = Counter()
    refused: Counter = Counter()
    examples: dict[str, str] = {}

    def check_and_send(lines: list[bytes], first: int) -> None:
        parsed = parse_batch(lines, [0] * len(lines), list(range(first, first + len(lines))), known.get,
                             settings.max_message_bytes, max_future_skew=settings.max_future_skew)
        counts["inferences"] += sum(r.num_rows for r in parsed.models.values())
        counts["labels"] += sum(r.num_rows for r in parsed.labels.values())
        bad = set()
        for d in parsed.dead:
            if known or d.reason != "unknown_model":
                refused[d.reason] += 1
                examples.setdefault(d.reason, f"line {d.offset}: {d.detail}")
                bad.add(d.offset)
            else:  # no registry here: a well-formed row of a model we cannot see goes on as usual
                counts["unchecked"] += 1
        if producer is None:
            return
        for k, line in enumerate(lines):
            # A line that will be refused goes alone, so that it alone is dead-lettered.
            producer.send_alone(line) if first + k in bad else producer.send(line)

    chunk: list[bytes] = []
    number, first = 0, 1
    with source:
        for line in source:
            number += 1
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            if not chunk:
                first = number
            chunk.append(line)
            if len(chunk) >= 10_000:
                check_and_send(chunk, first)
                chunk = []
        if chunk:
            check_and_send(chunk, first)
    if producer is not None:
        producer.flush()
    total = counts["inferences"] + counts["labels"] + counts["unchecked"] + sum(refused.values())
    what = f"{counts['inferences']} inferences, {counts['labels']} label updates"
    if counts["unchecked"]:
        what += (f", {counts['unchecked']} for models not registered in {registry.where()} "
                 "(not checked here: the worker checks them)")
    if producer is not None:
        print(f"produced {total} lines ({what}) in {producer.messages} messages to {producer.topic}")
    else:
        print(f"checked {total} lines ({what}); nothing sent (--check)")
    if refused:
        verb = "will refuse" if producer is not None else "would refuse"
        print(f"the worker {verb} {sum(refused.values())} (they go to the dead-letter topic "
              f"{settings.dlq_topic}; see `enricher deadletters`):", file=sys.stderr)
        for reason, n in refused.most_common():
            print(f"  {reason}\t{n}\te.g. {examples[reason]}", file=sys.stderr)
    if not known:
        print(f"note: no model is registered in {registry.where()}: model ids and features were not "
              "checked here", file=sys.stderr)
    return 0


def cmd_schema(args) -> int:
    """SQL for a DBA: the query user's (--query-user), or the tables and the registered
    models' views, for one server or ON CLUSTER (--cluster, or ENRICHER_CLICKHOUSE_CLUSTER)."""
    from enricher.store.clickhouse import Topology, schema_ddl  # lazy: clickhouse_connect, pyarrow

    settings = _settings(args)
    if args.query_user:
        statements = query_user_ddl(settings)
    else:
        cluster = settings.clickhouse_cluster if args.cluster is None else args.cluster
        try:
            topology = Topology(settings.clickhouse_database, cluster)
        except ValueError:
            raise UserError(f"--cluster {cluster!r}: the cluster's name as in the server's remote_servers "
                            f"(letters, digits and _)") from None
        registry = _registry(settings)
        specs = [registry.get(m) for m in registry.ids()]
        statements = schema_ddl(topology, settings.retention_days, specs)
        print(f"-- {len(specs)} registered model(s); "
              + (f"cluster {cluster}: Replicated tables *_local ON CLUSTER, Distributed tables over them"
                 if cluster else "one server"))
    for statement in statements:
        print(statement + ";")
    return 0


def cmd_deadletters(args) -> int:
    """Read the dead-letter topic: each rejected message with why, where from, and its bytes."""
    import signal
    import threading
    from datetime import datetime, timezone

    from enricher.stream.contract import REASONS  # lazy: pyarrow
    from enricher.stream.deadletters import browse  # lazy: confluent_kafka, pyarrow

    if args.bytes < 1:
        raise UserError(f"--bytes: a positive number of bytes, got {args.bytes}")
    if args.reason and args.reason not in REASONS:
        raise UserError(f"--reason {args.reason!r}: unknown; one of {', '.join(REASONS)}")
    since = parse_window(args.since) if args.since else None
    settings = _settings(args)
    stop = threading.Event()
    if args.follow:  # Ctrl-C or SIGTERM ends a follow cleanly (the reader closes, no trace)
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    letters = browse(settings, model=args.model, reason=args.reason, since=since, follow=args.follow, stop=stop)
    shown = 0
    collected = []
    for letter in letters:
        shown += 1
        if args.format == "json":
            collected.append(letter.as_dict())
            continue
        if args.format == "jsonl":
            print(json.dumps(letter.as_dict(), ensure_ascii=False), flush=True)
            continue
        when = (datetime.fromtimestamp(letter.timestamp, timezone.utc).isoformat(timespec="milliseconds")
                if letter.timestamp is not None else "-")
        value = letter.value[:args.bytes].decode("utf-8", "replace")
        cut = f" ... ({letter.original_bytes or len(letter.value)} bytes)" if \
            (letter.original_bytes or len(letter.value)) > args.bytes else ""
        where = f"{letter.source}" + (f" row {letter.batch_index}" if letter.batch_index is not None else "")
        print(f"{when}\t{letter.reason}\t{letter.model_id or '-'}\t{where}\t{letter.detail}\t"
              f"{json.dumps(value, ensure_ascii=False)}{cut}", flush=True)
    if args.format == "json":
        print(json.dumps(collected, ensure_ascii=False, indent=1))
    elif args.format == "table":
        what = " ".join(f for f in (f"model {args.model}" if args.model else "",
                                    f"reason {args.reason}" if args.reason else "",
                                    f"in the last {args.since}" if args.since else "") if f)
        print(f"{shown} dead letter(s){' (' + what + ')' if what else ''} on {settings.dlq_topic}",
              file=sys.stderr)
    return 0


def cmd_query(args) -> int:
    settings = _settings(args)
    answer = ask(settings, args.sql)
    columns, rows = answer.columns, answer.rows
    if args.format in ("json", "jsonl"):

        objects = [dict(zip(columns, row)) for row in rows]
        if args.format == "json":  # one document: a list of row objects
            print(json.dumps(objects, default=jsonable))
        else:  # JSON Lines: an object per row, for streaming into other tools
            for obj in objects:
                print(json.dumps(obj, default=jsonable))
    else:
        print(format_table(columns, rows))
    if answer.truncated:
        print(f"(cut at {answer.row_limit:,} rows: ENRICHER_QUERY_MAX_ROWS; add a LIMIT or aggregate)",
              file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from enricher.demo import run_demo  # lazy: confluent_kafka, pyarrow

    return run_demo(args)


# -- parser ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enricher", description="Stream-processing inference enrichment.")
    p.add_argument("--data-dir", help="registry, artifacts and embedded store (ENRICHER_DATA_DIR)")
    p.add_argument("--broker", help="kafka://HOST:PORT (ENRICHER_BROKER; unset: the embedded broker)")
    p.add_argument("--clickhouse-url", help="chdb:///PATH or http(s)://USER:PASSWORD@HOST:PORT/DB "
                                            "(ENRICHER_CLICKHOUSE_URL)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) in the foreground")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, default=9092)
    b.add_argument("--storage", default="memory://tansu/",
                   help="memory://tansu/ (lost on stop) or s3://BUCKET/ (kept; Tansu reads AWS_ENDPOINT, "
                        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ALLOW_HTTP)")
    b.set_defaults(func=cmd_broker)

    m = sub.add_parser("models", help="register, list and show models").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    r = m.add_parser("register", help="register a model (or update its schema and reference data)")
    r.add_argument("model_id")
    r.add_argument("--schema", required=True, help="JSON schema file")
    r.add_argument("--reference", required=True, help="reference data, .parquet or .csv")
    r.add_argument("--model-file", help="the model itself, to explain exactly instead of a surrogate: XGBoost JSON "
                                        "(.json), XGBoost UBJSON (.ubj), LightGBM text (.txt) or scikit-learn through skops "
                                        "(.skops); never a pickle")
    r.set_defaults(func=cmd_models_register)
    m.add_parser("list", help="registered models").set_defaults(func=cmd_models_list)
    m.add_parser("copy-registry", help="copy DATA_DIR/registry into the control store ENRICHER_CONTROL_STORE "
                                       "names (moving to clickhouse)").set_defaults(func=cmd_models_copy_registry)
    s = m.add_parser("show", help="a model's schema, enrichments and artifacts")
    s.add_argument("model_id")
    s.set_defaults(func=cmd_models_show)
    dr = m.add_parser("drop-rows", help="delete a model's enriched rows, labels and view (not its registration)")
    dr.add_argument("model_id")
    dr.add_argument("--yes", action="store_true", help="really delete")
    dr.set_defaults(func=cmd_models_drop_rows)

    for report in REPORTS.values():  # the window reports, one command each
        rp = sub.add_parser(report.command, help=report.help)
        rp.add_argument("model_id")
        rp.add_argument("--window", help=report.window_help)
        for name, text in report.options:
            rp.add_argument(f"--{name}", help=text)
        rp.add_argument("--end", help="the window's end: ISO-8601 or epoch seconds (default: now)")
        if report.plots:
            rp.add_argument("--plot", metavar="FILE", help="also write a chart as PNG")
        rp.add_argument("--format", choices=["table", "json"], default="table")
        rp.set_defaults(func=cmd_report, report=report.name)

    mg = sub.add_parser("migrate", help="copy rows of an earlier release's table layout (v1) into this one (v2)")
    mg.add_argument("--drop-legacy", action="store_true",
                    help="drop the v1 table once every row is checked in v2 (default: rename it inferences_v1)")
    mg.set_defaults(func=cmd_migrate)

    e = sub.add_parser("enrichments", help="turn enrichments on and off per model").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    es = e.add_parser("set", help="e.g. anomaly_detection=on anomaly_detection.n_estimators=200")
    es.add_argument("model_id")
    es.add_argument("assignments", nargs="+", metavar="NAME=on|off|NAME.SETTING=VALUE")
    es.set_defaults(func=cmd_enrichments_set)
    rt = e.add_parser("retrain", help="train enabled enrichments again (e.g. hotspots, from the latest labels) "
                                      "through the trigger")
    rt.add_argument("model_id")
    rt.add_argument("enrichment", nargs="*", help="which (default: every enabled one)")
    rt.set_defaults(func=cmd_enrichments_retrain)
    sh = e.add_parser("show", help="a model's enrichments and artifact versions")
    sh.add_argument("model_id")
    sh.set_defaults(func=cmd_enrichments_show)

    t = sub.add_parser("train", help="fit and publish models' enabled enrichments, locally (many in one process)")
    t.add_argument("model_ids", nargs="*", metavar="ID")
    t.add_argument("--all", action="store_true", help="every registered model with an enrichment on")
    t.add_argument("--jobs", type=int, help="processes fitting at once (default: the CPU count)")
    t.add_argument("--enrichment", action="append", help="only this one (repeatable)")
    t.set_defaults(func=cmd_train)

    sa = sub.add_parser("sample", help="the sample model (credit_default): register it, stream inferences "
                                       "and late labels (a stack's producer)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    sr = sa.add_parser("register", help="register it with 10,000 reference rows; --enable turns enrichments on")
    sr.add_argument("--enable", action="append", default=[], metavar="ENRICHMENT", help="repeatable")
    sr.set_defaults(func=cmd_sample_register)
    ss = sa.add_parser("stream", help="inferences at --rate a second, labels of some of them later")
    ss.add_argument("--rate", type=int, default=100, help="inferences a second (default 100)")
    ss.add_argument("--count", type=int, default=0, help="stop after this many (default 0: until stopped)")
    ss.add_argument("--label-share", type=float, default=0.8, help="share of inferences whose label is sent")
    ss.add_argument("--label-delay", type=float, default=30.0, help="seconds before a label is sent")
    ss.set_defaults(func=cmd_sample_stream)

    tr = sub.add_parser("trigger", help="watch toggles and registrations, launch training workflows")
    tr.add_argument("--runner", choices=["local", "argo"], help="ENRICHER_RUNNER (default local)")
    tr.set_defaults(func=cmd_trigger)

    pl = sub.add_parser("pipeline", help="one step of a training run (what each workflow step runs)")
    pl.add_argument("step", choices=["prepare", "train", "validate", "publish", "cleanup"])
    pl.add_argument("--model", help="the model of this step (every step but cleanup, which clears the whole run)")
    pl.add_argument("--run", required=True, help="the run's name (the workflow's)")
    pl.add_argument("--enrichment", help="train, validate, publish: the enrichment of this branch")
    pl.add_argument("--config", help="train: its settings, JSON")
    pl.set_defaults(func=cmd_pipeline)

    a = sub.add_parser("artifacts", help="list a model's artifact versions, roll back to one").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    al = a.add_parser("list", help="kept versions, the current one marked")
    al.add_argument("model_id")
    al.add_argument("enrichment", nargs="?")
    al.set_defaults(func=cmd_artifacts_list)
    ar = a.add_parser("rollback", help="serve an earlier kept version (verified first)")
    ar.add_argument("model_id")
    ar.add_argument("enrichment")
    ar.add_argument("version", help="e.g. 3 or v3")
    ar.set_defaults(func=cmd_artifacts_rollback)

    b = sub.add_parser("bias", help="bias mitigation's trade-off curves; choose another point").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    bc = b.add_parser("curve", help="accuracy against the gap between groups, per constraint, the serving point marked")
    bc.add_argument("model_id")
    bc.add_argument("--constraint", help="demographic_parity, equal_opportunity or equalized_odds (default: all)")
    bc.add_argument("--plot", metavar="FILE", help="also draw the curves as PNG")
    bc.add_argument("--format", choices=["table", "json"], default="table")
    bc.set_defaults(func=cmd_bias_curve)
    bs = b.add_parser("choose", help="serve another point of a curve: a new version, no retraining")
    bs.add_argument("model_id")
    bs.add_argument("--constraint", help="the curve (default: the serving constraint's)")
    bs.add_argument("--index", type=int, required=True, help="the point (see `enricher bias curve`)")
    bs.set_defaults(func=cmd_bias_choose)

    w = sub.add_parser("worker", help="consume inferences, enrich them, write them to ClickHouse")
    w.add_argument("--http-port", type=int, help="ENRICHER_HTTP_PORT")
    w.add_argument("--batch-size", type=int, help="ENRICHER_BATCH_SIZE")
    w.add_argument("--batch-timeout", type=float, help="ENRICHER_BATCH_TIMEOUT (seconds)")
    w.set_defaults(func=cmd_worker)

    pr = sub.add_parser("produce", help="send JSON-lines inferences (one per line) to the inference topic")
    pr.add_argument("file", help="a file, or - for standard input")
    pr.add_argument("--topic", help="default: ENRICHER_INFERENCE_TOPIC")
    pr.add_argument("--batch", choices=["json", "arrow", "none"], default="json",
                    help="many inferences per message as a JSON array (default) or an Arrow IPC stream, "
                         "or none: one per message")
    pr.add_argument("--batch-rows", type=int, default=1000, help="inferences per message at most")
    pr.add_argument("--check", action="store_true",
                    help="only say what the worker would refuse (by its own checks); send nothing")
    pr.set_defaults(func=cmd_produce)

    q = sub.add_parser("query", help="run a read-only SQL query against the enriched tables")
    q.add_argument("sql")
    q.add_argument("--format", choices=["table", "json", "jsonl"], default="table",
                   help="table; json: one document, a list of row objects; jsonl: an object per line")
    q.set_defaults(func=cmd_query)

    dl = sub.add_parser("deadletters", help="read the dead-letter topic: what was refused, why, from where")
    dl.add_argument("--model", help="only this model's")
    dl.add_argument("--reason", help="only this reason (e.g. missing_feature, unknown_model, invalid_json)")
    dl.add_argument("--since", help="only the last 30m, 1h, 7d, ...")
    dl.add_argument("--follow", "-f", action="store_true", help="keep reading new ones until Ctrl-C")
    dl.add_argument("--format", choices=["table", "json", "jsonl"], default="table",
                    help="table (tab-separated: time, reason, model, source, detail, value); json; jsonl")
    dl.add_argument("--bytes", type=int, default=200, help="table: show this much of each value (default 200)")
    dl.set_defaults(func=cmd_deadletters)

    sc = sub.add_parser("schema", help="SQL for a DBA to review and run on a ClickHouse server: the tables and "
                                       "the registered models' views (the worker runs the same on first use)")
    sc.add_argument("--cluster", metavar="NAME", help="for a replicated, sharded cluster: tables ON CLUSTER NAME, "
                                                      "Replicated engines, Distributed tables (default: "
                                                      "ENRICHER_CLICKHOUSE_CLUSTER; '' for one server)")
    sc.add_argument("--query-user", action="store_true",
                    help="the read-only user /query runs as on a server (ENRICHER_QUERY_USER, its password from "
                         "ENRICHER_QUERY_PASSWORD[_FILE]): settings profile with fixed limits, role, grants, user")
    sc.set_defaults(func=cmd_schema)

    d = sub.add_parser("demo", help="the whole flow on the embedded default, then a summary")
    d.add_argument("--inferences", type=int, default=100_000)
    d.add_argument("--port", type=int, default=0, help="embedded broker port (default: a free one)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. An EnricherError (something to fix: the message says what) exits 2
    without a traceback; any other exception is a bug and keeps its traceback (exit 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EnricherError as exc:
        print(f"enricher {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
