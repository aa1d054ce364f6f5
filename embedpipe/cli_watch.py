"""``embedpipe watch``: keep a sink in step with a PostgreSQL table (see :mod:`embedpipe.sources.watch`)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click


@click.command("watch")
@click.argument("source")
@click.option("--out", "-o", required=True, help="The sink to keep in step (any --out of embedpipe run).")
@click.option("--model", "-m", required=True, help="Model spec, as for embedpipe run.")
@click.option("--install-triggers", is_flag=True, help="Create the change table and the trigger that queues the "
              "table's changes (needs the right to create a trigger on it).")
@click.option("--state", type=click.Path(dir_okay=False), help="State file (default: the sink's).")
@click.option("--cache", help="Cache URL (default: $EMBEDPIPE_CACHE or a SQLite file in the user cache folder).")
@click.option("--dimensions", type=click.IntRange(min=1), help="Output dimensions (Matryoshka models).")
@click.option("--base-url", help="An OpenAI-compatible server's URL.")
@click.option("--id-field", default="id", show_default=True, help="The column holding each row's id.")
@click.option("--text-field", default="text", show_default=True, help="The column holding the text.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--poll", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds between looks at the change table when no notification comes.")
def watch(source: str, out: str, model: str, install_triggers: bool, poll: float, **options: Any) -> None:
    """Embed a PostgreSQL table's inserts and updates and apply its deletes to --out as they happen."""
    from embedpipe.errors import ConfigurationError, EmbedPipeError
    from embedpipe.sources.watch import watch as follow

    stop = threading.Event()
    # SIGTERM ends the watch between runs; what was done is committed.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kwargs = {k: v for k, v in options.items() if v is not None}

    def report(result: Any) -> None:
        click.echo(f"{result.records:,} rows: {result.written:,} written, {result.deleted:,} deleted, "
                   f"{result.dead_letters_total:,} dead letters", err=True)

    # The exit codes of embedpipe run: 2 usage, 1 error.
    try:
        follow(source, out=out, model=model, install=install_triggers, poll=poll, stop=stop, on_run=report, **kwargs)
    except ConfigurationError as exc:
        raise click.exceptions.Exit(_fail(exc, 2)) from None
    except (EmbedPipeError, OSError) as exc:
        raise click.exceptions.Exit(_fail(exc, 1)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None


def _fail(exc: BaseException, code: int) -> int:
    click.echo(f"embedpipe: {exc}", err=True)
    return code
