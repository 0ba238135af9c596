"""OpenAI Batch API on the serving engine: /v1/files, /v1/batches, `minivllm batch run`.

store.py (SQLAlchemy Core: SQLite in WAL mode, or PostgreSQL for replicas), files.py (bytes on
disk or in the database), validation.py (each line with the live routes' models), runner.py
(lines to dispatch() at low priority, bounded, each answer recorded as it completes, leases),
service.py (the API objects; RunPod jobs), routes.py (FastAPI), cli.py (`minivllm batch run`).
"""

from minivllm.batches.runner import BATCH_PRIORITY, BatchRunner
from minivllm.batches.service import BatchService
from minivllm.batches.store import Store

__all__ = ["BATCH_PRIORITY", "BatchRunner", "BatchService", "Store"]
