"""The ``pacs`` command.

Settings come from the environment and ``.env``; the options here override them for one
run (they are passed as overrides by environment name, so there is one parser).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from pacs.core import config
from pacs.core.audit import Participant
from pacs.core.errors import (
    ConfigError,
    InvalidInstance,
    MediaDirectory,
    NotFound,
    PacsError,
)
from pacs.core.ingest import Outcome

if TYPE_CHECKING:
    from pacs.core.reconcile import Report
    from pacs.core.services import Services

log = logging.getLogger("pacs")


def _setup_logging(level: str) -> None:
    """Log to stderr at ``level``, without data-set values at INFO and above
    (:mod:`pacs.core.logs`); the DIMSE workers forked later inherit it."""
    from pacs.core import logs

    logs.setup(level)


def _overrides(ctx: click.Context, **overrides: Any) -> dict[str, str]:
    """Global and command options, by environment name (unset ones left out)."""
    base: dict[str, str] = dict(ctx.obj or {})
    base.update({k: str(v) for k, v in overrides.items() if v is not None})
    return base


def _node_settings(ctx: click.Context, **overrides: Any) -> config.Settings:
    """The node's settings (every customer's start from them)."""
    base = _overrides(ctx, **overrides)
    try:
        return config.load(overrides=base)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None


def _customers(settings: config.Settings) -> tuple[Any, ...]:
    """Every customer of the node (:func:`pacs.core.customers.customers`)."""
    from pacs.core.customers import customers

    try:
        return customers(settings)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None


def _settings(ctx: click.Context, **overrides: Any) -> config.Settings:
    """The settings of the customer a command acts on: ``--customer`` (``CUSTOMER``),
    one of ``PACS_CUSTOMERS_FILE`` when there is one."""
    from pacs.core.customers import chosen

    settings = _node_settings(ctx, **overrides)
    try:
        return chosen(settings).settings
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None


def _customer_option(command: Any) -> Any:
    """``--customer NAME`` on a command that acts on one customer (as the group's)."""
    def store(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.obj = {**(ctx.obj or {}), "CUSTOMER": value}

    return click.option("--customer", expose_value=False, callback=store,
                        help="The customer to act on (default: CUSTOMER).")(command)


@click.group()
@click.option("--customer", help="Customer name (CUSTOMER).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder (PACS_DATA_DIR).")
@click.option("--storage", type=click.Choice(["file", "s3"]), help="Object store (PACS_STORAGE).")
@click.version_option(package_name="pacs")
@click.pass_context
def main(ctx: click.Context, customer: str | None, data_dir: str | None,
         storage: str | None) -> None:
    """pacs: a DIMSE-first PACS node (C-STORE, C-FIND, C-MOVE, C-GET, DICOMweb)."""
    ctx.obj = {k: v for k, v in {"CUSTOMER": customer, "PACS_DATA_DIR": data_dir,
                                 "PACS_STORAGE": storage}.items() if v is not None}
    _interrupted_by(signal.SIGTERM, signal.SIGHUP)


def _interrupted_by(*signals: signal.Signals) -> None:
    """Stop a command on these signals as on Ctrl-C: by the same path, its exception
    handlers and clean-up run (an interrupted ``pacs delete`` reports itself stopped
    and forgets what it had not done, where a plain SIGTERM or a closed terminal
    killed it with its removal left pending, finished silently at the next start).
    ``pacs serve`` sets its own."""
    def interrupt(number: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {number}")

    if threading.current_thread() is threading.main_thread():
        for number in signals:
            if signal.getsignal(number) is not signal.SIG_IGN:  # nohup's stays
                signal.signal(number, interrupt)


@main.command("config")
@_customer_option
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective settings (secrets masked)."""
    settings = _settings(ctx)
    for name, value in settings.describe():
        click.echo(f"{name}={value}")


def _require_index(settings: config.Settings) -> None:
    """Refuse a command that reads the index when there is none, rather than make an
    empty one (a wrong PACS_DATA_DIR or --customer answered "nothing there"), or when
    its file is empty: made into an empty index here, it would pass for a valid one
    and let the node start over a store whose objects it hides (as
    :func:`_refuse_lost_index` refuses)."""
    missing = _index_missing(settings.index_path)
    if missing:
        raise click.ClickException(f"{missing}: check PACS_DATA_DIR and --customer "
                                   "('pacs reindex' builds one from the store)")


def _index_missing(path: Path) -> str | None:
    """Why there is no index at ``path`` to read (none, or an empty file), or ``None``."""
    if not path.exists():
        return f"no index at {path}"
    if path.stat().st_size == 0:
        return f"the index file {path} is empty"
    return None


def _refuse_lost_index(settings: config.Settings) -> None:
    """Refuse to start (or to import) with no index (or an empty file) over a store
    that holds objects: a new empty index would answer every query with nothing, every
    acknowledged instance out of sight (a damaged index moved aside, a wrong
    PACS_DATA_DIR with the store of another), and an import into it would write over
    objects it cannot see.  A first start, over an empty store, goes on."""
    path = settings.index_path
    if path.exists() and path.stat().st_size > 0:
        return
    from pacs.core.storage import open_store

    try:
        held = next(iter(open_store(settings, check=False, create=False).keys()), None)
    except Exception:  # noqa: BLE001 - not there or not reachable: the build says so
        return
    if held is not None:
        raise click.ClickException(
            f"no index at {path}, but the object store holds objects: 'pacs reindex' "
            "builds the index from them (or check PACS_DATA_DIR and --customer)")


def _build(settings: config.Settings, check_store: bool = True,
           create_store: bool = True, claim: bool = False) -> Any:
    from pacs.core.services import build

    try:
        _refuse_upgrade_beside_a_node(settings)
        return build(settings, check_store=check_store, create_store=create_store,
                     claim=claim)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None


def _refuse_upgrade_beside_a_node(settings: config.Settings) -> None:
    """Refuse to open an index of an older schema that another process has open (a
    node of the previous pacs): opening it would upgrade it under that node, whose
    processes then refuse it as newer than they are (a restarted mover would never
    drain the intake).  Asked before this process opens the index.

    Raises
    ------
    ConfigError
        The index is older than this pacs and in use.
    """
    from pacs.core.index.migrations import MIGRATIONS, stored_version
    from pacs.core.reindex import index_in_use

    path = settings.index_path
    if not path.exists() or not index_in_use(path):
        return
    version = stored_version(path)
    if version < len(MIGRATIONS):
        raise ConfigError(
            f"the index {path} is of schema {version}, this pacs of {len(MIGRATIONS)}, "
            "and another process (a running node) has it open: use that node's pacs, "
            "or stop it and let this one upgrade the index")


@main.command()
@click.option("--port", type=int, help="DIMSE port (PACS_DIMSE_PORT).")
@click.option("--web-port", type=int, help="DICOMweb port (PACS_WEB_PORT).")
@click.option("--ae-title", help="Called AE title (PACS_AE_TITLE).")
@click.option("--bind", "bind_address", help="Listen address (PACS_BIND_ADDRESS).")
@click.option("--workers", type=click.IntRange(min=0),
              help="DIMSE worker processes (PACS_DIMSE_WORKERS).")
@click.pass_context
def serve(ctx: click.Context, port: int | None, web_port: int | None, ae_title: str | None,
          bind_address: str | None, workers: int | None) -> None:
    """Run the node (DIMSE and DICOMweb) until SIGTERM or Ctrl-C."""
    overrides = _overrides(ctx, PACS_DIMSE_PORT=port, PACS_WEB_PORT=web_port,
                           PACS_AE_TITLE=ae_title, PACS_BIND_ADDRESS=bind_address,
                           PACS_DIMSE_WORKERS=workers)
    settings = _node_settings(ctx, **overrides)
    _setup_logging(settings.log_level)
    from pacs.core.reconcile import reconcile
    from pacs.dimse import tls as dimse_tls
    from pacs.dimse.server import describe, run_workers
    from pacs.node import tls
    from pacs.node.webserver import WebServer

    try:  # the workers load them again: a broken file stops us here, not them
        config.check_dimse_listeners(settings)
        tls.server_context(settings)
        dimse_tls.server_context(settings)
        dimse_tls.client_context(settings)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None
    served = _customers(settings)
    for customer in served:
        _refuse_lost_index(customer.settings)
        shared = _index_shared(customer.settings)  # asked before this process opens it
        services = _build(customer.settings, claim=True)
        try:
            unproven = dimse_tls.unproven_titles(customer.settings, services.access)
        except PacsError as exc:
            raise click.ClickException(str(exc)) from None
        if unproven and not customer.settings.dimse_tls_port:
            log.warning("customer %s: %s must associate over DICOM TLS, which this node "
                        "does not serve (PACS_DIMSE_TLS_PORT): they cannot associate",
                        customer.name, ", ".join(unproven))
        elif unproven:
            log.warning("customer %s: %s must associate over DICOM TLS, but without "
                        "PACS_DIMSE_TLS_CA no client certificate is asked for: TLS "
                        "encrypts their associations, any TLS peer may call by their "
                        "titles", customer.name, ", ".join(unproven))
        if shared:
            # Another node on this data folder (it keeps the ports, and this one stops
            # when it cannot bind them), or a command at work: its temporary files and
            # pending removals are writes in progress, not ones a stop cut short.
            log.warning("customer %s: another process has the index open; the start-up "
                        "clean-up of interrupted writes is left out", customer.name)
        else:
            _clean_up(customer.name, reconcile(services, full=False))
        # Forwarding starts with what arrives from now on, not when its companion runs;
        # a start without routes forwards nothing it stores, ever.
        from pacs.node.forwarder import check_destinations, outbox_of
        try:
            if customer.settings.routes:
                check_destinations(services)
                outbox_of(services).start()
            else:
                outbox_of(services).unrouted()
        except PacsError as exc:
            raise click.ClickException(str(exc)) from None
        services.close()  # workers open their own after the fork
        log.info("customer %s (%s), data in %s, %s storage", customer.name,
                 ", ".join(customer.ae_titles), customer.settings.data_dir,
                 customer.settings.storage)

    from pacs.core.net import SERVE_PID, stop_on_signals

    stopping = threading.Event()
    stop_on_signals(stopping)
    # The web workers read the settings themselves: give them this run's overrides,
    # and the data folder and customers file as resolved here (they need not share our
    # working folder).

    environment = {**overrides, "PACS_DATA_DIR": str(settings.data_dir),
                   SERVE_PID: str(os.getpid())}
    if settings.customers_file:
        environment["PACS_CUSTOMERS_FILE"] = str(Path(settings.customers_file).absolute())
    web = WebServer(settings, environment)
    try:
        web.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on port {settings.web_port}: {exc}") from exc
    web.watch(stopping)
    # The OHIF viewer server and the upload-folder watcher: optional companions that are
    # restarted when they fail and never stop the node.
    from pacs.node.companions import start_companions
    companions = start_companions(settings, served, environment, stopping)
    try:
        run_workers(settings, stopping)
    except OSError as exc:
        stopping.set()
        raise click.ClickException(
            f"cannot listen on the DIMSE ports ({describe(settings)}): {exc}") from exc
    finally:
        stopping.set()
        web.stop()
        companions.stop()
    log.info("stopped")


def _index_shared(settings: config.Settings) -> bool:
    """True when another process has the customer's index open
    (:func:`pacs.core.reindex.index_in_use`)."""
    from pacs.core.reindex import index_in_use

    try:
        return index_in_use(settings.index_path)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None


def _clean_up(customer: str, report: Report) -> None:
    """Log what the start-up clean-up (:func:`pacs.core.reconcile.reconcile`, not
    ``full``) did for ``customer``."""
    from pacs.core.reconcile import Action

    if report.temporaries:
        log.info("customer %s: removed %d temporary file(s) of interrupted writes",
                 customer, report.temporaries)
    finished = report.count(Action.FINISH)
    if finished or report.left:
        log.warning("customer %s: finished %d removal(s) (rejection notes, "
                    "deletions) that a stop cut short; %d could not be (see "
                    "'pacs fsck')", customer, finished, len(report.left))


def import_files(paths: tuple[str, ...],
                 unreadable: list[tuple[Path, str]]) -> Iterator[tuple[Path, Path | None]]:
    """Each file ``pacs import`` is given, and the named folder it was found in
    (``None``: named itself).

    A path named on the command line is followed (the operator chose it); below a named
    folder, a link (to a file or a folder) is yielded as itself, to be refused, never
    followed, since a folder may hold links to anywhere; the file is opened from that
    folder one name at a time (:meth:`pacs.core.ingest.Ingest.store_file`), so that a
    folder swapped for a link after the walk is not followed either.  A folder that
    cannot be read is added to ``unreadable`` with why, so that what it holds is
    reported as not imported rather than passed over in silence.
    """
    from pacs.core.walk import walk

    for name in paths:
        path = Path(name)
        if not path.is_dir():
            yield path, None
            continue

        def skipped(exc: OSError, top: Path = path) -> None:
            unreadable.append((Path(exc.filename or top), exc.strerror or str(exc)))

        for dirpath, dirs, files in walk(path, onerror=skipped):
            links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
            dirs[:] = sorted(d for d in dirs if d not in links)
            for file in sorted(files + links):
                yield Path(dirpath) / file, path


@main.command("import")
@_customer_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def import_(ctx: click.Context, paths: tuple[str, ...], quiet: bool) -> None:
    """Store files and folders (recursively) through the ingest path.

    What is acknowledged through the intake is moved to the object store before the
    command ends (unless a running node's mover does it).  The audit trail records a
    Data Import per patient, the operator as its requestor.
    """
    from tqdm import tqdm

    from pacs.core import audit
    from pacs.core.ingest import record_import
    from pacs.core.logs import shown
    from pacs.core.services import drain

    settings = _settings(ctx)
    _setup_logging("WARNING")
    _refuse_lost_index(settings)  # an index made now would hide what the store holds
    services = _build(settings)
    importing = audit.ImportAudit(services.audit, [_operator(), services.audit.node()],
                                  _host_files(), "pacs import")
    rejected: list[tuple[Path, str]] = []
    files = list(import_files(paths, rejected))
    importing.failed(len(rejected))  # folders that could not be read
    tally: Counter[str] = Counter()
    gone = directories = 0
    try:
        for path, within in tqdm(files, unit="file", disable=quiet, file=sys.stderr):
            refused = len(rejected)
            try:
                result = services.ingest.store_file(path, calling_ae="", within=within)
                tally[result.outcome.value] += 1
                record_import(importing, result)
            except FileNotFoundError:
                # Removed since the folder was listed (an upload folder's watcher
                # took it, say): nothing wrong with the file, nothing stored here.
                gone += 1
            except OSError as exc:  # its name is shown once, escaped, below
                rejected.append((path, exc.strerror or type(exc).__name__))
            except MediaDirectory:  # a CD's DICOMDIR: its images are files of their own
                directories += 1
            except InvalidInstance as exc:
                rejected.append((path, str(exc)))
            except PacsError as exc:
                rejected.append((path, str(exc)))
            except Exception as exc:  # a fault on one file: the others go on
                log.debug("import of %s failed", shown(str(path)), exc_info=True)
                rejected.append((path, f"failed unexpectedly ({type(exc).__name__})"))
            importing.failed(len(rejected) - refused)
        try:
            drain(services)
        except PacsError as exc:
            click.echo(f"the objects stored are safe in the index's intake, not yet in the "
                       f"object store ({exc}); the node's mover, or the next import, stores "
                       "them", err=True)
    finally:
        importing.write()  # what was stored is recorded even when the import was cut short
        services.close()
    replaced = tally[Outcome.REPLACED.value]
    click.echo(f"stored: {tally[Outcome.STORED.value] + replaced}"
               + (f" (replacing a different object: {replaced})" if replaced else "") + ", "
               f"unchanged duplicates: {tally[Outcome.UNCHANGED.value]}, "
               f"kept first (different duplicates): {tally[Outcome.KEPT_FIRST.value]}, "
               f"rejected: {len(rejected)}"
               + (f", gone before they were read: {gone}" if gone else "")
               + (f", DICOMDIRs passed over: {directories}" if directories else ""))
    for path, reason in rejected:
        # One line per file whatever its name holds (a newline, bytes not UTF-8).
        click.echo(f"rejected {shown(str(path))}: {reason}")
    if rejected:
        sys.exit(1)


@main.command()
@_customer_option
@click.option("--repair", is_flag=True,
              help="Carry out the actions (default: only report what they would be).")
@click.option("--quick", is_flag=True,
              help="Compare each indexed object's size, not its checksum (reads nothing).")
@click.option("--allow-mass-drop", is_flag=True,
              help="With --repair: act even when the store lists no objects or lacks more "
                   "than half of the indexed ones (their rows are dropped); only when "
                   "those objects are known to be gone.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@click.pass_context
def fsck(ctx: click.Context, repair: bool, quick: bool, allow_mass_drop: bool,
         as_json: bool) -> None:
    """Find what crashes left between the index and the store; repair with --repair.

    The index row of each SOP Instance UID is what was acknowledged last: an object
    it does not name is indexed only when the UID has no row (else quarantined), and
    objects are moved to the quarantine, never deleted.  Safe beside a running node.
    Creates nothing it checks: a missing index, object folder or bucket is an error.
    Repair changes nothing when the store lists no objects or lacks more than half of
    the indexed ones (a folder not mounted, a wrong bucket), unless --allow-mass-drop.
    Exits 1 when problems are left (always after a dry run that found some) or repair
    was refused.
    """
    import json

    from pacs.core.reconcile import reconcile

    settings = _settings(ctx)
    _setup_logging(settings.log_level)
    _require_index(settings)
    services = _build(settings, create_store=False)
    try:
        report = reconcile(services, full=True, repair=repair, checksums=not quick,
                           allow_mass_drop=allow_mass_drop)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        services.close()
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=1))
    else:
        for line in report.lines():
            click.echo(line)
    if not report.ok:
        sys.exit(1)



@main.command()
@_customer_option
@click.option("--jobs", type=click.IntRange(min=0),
              help="Analysis helper processes (default: one per CPU; 0: in this process).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
@click.option("--allow-mass-drop", is_flag=True,
              help="Rebuild even from a store that lists far fewer objects than the "
                   "index holds (none, or under half).")
@click.pass_context
def reindex(ctx: click.Context, jobs: int | None, quiet: bool, as_json: bool,
            allow_mass_drop: bool) -> None:
    """Rebuild the index from the object store alone (a replaced node).

    Every stored object is analysed as at ingest and indexed in a new index file,
    which replaces the index only once complete (the previous one is kept beside it).
    Refuses while a node, or another command, has the index open, and, unless
    --allow-mass-drop, when the store lists far fewer objects than the index holds (a
    folder not mounted, a wrong bucket), before anything is moved to it.  Objects that
    are not readable instances are reported and left in place.  Exits 1 when any was
    left out.
    """
    import json

    from tqdm import tqdm

    from pacs.core.analysers import AnalyserPool
    from pacs.core.dataset import quiet_pydicom
    from pacs.core.reindex import index_in_use, rebuild, refuse_implausible
    from pacs.core.storage import open_store

    settings = _settings(ctx)
    _setup_logging("WARNING")
    quiet_pydicom()
    try:
        # The store the index describes, or none: a wrong name must not make one.
        store = open_store(settings, create=False)
        # A running node's index: the rebuild refuses it, naming it.  Otherwise, before
        # the intake's objects are moved to a store that may not be the node's (the
        # rebuild asks again once it has listed it).
        if settings.index_path.exists() and not index_in_use(settings.index_path):
            listed = sum(1 for _key in iter(store.keys()))  # an ObjectStore, no dict
            refuse_implausible(settings.index_path, listed, allow_mass_drop)
            _drain_intake(settings)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None
    analysers = AnalyserPool(os.cpu_count() or 1 if jobs is None else jobs,
                             settings.max_object_bytes)
    bar = tqdm(unit="object", disable=quiet, file=sys.stderr)
    try:
        report = rebuild(settings.index_path, store, analysers,
                         on_total=lambda total: bar.reset(total=total),
                         on_object=lambda: bar.update(), allow_mass_drop=allow_mass_drop,
                         customer=settings.customer)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()
        analysers.close()
        store.close()
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=1))
    else:
        for line in report.lines():
            click.echo(line)
    if report.skipped:
        sys.exit(1)

@main.command()
@_customer_option
@click.argument("targets", nargs=-1, required=True, metavar="STUDY[/SERIES[/SOP]]...")
@click.option("--yes", is_flag=True, help="Remove them (default: only show what would go).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def delete(ctx: click.Context, targets: tuple[str, ...], yes: bool, quiet: bool) -> None:
    """Remove studies, series or instances: index rows and objects together.

    A dry run unless --yes: it prints what would go (counts and sizes, by UID).  Safe
    beside a running node.  Each removed instance keeps a tombstone (so 'pacs fsck'
    never brings it back) and the removal is in the audit trail.  Exits 1, removing
    nothing, when a target names nothing.
    """
    from tqdm import tqdm

    from pacs.core import audit
    from pacs.core.deletion import Target, reference

    try:
        parsed = [Target.parse(text) for text in targets]
    except PacsError as exc:
        raise click.BadParameter(str(exc), param_hint="STUDY[/SERIES[/SOP]]") from None
    settings = _settings(ctx)
    _setup_logging(settings.log_level if yes else "WARNING")
    _require_index(settings)
    services = _build(settings, create_store=False)
    try:
        rows, missing = [], []
        for target in parsed:
            try:
                rows.append(services.deleter.plan([target]))
            except NotFound:
                missing.append(target)
        for target, found in zip([t for t in parsed if t not in missing], rows, strict=True):
            click.echo(f"{target.level} {target}: {_tally(found)}")
        for target in missing:
            click.echo(f"{target.level} {target}: not found")
        places = {row.sop_uid: reference(row) for found in rows for row in found}
        if missing:
            raise click.ClickException("nothing removed: a target names nothing")
        if not yes:
            click.echo(f"dry run: nothing removed ({len(places)} instance(s) would go); "
                       "'pacs delete --yes' removes them")
            return
        who = _operator()
        with tqdm(total=len(places), unit="instance", disable=quiet, file=sys.stderr) as bar:
            removal = services.deleter.remove(list(places.values()), who,
                                              audit.APPLICATION_SERVER, progress=bar.update)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        services.close()
    click.echo(f"removed {removal.summary()}")


@main.command()
@click.argument("studies", nargs=-1, metavar="STUDY_UID...")
@click.option("--to", "destination", required=True, metavar="AET|URL",
              help="An AE title of PACS_MODALITIES (C-STORE) or a DICOMweb base URL "
                   "(STOW-RS to URL/studies).")
@click.option("--requeue", is_flag=True,
              help="Instead: put the instances this destination refused back in the "
                   "forwarding outbox (the running node sends them again).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def send(ctx: click.Context, studies: tuple[str, ...], destination: str, requeue: bool,
         quiet: bool) -> None:
    """Send studies to another archive now, as the forwarder does (batches of
    PACS_FORWARD_BATCH, each in the audit trail).

    Exits 1 when an instance was not delivered (nothing is queued for later; run it
    again), or a study is not here.
    """
    from pacs.core.forwarding import Result
    from pacs.core.routes import shown
    from pacs.node.forwarder import outbox_of, send_now, study_instances

    if bool(studies) == requeue:
        raise click.UsageError("give STUDY_UIDs to send, or --requeue alone")
    settings = _settings(ctx)
    _setup_logging(settings.log_level)
    _require_index(settings)
    services = _build(settings, create_store=False)
    try:
        if requeue:
            count = outbox_of(services).retry_failed(shown(destination))
            click.echo(f"{count} refused instance(s) queued again for {shown(destination)}")
            return
        refs = study_instances(services, studies)
        who = _operator()  # the requestor of each batch's event, as for pacs delete
        if quiet:
            counts = send_now(services, destination, refs, requestor=who)
        else:
            with click.progressbar(length=len(refs), label=f"to {shown(destination)}",
                                   file=sys.stderr, show_pos=True) as bar:
                counts = send_now(services, destination, refs, bar.update, who)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        services.close()
    missed = counts[Result.REFUSED] + counts[Result.RETRY]
    click.echo(f"{counts[Result.SENT]} of {len(refs)} instance(s) sent to "
               f"{shown(destination)}; {counts[Result.REFUSED]} refused, "
               f"{counts[Result.RETRY]} not delivered")
    if missed:
        sys.exit(1)


def _audit_query(services: Services, level: str, keys: tuple[str, ...], description: str,
                 found: bool = False) -> None:
    """The Query event of ``pacs query`` (PS3.15 A.5.3.10), as C-FIND and QIDO-RS have
    theirs: its operator, the command's keys as the query, their tags; ``found``: it
    succeeded."""
    from adapters.http.audit import STUDY_ROOT_FIND
    from pacs.core import audit
    from pacs.core.attributes import BY_KEYWORD

    outcome = audit.SUCCESS if found else audit.MINOR_FAILURE
    text = " ".join(("pacs query", level, *keys)).encode("utf-8")
    tags = [f"{BY_KEYWORD[item.partition('=')[0]].tag:08X}" for item in keys]
    services.audit.query(audit.APPLICATION_SERVER, _operator(), STUDY_ROOT_FIND, text,
                         tags, outcome, f"pacs query: {description}")


def _operator() -> Participant:
    """The person running this command, as the audit trail names a requestor: the
    login name, at this host; ``uid:<n>`` when the user has none (a container run with
    a user id of the host's, ``DOCKER_UID``, has no passwd entry): the trail never keeps
    a command from running."""
    import getpass
    import socket

    try:
        name = getpass.getuser()
    except Exception:  # noqa: BLE001 - KeyError or OSError: no name for this user id
        name = f"uid:{os.getuid()}"
    return Participant(name, True, address=socket.gethostname())


def _host_files() -> Participant:
    """The Source Media of ``pacs import``'s events: this host's file system
    (``file://host/``), not the paths the operator named, which may name a patient."""
    import socket

    from pacs.core import audit

    return audit.source_media(f"file://{socket.gethostname()}/")


def _tally(rows: list[Any]) -> str:
    """Studies, series, instances and bytes of a removal's rows."""
    studies = {row.study_uid for row in rows}
    series = {row.series_uid for row in rows}
    size = sum(row.size for row in rows)
    return (f"{len(studies)} stud(ies), {len(series)} series, {len(rows)} instance(s), "
            f"{size} bytes ({size / 2**20:.1f} MiB)")


def _drain_intake(settings: config.Settings) -> None:
    """Finish what the node's start-up finishes (removals a crash cut short) and move
    what the index's intake holds to the store (a rebuild reads the store alone),
    unless a node has the index open (the rebuild then refuses, naming it)."""
    from pacs.core.reconcile import reconcile
    from pacs.core.reindex import index_in_use
    from pacs.core.services import build, drain

    if index_in_use(settings.index_path):
        return
    services = build(settings)
    try:
        reconcile(services, full=False)
        drain(services)
    finally:
        services.close()


#: Columns ``pacs query`` shows per level, left to right.
QUERY_COLUMNS = {
    "patient": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"),
    "study": ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyDescription",
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "StudyInstanceUID"),
    "series": ("StudyInstanceUID", "SeriesNumber", "Modality", "SeriesDescription",
               "NumberOfSeriesRelatedInstances", "SeriesInstanceUID"),
    "image": ("SeriesInstanceUID", "InstanceNumber", "SOPClassUID", "SOPInstanceUID"),
}


@main.command()
@_customer_option
@click.option("--level", type=click.Choice(list(QUERY_COLUMNS)), default="study",
              show_default=True, help="What to list.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Rows at most.")
@click.argument("keys", nargs=-1)
@click.pass_context
def query(ctx: click.Context, level: str, limit: int, keys: tuple[str, ...]) -> None:
    """List patients, studies, series or instances, matched like C-FIND.

    KEYS are KEYWORD=VALUE pairs with the C-FIND value syntax, e.g.
    PatientName='DOE*' StudyDate=20150101-20151231 ModalitiesInStudy=CT.
    """
    from pacs.core.attributes import BY_KEYWORD, Level
    from pacs.core.query.matching import constraint
    from pacs.core.query.model import Query

    constraints = []
    for item in keys:
        keyword, sep, value = item.partition("=")
        if not sep or keyword not in BY_KEYWORD:
            raise click.BadParameter(f"{item!r}: expected KEYWORD=VALUE with a known keyword")
        try:
            found = constraint(BY_KEYWORD[keyword], value)
        except PacsError as exc:
            raise click.BadParameter(str(exc)) from None
        if found is not None:
            constraints.append(found)
    columns = QUERY_COLUMNS[level]
    request = Query(level=Level[level.upper()], constraints=tuple(constraints),
                    return_keys=tuple(BY_KEYWORD[c] for c in columns), limit=limit)
    settings = _settings(ctx)
    _require_index(settings)
    services = _build(settings, create_store=False)
    try:
        rows = [[r.values.get(c) or "" for c in columns] for r in services.engine.find(request)]
    except PacsError as exc:
        _audit_query(services, level, keys, str(exc))
        raise click.ClickException(str(exc)) from None
    else:
        _audit_query(services, level, keys, f"{len(rows)} {level} rows", found=True)
    finally:
        services.close()
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    click.echo(f"({len(rows)} {level} row{'s' if len(rows) != 1 else ''})")


@main.command()
@_customer_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (as GET /health).")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Store reachable, index healthy, counts per level, bytes stored, disk, uploads:
    of each customer (of the one --customer names).

    Exits 1 when a store cannot be used or an index check fails.
    """
    import json

    from pacs.core import health
    from pacs.core.customers import chosen
    from pacs.node.status import describe

    node = _node_settings(ctx)
    served = _customers(node)
    if "CUSTOMER" in (ctx.obj or {}):
        try:
            served = (chosen(node),)
        except PacsError as exc:
            raise click.ClickException(str(exc)) from None
    results = {}
    for customer in served:
        missing = _index_missing(customer.settings.index_path)
        if missing:
            # A wrong PACS_DATA_DIR (or --customer) is reported, not made a customer
            # with an empty index that the other commands would then take for one.
            results[customer.name] = health.Health(
                store=customer.settings.storage, store_reachable=False,
                store_error="not checked: no index", index=f"missing: {missing}")
            continue
        # An unreachable store is what the check reports (with the intake's backlog
        # waiting for it), not a reason to stop before it.
        services = _build(customer.settings, check_store=False)
        try:
            results[customer.name] = health.check(services, thorough=True)
        finally:
            services.close()
    ok = all(found.ok for found in results.values())
    several = bool(node.customers_file) and len(served) > 1
    if as_json:
        data: Any = ({name: found.as_json() for name, found in results.items()} if several
                     else next(iter(results.values())).as_json())
        click.echo(json.dumps({"customers": data} if several else data, indent=1))
    else:
        for customer in served:
            if several:
                click.echo(f"customer {customer.name} (AE titles "
                           f"{', '.join(customer.ae_titles)}"
                           + (f"; hosts {', '.join(customer.hosts)}" if customer.hosts
                              else "") + ")")
            for line in describe(customer.settings, results[customer.name]):
                click.echo(f"  {line}" if several else line)
    if not ok:
        sys.exit(1)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown",
              show_default=True, help="Markdown (PS3.2 layout) or JSON.")
@click.option("--defaults", is_flag=True,
              help="The statement of the default settings, ignoring the environment and "
                   ".env (docs/conformance.md is this).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write to this file instead of standard output.")
@click.pass_context
def conformance(ctx: click.Context, fmt: str, defaults: bool, output: str | None) -> None:
    """Print the DICOM Conformance Statement (PS3.2) of the node with these settings.

    Generated from what the node negotiates and serves: its presentation contexts,
    extended negotiation, limits, DICOMweb routes and media types.
    """
    from pacs.node import conformance as statement

    settings = config.load(environ={}, env_file=None) if defaults else _node_settings(ctx)
    text = statement.render(statement.statement(settings), fmt)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--token", is_flag=True,
              help="Make a random bearer token instead: print it once, and its hash.")
def passwd(token: bool) -> None:
    """Print the hash of a password (asked twice, never echoed) for a user of
    PACS_ACCESS_FILE: ``password = "<hash>"``.  With --token, a new bearer token and
    the hash to list in the user's ``tokens`` (README, "Security").
    """
    from pacs.core import access

    if token:
        secret = access.new_token()
        click.echo(f"token (give it to its user; it is not stored): {secret}")
        click.echo(f'tokens = ["{access.hash_token(secret)}"]')
        return
    password = click.prompt("Password", hide_input=True, confirmation_prompt=True,
                            err=True)
    if not password:
        raise click.ClickException("an empty password")
    click.echo(f'password = "{access.hash_password(password)}"')


@main.command("audit")
@_customer_option
@click.option("--study", default="", help="Only events naming this Study Instance UID.")
@click.option("--patient", default="", help="Only events naming this Patient ID.")
@click.option("--user", default="", help="Only events with this participant (an AE title, "
                                         "an HTTP user, token, loopback).")
@click.option("--since", default="", help="Only events from this UTC date or date and time "
                                          "on (2024-05-01, 2024-05-01T12:00).")
@click.option("--format", "fmt", type=click.Choice(["summary", "json", "xml"]),
              default="summary", show_default=True,
              help="One line per event, the trail's JSON lines, or DICOM XML (PS3.15 A.5.1).")
@click.option("--syslog", "target", metavar="HOST:PORT",
              help="Send the events to an audit record repository instead: RFC 5424 "
                   "syslog with the DICOM XML, over TCP (octet counting) or --udp.")
@click.option("--udp", is_flag=True, help="With --syslog: UDP datagrams (RFC 5426).")
@click.option("--tls", "over_tls", is_flag=True,
              help="With --syslog: over TLS (RFC 5425), the repository's certificate "
                   "verified against --ca (else the system's authorities) and its host "
                   "name; the node's certificate (PACS_TLS_CERT) offered as the client's.")
@click.option("--ca", type=click.Path(dir_okay=False), default=None,
              help="With --tls: the authority that issued the repository's certificate.")
@click.option("--insecure", is_flag=True,
              help="With --syslog: send in the clear (TCP or UDP) to another host than "
                   "this one; the events hold Patient IDs and queries.")
@click.pass_context
def audit_(ctx: click.Context, study: str, patient: str, user: str, since: str, fmt: str,
           target: str | None, udp: bool, over_tls: bool, ca: str | None,
           insecure: bool) -> None:
    """Show the audit trail (who touched which patient's images), or ship it.

    Reads PACS_AUDIT_LOG (the data folder's audit.jsonl by default), the events of the
    customer acted on (a trail shared by several customers holds each one's); lines
    that are not an event (cut short by a full disk) are counted on standard error.
    The reading is recorded in the trail afterwards (Audit Log Used, naming the
    operator and the filters given).
    """
    import json

    from pacs.core import audit

    settings = _settings(ctx)
    path = audit.audit_path(settings.audit_log, settings.data_dir)
    if path is None:
        raise click.ClickException("the audit trail is off (PACS_AUDIT_LOG=off)")
    try:
        lower = audit.parse_since(since) if since else ""
    except ValueError:
        raise click.BadParameter(f"not a date or date and time: {since}",
                                 param_hint="--since") from None
    host, _, port = (target or "").rpartition(":")
    if target and (not host or not port.isdigit()):
        raise click.BadParameter("expected HOST:PORT", param_hint="--syslog")
    tls_context = _syslog_tls(settings, host.strip("[]"), udp, over_tls, ca, insecure) \
        if target else None
    filters = {name: value for name, value in (("study", study), ("patient", patient),
                                                ("user", user), ("since", since)) if value}
    try:
        trail: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed below, events streamed
    except FileNotFoundError:
        trail = io.BytesIO()
    with trail:
        chosen = _Chosen(audit.read_events(trail), lower, settings.customer,
                         {"study": study, "patient": patient, "user": user})
        if target:
            try:
                sent = audit.ship(chosen, host.strip("[]"), int(port), udp=udp,
                                  tls=tls_context)
            except OSError as exc:
                chosen.tell_unreadable(path)
                _read_the_trail(settings, path, filters, audit.MINOR_FAILURE,
                                f"pacs audit: sending to {target} failed after "
                                f"{chosen.count} event(s): {exc}")
                raise click.ClickException(f"cannot send to {target}: {exc}") from None
            chosen.tell_unreadable(path)
            _read_the_trail(settings, path, filters, audit.SUCCESS,
                            f"pacs audit: {sent} event(s) sent to {target}")
            click.echo(f"sent {sent} event(s) to {target}")
            return
        try:
            for event in chosen:
                if fmt == "json":
                    click.echo(json.dumps(event, ensure_ascii=False))
                elif fmt == "xml":
                    click.echo(audit.to_xml(event))
                else:
                    click.echo(audit.summary(event))
        finally:  # read, shown in part at least: a reader that went away still read it
            chosen.tell_unreadable(path)
            _read_the_trail(settings, path, filters, audit.SUCCESS,
                            f"pacs audit: {chosen.count} event(s) shown as {fmt}")


def _syslog_tls(settings: config.Settings, host: str, udp: bool, over_tls: bool,
                ca: str | None, insecure: bool) -> ssl.SSLContext | None:
    """The TLS context of ``pacs audit --syslog`` (``None``: in the clear).  The events
    hold Patient IDs and queries: in the clear only to this host, or with
    ``--insecure``.

    Raises
    ------
    click.UsageError
        TLS over UDP, or the clear to another host without ``--insecure``.
    click.ClickException
        A file that cannot be read.
    """
    from pacs.core import tls
    from pacs.core.access import names_this_machine

    if over_tls:
        if udp:
            raise click.UsageError("--tls goes over TCP (RFC 5425): leave out --udp")
        try:
            context = tls.context(ssl.Purpose.SERVER_AUTH, ("--ca", ca) if ca else None)
            if settings.tls_cert:
                tls.load_identity(context, ("PACS_TLS_CERT", settings.tls_cert),
                                  ("PACS_TLS_KEY", settings.tls_key))
        except PacsError as exc:
            raise click.ClickException(str(exc)) from None
        return context
    if not insecure and not names_this_machine(host):
        raise click.UsageError(
            f"the audit trail holds Patient IDs and queries: send it to {host} over "
            "--tls, or in the clear with --insecure")
    return None


class _Chosen:
    """The events of the trail ``pacs audit`` chose, read as they are consumed: a
    trail of years is never held in memory.  Counts those yielded and the lines that
    were not events.

    Parameters
    ----------
    events :
        The trail's events, ``None`` for a line that is not one
        (:func:`pacs.core.audit.read_events`).
    since :
        The least EventDateTime (ISO 8601, compared as text); "" for all.
    site :
        The customer whose events are chosen.
    keys :
        The study, patient and user filters ("" for none).
    """

    def __init__(self, events: Iterable[dict[str, Any] | None], since: str, site: str,
                 keys: dict[str, str]) -> None:
        self._events = events
        self._since = since
        self._site = site
        self._keys = keys
        self.count = 0
        self.unreadable = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from pacs.core import audit

        for event in self._events:
            if event is None:
                self.unreadable += 1
            elif (event.get("EventIdentification", {}).get("EventDateTime", "")
                  >= self._since
                  and audit.matches(event, site=self._site, **self._keys)):
                self.count += 1
                yield event

    def tell_unreadable(self, path: Path) -> None:
        """Say on standard error how many lines read were not events (if any)."""
        if self.unreadable:
            click.echo(f"{self.unreadable} line(s) of {path} are not events", err=True)


def _read_the_trail(settings: config.Settings, path: Path, filters: dict[str, str],
                    outcome: int, description: str) -> None:
    """Record that the operator read the trail at ``path`` (Audit Log Used, PS3.15
    A.5.3.2), in that trail, once it was read (the reading does not list itself);
    ``filters``, the options that chose the events, as the log's details.

    Only in a trail that exists, which this process may write: a trail the command
    made would be the operator's file (its owner, its place) before the node's first
    event; a reader without the right to write is told, on standard error."""
    from pacs.core import audit

    if not path.is_file():
        return
    if not os.access(path, os.W_OK):
        click.echo(f"this reading is not recorded in {path}: it cannot be written by "
                   "this user", err=True)
        return
    trail = audit.AuditTrail(audit.AuditLog(path),
                             audit.Source(settings.ae_title, settings.customer))
    try:
        trail.log_used(audit.APPLICATION_SERVER, _operator(), path.absolute().as_uri(),
                       outcome, description, filters)
    finally:
        trail.close()
