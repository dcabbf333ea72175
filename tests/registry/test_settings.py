"""Deployment settings: secrets from the environment or from files, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from registry.settings import StrataSettings

SECRET = "s3cr3t-value-9f2a"


def test_secrets_are_read_from_files_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key").write_text("strata\n")
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "db").write_text(f"postgresql://strata:{SECRET}@db:5432/strata\n")
    monkeypatch.setenv("STRATA_ARTIFACT_BACKEND", "minio")
    monkeypatch.setenv("STRATA_MINIO_ACCESS_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("STRATA_MINIO_SECRET_KEY_FILE", str(tmp_path / "secret"))
    monkeypatch.setenv("STRATA_DATABASE_URL_FILE", str(tmp_path / "db"))
    settings = StrataSettings()
    assert settings.minio_secret_key is not None
    assert settings.minio_secret_key.get_secret_value() == SECRET  # stripped of the newline
    assert settings.database_url == f"postgresql://strata:{SECRET}@db:5432/strata"
    assert SECRET not in repr(settings.minio_secret_key) and SECRET not in str(
        settings.minio_secret_key
    )


def test_a_secret_given_twice_or_unreadable_is_refused_without_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").write_text(SECRET)
    monkeypatch.setenv("STRATA_MINIO_SECRET_KEY", SECRET)
    monkeypatch.setenv("STRATA_MINIO_SECRET_KEY_FILE", str(tmp_path / "secret"))
    with pytest.raises(ValidationError) as both:
        StrataSettings()
    assert "both set" in str(both.value) and SECRET not in str(both.value)
    monkeypatch.delenv("STRATA_MINIO_SECRET_KEY")
    monkeypatch.setenv("STRATA_MINIO_SECRET_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError) as missing:
        StrataSettings()
    assert "STRATA_MINIO_SECRET_KEY_FILE" in str(missing.value)
    monkeypatch.delenv("STRATA_MINIO_SECRET_KEY_FILE")
    monkeypatch.setenv("STRATA_ARTIFACT_BACKEND", "minio")
    with pytest.raises(ValidationError) as needs:
        StrataSettings()
    assert "STRATA_MINIO_ACCESS_KEY" in str(needs.value)


def test_import_roots_none_in_the_service_the_data_dirs_imports_when_embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STRATA_IMPORT_ROOTS", raising=False)
    service = StrataSettings(data_dir=tmp_path)
    assert service.import_roots is None  # no file imports: only tiny and smollm2
    assert service.embedded().import_roots == (tmp_path / "imports",)
    monkeypatch.setenv("STRATA_IMPORT_ROOTS", f"/models:{tmp_path / 'more'}:")
    given = StrataSettings(data_dir=tmp_path)
    assert given.import_roots == (Path("/models"), tmp_path / "more")
    assert given.embedded().import_roots == given.import_roots  # the operator's word stands
    monkeypatch.setenv("STRATA_IMPORT_ROOTS", "")
    assert StrataSettings(data_dir=tmp_path).embedded().import_roots == ()  # none, said so
    monkeypatch.setenv("STRATA_IMPORT_MAX_PARAMS", "0")
    with pytest.raises(ValidationError, match="import_max_params"):
        StrataSettings()


def test_the_metrics_token_and_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert StrataSettings().metrics_token is None  # /metrics is open unless it is set
    (tmp_path / "token").write_text(SECRET + "\n")
    monkeypatch.setenv("STRATA_METRICS_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("STRATA_METRICS_PORT", "9100")
    settings = StrataSettings()
    assert settings.metrics_token is not None
    assert settings.metrics_token.get_secret_value() == SECRET and SECRET not in repr(settings)
    assert (settings.metrics_port, settings.metrics_host) == (9100, "0.0.0.0")
    monkeypatch.setenv("STRATA_METRICS_PORT", "70000")
    with pytest.raises(ValidationError, match="metrics_port"):
        StrataSettings()
