"""The ``postgres_url`` fixture (tests/conftest.py) gives a real PostgreSQL server
that SQLAlchemy and Optuna's RDBStorage can use, as shared studies need."""

import os
import uuid

import conftest
import optuna
import sqlalchemy


def test_postgres_url_serves_sqlalchemy_and_optuna(postgres_url):
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.dialect.name == "postgresql"
            assert conn.execute(sqlalchemy.text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()

    name = f"fixture-smoke-{uuid.uuid4().hex}"  # the server may be a shared one
    writer = optuna.storages.RDBStorage(postgres_url)
    reader = optuna.storages.RDBStorage(postgres_url)
    try:
        study = optuna.create_study(study_name=name, storage=writer, direction="minimize")
        study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=3)

        loaded = optuna.load_study(study_name=name, storage=reader)
        assert [t.state for t in loaded.trials] == [optuna.trial.TrialState.COMPLETE] * 3
        assert [t.params for t in loaded.trials] == [t.params for t in study.trials]
        assert loaded.best_value == study.best_value
        optuna.delete_study(study_name=name, storage=reader)
    finally:
        writer.engine.dispose()
        reader.engine.dispose()


def test_find_postgres_bindir_is_none_without_binaries(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "POSTGRES_ROOT", tmp_path / "postgresql")
    assert conftest.find_postgres_bindir() is None  # no such folder
    (tmp_path / "postgresql" / "15" / "bin").mkdir(parents=True)
    assert conftest.find_postgres_bindir() is None  # a version without binaries
    _fake_binary(tmp_path / "postgresql" / "15" / "bin" / "initdb")
    assert conftest.find_postgres_bindir() is None  # initdb without pg_ctl


def test_find_postgres_bindir_picks_newest_complete_version(tmp_path):
    for version in ("9.6", "15", "16"):
        for name in ("initdb", "pg_ctl"):
            _fake_binary(tmp_path / version / "bin" / name)
    _fake_binary(tmp_path / "17" / "bin" / "initdb")  # incomplete: no pg_ctl
    assert conftest.find_postgres_bindir(tmp_path) == tmp_path / "16" / "bin"


def _fake_binary(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    os.chmod(path, 0o755)
