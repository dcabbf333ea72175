"""`/v1/streams/{s}/tasks`: uploads (JSONL, CL_Benchmark JSON, gzip) queue a training job, a
stored dataset is reused by digest, and bad datasets and compression bombs are refused with the
field and line at fault before anything is stored."""

from __future__ import annotations

import dataclasses
import gzip
import json
from typing import Any

from services.datasets import load_dataset
from tests.api.conftest import Api
from tests.api.helpers import DEEP, _jsonl, _problem, _stream, _submit, _task_files


def test_task_uploads_queue_jobs_and_bad_datasets_are_refused_before_training(api: Api) -> None:
    c, h = api.client, api.auth("write")
    imported = _stream(api)
    r = _submit(api, "s1", "t1")
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert job["state"] == "queued" and job["kind"] == "train"
    assert api.dispatcher.sent[1:] == [job["id"]]  # sent after commit, after the import job
    assert api.inst.registry.jobs.get(api.dispatcher.sent[0]).stream_id == imported["id"]
    assert api.inst.registry.jobs.get(job["id"]).enqueued_at is not None
    digest = r.json()["task"]["dataset_digest"]
    # a stored dataset is reused by digest
    reuse = c.post("/v1/streams/s1/tasks", data={"name": "t2", "dataset": digest}, headers=h)
    assert reuse.status_code == 202 and reuse.json()["task"]["dataset_digest"] == digest
    # CL_Benchmark JSON with labels; no test file: 10% held out
    records = [{"sentence": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    cl = c.post("/v1/streams/s1/tasks", headers=h, files={"train": ("t.json", json.dumps(records))},
                data={"name": "t3", "format": "cl_benchmark", "labels": '["a", "b"]'})  # fmt: skip
    assert cl.status_code == 202, cl.text
    stored = api.inst.registry.tasks.get_dataset(cl.json()["task"]["dataset_digest"])
    assert (stored.num_train, stored.num_test) == (18, 2)

    train, _, _ = _task_files()
    bad: list[tuple[dict[str, Any], dict[str, Any], str, int | None]] = [
        ({"name": "x"}, {"train": ("t", "")}, "train", None),
        ({"name": "x"}, {"train": ("t", b"\xff\xfe bad")}, "train", None),
        ({"name": "x"}, {"train": ("t", train + "{oops\n")}, "train", 25),
        ({"name": "x"}, {"train": ("t", '{"prompt": "p"}\n')}, "train.completion", 1),
        ({"name": "x", "labels": '["zz"]'}, {"train": ("t", train)}, "train.completion", 1),
        ({"name": "x"}, {"train": ("t", "x" * 5000 + "\n")}, "train", 1),
        ({"name": "x"}, {"train": ("t", _jsonl([{"prompt": "p", "completion": "c"}] * 600))},
         "train", None),
        ({"name": "x", "format": "cl_benchmark"}, {"train": ("t", "[]")}, "labels", None),
        ({"name": "x", "format": "csv"}, {"train": ("t", train)}, "format", None),
        ({"name": "x"}, {}, "train", None),
        ({"name": "x", "dataset": digest}, {"train": ("t", train)}, "dataset", None),
        ({"name": "x", "dataset": "f" * 64}, {}, "dataset", None),
        ({"name": "x", "params": "{bad"}, {"train": ("t", train)}, "params", None),
        ({"name": "x", "params": '{"hyperparams": {"rank": 0}}'}, {"train": ("t", train)},
         "rank", None),
        ({"name": "x", "params": '{"surprise": 1}'}, {"train": ("t", train)}, "surprise", None),
        ({"name": "t1"}, {"train": ("t", train)}, "name", None),
        ({"name": "../evil"}, {"train": ("t", train)}, "name", None),
        # nested deeper than json's parser recurses (it raised RecursionError: a 500)
        ({"name": "x", "labels": DEEP}, {"train": ("t", train)}, "labels", None),
        ({"name": "x", "params": DEEP}, {"train": ("t", train)}, "params", None),
        ({"name": "x"}, {"train": ("t", train + DEEP + "\n")}, "train", 25),
        ({"name": "x", "format": "cl_benchmark", "labels": '["a"]'}, {"train": ("t", DEEP)},
         "train", None),
    ]  # fmt: skip
    for data, files, field, line in bad:
        r = c.post("/v1/streams/s1/tasks", data=data, files=files or None, headers=h)
        assert r.status_code in (404, 409, 422), (data, r.text)
        body = _problem(r, r.status_code, field)
        if line is not None:
            assert body["line"] == line and f"line {line}" in body["detail"]
    listed = json.dumps([{"sentence": "s", "label": "a"}, {"label": "a"}], indent=2)
    r = c.post("/v1/streams/s1/tasks", files={"train": ("t.json", listed)}, headers=h,
               data={"name": "x", "format": "cl_benchmark", "labels": '["a"]'})  # fmt: skip
    body = _problem(r, 422, "train.sentence")  # a JSON list's errors name the record, not a line
    assert (body["record"], body["line"], body["detail"]) == (2, None, "record 2: missing")
    huge = c.post("/v1/streams/s1/tasks", data={"name": "big"}, headers=h,
                  files={"train": ("t", "x" * 100_000)})  # fmt: skip
    _problem(huge, 413, "body")
    assert [t["name"] for t in c.get("/v1/streams/s1/tasks", headers=h).json()["data"]] == [
        "t1",
        "t2",
        "t3",
    ]  # nothing half-stored


def test_gzip_uploads_are_read_and_compression_bombs_refused_before_anything_is_stored(
    api: Api,
) -> None:
    c, h = api.client, api.auth("write")
    _stream(api)
    train, test, labels = _task_files()
    packed = {"train": ("train.jsonl.gz", gzip.compress(train.encode())),
              "test": ("test.jsonl.gz", gzip.compress(test.encode()))}  # fmt: skip
    ok = c.post("/v1/streams/s1/tasks", data={"name": "zipped", "labels": json.dumps(labels)},
                files=packed, headers=h)  # fmt: skip
    assert ok.status_code == 202, ok.text
    plain = _submit(api, "s1", "plain")
    zipped_data, plain_data = (
        load_dataset(
            api.inst, api.inst.registry.tasks.get_dataset(r.json()["task"]["dataset_digest"])
        )
        for r in (ok, plain)
    )  # the same examples, decompressed
    assert (zipped_data.train, zipped_data.test) == (plain_data.train, plain_data.test)
    # a concatenation of gzip members (`cat a.gz b.gz`) is read whole, as gzip reads it
    half = train.index("\n", len(train) // 2) + 1
    members = gzip.compress(train[:half].encode()) + gzip.compress(train[half:].encode())
    joined = c.post("/v1/streams/s1/tasks", data={"name": "members", "labels": json.dumps(labels)},
                    files={"train": ("t.gz", members + b"\0" * 512), "test": packed["test"]},
                    headers=h)  # fmt: skip
    assert joined.status_code == 202, joined.text
    digest = joined.json()["task"]["dataset_digest"]
    joined_data = load_dataset(api.inst, api.inst.registry.tasks.get_dataset(digest))
    assert joined_data.train == plain_data.train
    bad_member = gzip.compress(train[:half].encode()) + b"not a gzip member"
    r = c.post("/v1/streams/s1/tasks", data={"name": "bad_member"},
               files={"train": ("t.gz", bad_member)}, headers=h)  # fmt: skip
    assert "not a valid gzip file" in _problem(r, 422, "train")["detail"]
    bomb = gzip.compress(b"{" * (2 * 2**20))  # 2 MiB of one byte packs into a few KiB
    assert len(bomb) < 10_000
    limits = api.inst.settings.model_copy(update={"max_expanded_bytes": 2**20})
    api.client.app.state.inst = dataclasses.replace(api.inst, settings=limits)  # type: ignore[attr-defined]
    r = c.post("/v1/streams/s1/tasks", data={"name": "bomb"}, files={"train": ("b.gz", bomb)},
               headers=h)  # fmt: skip
    body = _problem(r, 422, "train")  # the first limit it passes: its first line's
    assert body["detail"] == "line 1: longer than 4096 bytes" and body["line"] == 1
    line = json.dumps({"prompt": "p" * 4000, "completion": " a"}) + "\n"  # a valid line
    bomb = gzip.compress((line * 300).encode())  # 1.2 MB of examples, under every other limit
    r = c.post("/v1/streams/s1/tasks", data={"name": "bomb"}, files={"train": ("b.gz", bomb)},
               headers=h)  # fmt: skip
    assert "expands to more than 1048576 bytes" in _problem(r, 422, "train")["detail"]
    listed = gzip.compress(b"[" + b" " * 2**21 + b"]")  # a JSON list: whitespace is read on
    r = c.post("/v1/streams/s1/tasks", files={"train": ("b.gz", listed)}, headers=h,
               data={"name": "bomb", "format": "cl_benchmark", "labels": '["a"]'})  # fmt: skip
    assert "expands to more than 1048576 bytes" in _problem(r, 422, "train")["detail"]
    spread = gzip.compress((line * 150).encode()) * 2  # two members under the limit, not together
    r = c.post("/v1/streams/s1/tasks", data={"name": "spread"},
               files={"train": ("s.gz", spread)}, headers=h)  # fmt: skip
    assert "expands to more than 1048576 bytes" in _problem(r, 422, "train")["detail"]
    broken = gzip.compress(train.encode())[:-20]
    r = c.post("/v1/streams/s1/tasks", data={"name": "broken"},
               files={"train": ("t.gz", broken)}, headers=h)  # fmt: skip
    _problem(r, 422, "train")
    names = [t["name"] for t in c.get("/v1/streams/s1/tasks", headers=h).json()["data"]]
    assert names == ["zipped", "plain", "members"]
