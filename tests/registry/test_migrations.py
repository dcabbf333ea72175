"""Alembic is the only source of schema: head must match the models on both databases."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from registry.db import alembic_config, make_engine, migrate
from registry.entities import StreamState
from registry.store import SqlRegistry
from registry.tables import Base


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_head_matches_models(db_url: str) -> None:
    assert _diff(db_url) == []


def test_upgrade_from_empty_downgrade_and_again(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate(engine, "head")
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert _diff(db_url) == []


def test_0004_keeps_one_evaluation_per_job_task_and_state(registry: SqlRegistry) -> None:
    stream = registry.streams.create(name="s", base_source={"kind": "tiny"}, method="seq-lora",
                                     hyperparams={})  # fmt: skip
    snap = registry.streams.add_snapshot(stream_id=stream.id, artifact_digest="a" * 64, source={})
    ds = registry.tasks.add_dataset(digest="b" * 64, format="jsonl", num_train=1, num_test=1,
                                    size_bytes=1, labels=None)  # fmt: skip
    task, job = registry.tasks.submit(stream_id=stream.id, name="t", dataset_id=ds.id)
    for job_id in (job.id, None):
        registry.evaluations.record(stream_id=stream.id, after_position=0, task_id=task.id,
                                    snapshot_id=snap.id, metric="accuracy", value=0.5,
                                    num_examples=1, job_id=job_id)  # fmt: skip
    engine = registry.engine
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    with engine.begin() as conn:  # before 0004, a re-run job wrote its cells again
        columns = "stream_id, after_position, task_id, snapshot_id, adapter_version_id, " \
            "adapter_ids, job_id, metric, value, num_examples, created_at"  # fmt: skip
        conn.execute(
            text(
                f"INSERT INTO evaluations ({columns}) SELECT stream_id, after_position, "
                "task_id, snapshot_id, adapter_version_id, adapter_ids, job_id, metric, "
                f"0.75, num_examples, created_at FROM evaluations WHERE job_id = {job.id}"
            )
        )
    migrate(engine, "head")
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT job_id, value FROM evaluations ORDER BY id")
        ).all()  # the re-run's cell kept, the first dropped; a row without a job untouched
    assert [tuple(r) for r in rows] == [(None, 0.5), (job.id, 0.75)]
    assert _diff(registry.engine.url.render_as_string(hide_password=False)) == []


def test_0005_makes_streams_written_before_ready(registry: SqlRegistry) -> None:
    stream = registry.streams.create(name="s", base_source={"kind": "tiny"}, method="seq-lora",
                                     hyperparams={}, base_digest="a" * 64)  # fmt: skip
    ds = registry.tasks.add_dataset(digest="b" * 64, format="jsonl", num_train=1, num_test=1,
                                    size_bytes=1, labels=None)  # fmt: skip
    registry.tasks.submit(stream_id=stream.id, name="t", dataset_id=ds.id)  # rows refer to it
    engine = registry.engine
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    with engine.connect() as conn:
        assert "state" not in {c["name"] for c in inspect(conn).get_columns("streams")}
    migrate(engine, "head")
    assert registry.streams.get("s").state is StreamState.READY
    assert registry.streams.current_snapshot(stream.id).artifact_digest == "a" * 64


def test_0007_pins_the_pooling_o_lora_streams_and_versions_were_trained_with(
    registry: SqlRegistry,
) -> None:
    def stream(name: str, method: str, options: dict[str, object]) -> tuple[int, int]:
        s = registry.streams.create(name=name, base_source={"kind": "tiny"}, method=method,
                                    hyperparams={}, method_options=options)  # fmt: skip
        snap = registry.streams.add_snapshot(stream_id=s.id, artifact_digest="a" * 64, source={})
        ds = registry.tasks.add_dataset(digest=name[0] * 64, format="jsonl", num_train=1,
                                        num_test=1, size_bytes=1, labels=None)  # fmt: skip
        task, _ = registry.tasks.submit(stream_id=s.id, name="t", dataset_id=ds.id)
        hyper = {"rank": 8, "method_options": options}
        v = registry.adapters.create_version(
            task_id=task.id, method=method, hyperparams=hyper, base_snapshot_id=snap.id,
            dataset_id=ds.id,
        )  # fmt: skip
        return s.id, v.id

    engine = registry.engine
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    # written before: o-lora with the old default left out, o-lora with mean chosen, and am-lora
    old = stream("a", "o-lora", {"lambda1": 0.25})
    chosen = stream("b", "o-lora", {"lambda1_norm": "mean"})
    other = stream("c", "am-lora", {})
    migrate(engine, "head")
    for (stream_id, version_id), options in (
        (old, {"lambda1": 0.25, "lambda1_norm": "sum"}),
        (chosen, {"lambda1_norm": "mean"}),
        (other, {}),
    ):
        assert registry.streams.get_by_id(stream_id).method_options == options
        version = registry.adapters.get_by_id(version_id)
        assert version.hyperparams == {"rank": 8, "method_options": options}
    assert _diff(registry.engine.url.render_as_string(hide_password=False)) == []
