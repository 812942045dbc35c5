"""The service's job queue and configuration file (no Orthanc needed)."""

from __future__ import annotations

import sqlite3

import pytest

from xbmd.errors import InputError
from xbmd.pacs.config import load_config
from xbmd.pacs.jobs import JobQueue


def test_feed_and_jobs_are_durable_and_unique(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    assert queue.last_seq() is None
    assert queue.add_from_feed(["a", "b"], last_seq=7) == 2
    assert queue.add_from_feed(["b", "c"], last_seq=9) == 1  # "b" is not queued twice
    job = queue.claim()
    assert job.orthanc_id == "a" and job.status == "running"
    queue.close()
    # a new process (the old one was killed): position and jobs are there; "a" is redone
    queue = JobQueue(tmp_path / "jobs.sqlite")
    assert queue.last_seq() == 9
    assert queue.counts()["running"] == 1
    assert queue.recover() == 1
    assert [queue.claim().orthanc_id for _ in range(3)] == ["a", "b", "c"]
    assert queue.claim() is None


def test_a_failing_feed_write_changes_nothing(tmp_path, monkeypatch):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    queue.add_from_feed(["a"], last_seq=1)
    with pytest.raises(sqlite3.ProgrammingError):
        queue.add_from_feed(["b", object()], last_seq=5)  # an id SQLite cannot store
    assert queue.last_seq() == 1 and sum(queue.counts().values()) == 1


def test_retry_later_and_finish(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    queue.add_from_feed(["a"], last_seq=1)
    job = queue.claim()
    queue.retry_later(job.id, delay_s=60, reason="Orthanc away", count=False)
    assert queue.claim() is None  # not due yet
    assert queue.get(job.id).attempts == 0 and queue.get(job.id).reason == "Orthanc away"
    queue.retry_later(job.id, delay_s=0, reason="bug", count=True)
    job = queue.claim()
    queue.finish(job.id, "done", results=[{"side": "right", "bmd_g_cm2": 0.8}], sr_uid="1.2")
    done = queue.get(job.id)
    assert done.status == "done" and done.results[0]["bmd_g_cm2"] == 0.8 and done.attempts == 2
    assert done.latency_s is not None and done.latency_s >= 0
    with pytest.raises(ValueError):
        queue.finish(job.id, "running")


def _write(tmp_path, text: str):
    path = tmp_path / "xbmd.yaml"
    path.write_text(text)
    return path


def test_config_reads_secrets_from_files_relative_to_it(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "token").write_text("t" * 20)
    config = load_config(
        _write(
            tmp_path,
            "orthanc:\n  url: http://10.0.0.2:8042/\n  username: u\n  password_file: pw\n"
            "worklist:\n  token_file: token\nstate_dir: st\nfilters:\n  body_parts: [PELVIS]\n",
        )
    )
    assert config.orthanc.url == "http://10.0.0.2:8042" and config.orthanc.password == "s3cret"
    assert config.worklist.host == "127.0.0.1" and config.worklist.token == "t" * 20
    assert config.state_dir == tmp_path / "st" and config.database.name == "jobs.sqlite"
    assert config.filters.body_parts == ("PELVIS",)
    assert config.site_calibration is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worklist: {token: tttttttttttttttttttt}\n", "orthanc.url is missing"),
        ("orthanc: {url: http://x}\nworklist: {token: short}\n", "at least 16 characters"),
        ("orthanc: {url: http://x}\nworklist: {token: tttttttttttttttttttt}\nport: 1\n",
         "unknown settings port"),
        ("orthanc: {url: http://x, pasword: p}\nworklist: {token: tttttttttttttttttttt}\n",
         "unknown settings pasword"),
        ("orthanc: {url: http://x}\nworklist: {token: tttttttttttttttttttt, port: many}\n",
         "invalid literal"),
        ("orthanc: [\n", "not valid YAML"),
        ("orthanc: {url: http://x}\nworklist: {token: tttttttttttttttttttt}\n"
         "site_calibration: nowhere.json\n", "site_calibration .*nowhere.json is not a file"),
    ],
)  # fmt: skip
def test_config_errors_name_the_file_and_the_setting(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
