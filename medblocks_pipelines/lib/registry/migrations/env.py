"""Alembic environment: migrations run on the engine handed over by ``db.alembic_config``."""

from alembic import context

from medblocks_pipelines.lib.registry.schema import load_all_tables

target_metadata = load_all_tables()
engine = context.config.attributes["engine"]

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
