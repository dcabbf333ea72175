"""The service layer: what the API's routes call, with neither torch nor transformers.

- `streams`: creating streams (their import is a job) and submitting tasks; `setup`: how a job
  trains (method, options, hyperparameters), checked before anything is stored; `imports`: a
  base model's source checked from its files' headers; `policy`: when a stream consolidates.
- `datasets`, `uploads`: reading and checking task data, streamed, and its canonical blob.
- `dispatch`: sending jobs to workers (the `Dispatcher` seam: Celery, or the in-process worker)
  and the reconciler; `broker`: the Celery client side (sending jobs, asking a worker for a
  prediction); `scheduler`: stored cron schedules and the single-leader loop that fires them.
- `archives`, `trees`: downloads of stored trees as tar archives, and their local copies.
- `retraining`: a task's dataset versions and retrain jobs (with replay); `promotion`: the gate
  that decides whether a new adapter version becomes `production`; `webhooks`: subscriptions
  checked and the outbox delivered, signed; `options`: each method's options described for
  OpenAPI and `--help`; `errors`: the one table of error codes to HTTP statuses.
- `metrics`: what `/metrics` reads when Prometheus scrapes (jobs, queue depths) and the text it
  answers; `metrics_dir`: prometheus_client's multiprocess directory, for several processes.

The arrows point one way: `api` -> `services` -> `registry` and `continual`'s light modules
(config, data, errors, metrics); `workers` (Celery tasks, job handlers, model loading) ->
`services`, `registry`, `continual`. Nothing here imports `api` or `workers`.
"""
