"""``medblocks db``: the control plane's schema, migrated as an explicit step.

Opening a store never migrates (it checks the schema is at head and says ``run: medblocks db
upgrade`` when it is not); a deployment runs ``medblocks db upgrade`` once per release, before the
daemon, the webserver, workers and ``medblocks serve`` start. A brand-new embedded SQLite database is
the one exception: it is created at head on first open, so a newcomer needs no extra step.
"""

import click

from medblocks_pipelines.lib.settings import get_settings


@click.group()
def db() -> None:
    """The control plane's schema: upgrade it, show its revision."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Migrate the control plane (MEDBLOCKS_DATABASE_URL) to the newest schema."""
    from medblocks_pipelines.lib.registry.db import current_revision, make_engine, upgrade

    settings = get_settings()
    settings.ensure_dirs()
    engine = make_engine(settings.database_url)
    before = current_revision(engine)
    upgrade(engine, revision)
    after = current_revision(engine)
    where = engine.url.render_as_string(hide_password=True)
    if before == after:
        click.echo(f"{where}: already at {after}")
    else:
        click.echo(f"{where}: upgraded {before or '(empty)'} -> {after}")


@db.command("current")
def db_current() -> None:
    """Show the control plane's schema revision and the newest one this code ships."""
    from medblocks_pipelines.lib.registry.db import current_revision, head_revision, make_engine

    settings = get_settings()
    engine = make_engine(settings.database_url)
    current, head = current_revision(engine), head_revision()
    state = "at head" if current == head else "not at head: run medblocks db upgrade"
    click.echo(f"{engine.url.render_as_string(hide_password=True)}")
    click.echo(f"current: {current or '(empty)'}")
    click.echo(f"head:    {head} ({state})")
