"""Offline batch jobs in the OpenAI Batch format.

- `format`: input lines -> `BatchLine` or a per-line error; output lines.
- `journal`: the append-only, crash-safe results file (resume = skip what it holds).
- `executor`: runs one line's body through the server's serving classes (dispatch by `url`).
- `runner`: streams an input file through an executor with bounded in-flight work.
- `store` + `service`: the persisted `/v1/files` and `/v1/batches` of `ember serve`.
"""
