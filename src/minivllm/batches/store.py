"""The durable store of the Batch API: SQLAlchemy Core tables, SQLite (WAL) or PostgreSQL (psycopg 3).

Every method is synchronous and short (callers run them with asyncio.to_thread). Coordination
between replicas happens only here, with conditional UPDATEs:

- a line is claimed by one atomic UPDATE ... WHERE idx IN (SELECT ... FOR UPDATE SKIP LOCKED)
  that sets its owner and a lease (wall-clock seconds); a replica that dies stops renewing and
  its lines are claimed again once the lease runs out;
- a finished line is recorded only while its owner still holds it (state 'running', owner =
  me), so a line answered twice (a lease that ran out under a slow replica) is kept once;
- batch-level steps (validation, finalization) take the batch's own lease the same way.

SQLite ignores FOR UPDATE (its writers are serialized anyway): one server per SQLite file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import sqlalchemy as sa

metadata = sa.MetaData()

files = sa.Table(
    "minivllm_files", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("sort_key", sa.BigInteger, nullable=False),  # ns: list order, ties by id
    sa.Column("in_db", sa.Boolean, nullable=False),  # bytes in file_chunks, else under the data folder
)

file_chunks = sa.Table(
    "minivllm_file_chunks", metadata,
    sa.Column("file_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

batches = sa.Table(
    "minivllm_batches", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(64), nullable=False),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("metadata", sa.JSON),
    sa.Column("errors", sa.JSON),
    sa.Column("sort_key", sa.BigInteger, nullable=False),
    *(sa.Column(name, sa.BigInteger) for name in (
        "created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
        "expired_at", "cancelling_at", "cancelled_at")),
    sa.Column("output_file_id", sa.String(64)),
    sa.Column("error_file_id", sa.String(64)),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("completed", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("owner", sa.String(128)),  # who validates / finalizes it now
    sa.Column("lease_until", sa.Float),
    sa.Column("model", sa.String(256)),  # set when it is finalized (columns added later: ADDED_COLUMNS)
    sa.Column("usage", sa.JSON),
)
sa.Index("minivllm_batches_status", batches.c.status)
ADDED_COLUMNS = {batches: ("model", "usage")}  # absent from stores created before them: added at start

# Line states: pending -> running -> done | failed; pending/running -> cancelled (batch cancelled).
# 'failed' lines (a bad line, an error answer, an expired batch's leftovers) go to the error file.
lines = sa.Table(
    "minivllm_batch_lines", metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),  # 0-based position among the file's lines
    sa.Column("custom_id", sa.Text),
    sa.Column("body", sa.Text),  # the request body (JSON); NULL for a line that failed validation
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("owner", sa.String(128)),
    sa.Column("lease_until", sa.Float),
    sa.Column("result", sa.Text),  # the output / error file line (JSON)
)
sa.Index("minivllm_batch_lines_state", lines.c.batch_id, lines.c.state)

OPEN = ("pending", "running")
ACTIVE_BATCH = ("validating", "in_progress", "finalizing", "cancelling")


def _add_missing_columns(c: sa.Connection) -> None:
    """A store written by an older version lacks the columns added since: add them (nullable)."""
    inspector = sa.inspect(c)
    for table, names in ADDED_COLUMNS.items():
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for name in names:
            if name not in present:
                column = table.c[name]
                c.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {column.type.compile(c.dialect)}"))


def engine_url(url: str) -> str:
    """postgresql://... means psycopg 3 (SQLAlchemy's default driver there is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


SCHEMA_LOCK_KEY = 0x6D696E69766C6C6D  # "minivllm": the advisory lock that serializes schema creation


class Store:
    def __init__(self, url: str) -> None:
        self.url = engine_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = sa.create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=8, max_overflow=8)
        with self.engine.begin() as c:
            if not self.is_sqlite:
                # Replicas starting together would race to create the tables (PostgreSQL's catalog
                # then raises a unique violation): one at a time, under a transaction-scoped lock.
                c.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            metadata.create_all(c)
            _add_missing_columns(c)

    def close(self) -> None:
        self.engine.dispose()

    # ---- files --------------------------------------------------------------------------------
    def add_file(self, row: dict) -> None:
        with self.engine.begin() as c:
            c.execute(files.insert().values(sort_key=time.time_ns(), **row))

    def get_file(self, file_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(files.select().where(files.c.id == file_id)).mappings().first()
        return dict(row) if row else None

    def list_files(self, purpose: str | None, after: str | None, limit: int, ascending: bool) -> list[dict]:
        query = files.select()
        if purpose:
            query = query.where(files.c.purpose == purpose)
        return self._page(files, query, after, limit, ascending)

    def delete_file(self, file_id: str) -> bool:
        with self.engine.begin() as c:
            c.execute(file_chunks.delete().where(file_chunks.c.file_id == file_id))
            return c.execute(files.delete().where(files.c.id == file_id)).rowcount > 0

    def add_chunk(self, file_id: str, seq: int, data: bytes) -> None:
        with self.engine.begin() as c:
            c.execute(file_chunks.insert().values(file_id=file_id, seq=seq, data=data))

    def read_chunks(self, file_id: str) -> Iterator[bytes]:
        """One chunk per query: never the whole file in memory, no long-lived cursor."""
        seq = -1
        while True:
            with self.engine.connect() as c:
                row = c.execute(sa.select(file_chunks.c.seq, file_chunks.c.data)
                                .where(file_chunks.c.file_id == file_id, file_chunks.c.seq > seq)
                                .order_by(file_chunks.c.seq).limit(1)).first()
            if row is None:
                return
            seq = row.seq
            yield bytes(row.data)

    # ---- batches ------------------------------------------------------------------------------
    def add_batch(self, row: dict) -> None:
        with self.engine.begin() as c:
            c.execute(batches.insert().values(sort_key=time.time_ns(), **row))

    def get_batch(self, batch_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(batches.select().where(batches.c.id == batch_id)).mappings().first()
        return dict(row) if row else None

    def list_batches(self, after: str | None, limit: int) -> list[dict]:
        return self._page(batches, batches.select(), after, limit, ascending=False)

    def batches_in(self, statuses) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(batches.select().where(batches.c.status.in_(statuses))
                             .order_by(batches.c.sort_key)).mappings().all()
        return [dict(r) for r in rows]

    def update_batch(self, batch_id: str, *, when_status=None, when_owner: str | None = None, **values) -> bool:
        """Compare-and-set: applies only while the batch has one of `when_status` (and, given,
        `when_owner` holds it). True when it applied."""
        query = batches.update().where(batches.c.id == batch_id)
        if when_status is not None:
            statuses = (when_status,) if isinstance(when_status, str) else tuple(when_status)
            query = query.where(batches.c.status.in_(statuses))
        if when_owner is not None:
            query = query.where(batches.c.owner == when_owner)
        with self.engine.begin() as c:
            return c.execute(query.values(**values)).rowcount > 0

    def take_batch(self, batch_id: str, status: str, owner: str, lease_s: float) -> bool:
        """Hold a batch (for validation or finalization) while its lease is free or ours."""
        now = time.time()
        free = sa.or_(batches.c.lease_until.is_(None), batches.c.lease_until < now, batches.c.owner == owner)
        with self.engine.begin() as c:
            return c.execute(batches.update().where(batches.c.id == batch_id, batches.c.status == status, free)
                             .values(owner=owner, lease_until=now + lease_s)).rowcount > 0

    def renew(self, owner: str, lease_s: float) -> None:
        until = time.time() + lease_s
        with self.engine.begin() as c:
            c.execute(lines.update().where(lines.c.owner == owner, lines.c.state == "running")
                      .values(lease_until=until))
            c.execute(batches.update().where(batches.c.owner == owner, batches.c.status.in_(ACTIVE_BATCH))
                      .values(lease_until=until))

    def release(self, owner: str | None = None) -> int:
        """Running lines back to pending: ours (a clean stop), or everyone's (an SQLite store at
        start, where this process is the only server). Returns how many."""
        query = lines.update().where(lines.c.state == "running")
        if owner is not None:
            query = query.where(lines.c.owner == owner)
        with self.engine.begin() as c:
            count = c.execute(query.values(state="pending", owner=None, lease_until=None)).rowcount
            batch_query = batches.update()
            if owner is not None:
                batch_query = batch_query.where(batches.c.owner == owner)
            c.execute(batch_query.values(owner=None, lease_until=None))
        return count

    def _page(self, table: sa.Table, query, after: str | None, limit: int, ascending: bool) -> list[dict]:
        """Cursor pagination by (sort_key, id); limit + 1 rows, so the caller sees has_more."""
        key, ident = table.c.sort_key, table.c.id
        with self.engine.connect() as c:
            if after:
                cursor = c.execute(sa.select(key).where(ident == after)).scalar()
                if cursor is not None:
                    if ascending:
                        query = query.where(sa.or_(key > cursor, sa.and_(key == cursor, ident > after)))
                    else:
                        query = query.where(sa.or_(key < cursor, sa.and_(key == cursor, ident < after)))
            order = (key.asc(), ident.asc()) if ascending else (key.desc(), ident.desc())
            rows = c.execute(query.order_by(*order).limit(limit + 1)).mappings().all()
        return [dict(r) for r in rows]

    # ---- lines --------------------------------------------------------------------------------
    def reset_lines(self, batch_id: str) -> None:
        """Drop a half-done validation's lines (its replica died) before validating again."""
        with self.engine.begin() as c:
            c.execute(lines.delete().where(lines.c.batch_id == batch_id))

    def add_lines(self, batch_id: str, rows: list[dict]) -> None:
        """rows: {idx, custom_id, body, state, result}; one transaction per call."""
        if rows:
            with self.engine.begin() as c:
                c.execute(lines.insert(), [{"batch_id": batch_id, "owner": None, "lease_until": None, **r}
                                           for r in rows])

    def claim_lines(self, batch_id: str, owner: str, limit: int, lease_s: float) -> list[dict]:
        """Up to `limit` lines nobody holds (pending, or running under a lease that ran out)."""
        if limit <= 0:
            return []
        now = time.time()
        # A CTE, not `idx IN (subquery)`: PostgreSQL may run such a subquery more than once, and
        # with SKIP LOCKED each run finds other rows, so the LIMIT would not hold.
        claimable = (sa.select(lines.c.idx)
                     .where(lines.c.batch_id == batch_id,
                            sa.or_(lines.c.state == "pending",
                                   sa.and_(lines.c.state == "running", lines.c.lease_until < now)))
                     .order_by(lines.c.idx).limit(limit)
                     .with_for_update(skip_locked=True)
                     .cte("claimable"))
        query = (lines.update()
                 .where(lines.c.batch_id == batch_id, lines.c.idx == claimable.c.idx)
                 .values(state="running", owner=owner, lease_until=now + lease_s)
                 .returning(lines.c.idx, lines.c.custom_id, lines.c.body))
        with self.engine.begin() as c:
            rows = c.execute(query).mappings().all()
        return sorted((dict(r) for r in rows), key=lambda r: r["idx"])

    def record_line(self, batch_id: str, idx: int, owner: str, state: str, result: str) -> bool:
        """Store a finished line's answer, only if `owner` still holds it: exactly once."""
        with self.engine.begin() as c:
            return c.execute(lines.update().where(lines.c.batch_id == batch_id, lines.c.idx == idx,
                                                  lines.c.state == "running", lines.c.owner == owner)
                             .values(state=state, result=result, lease_until=None)).rowcount > 0

    def release_line(self, batch_id: str, idx: int, owner: str) -> None:
        with self.engine.begin() as c:
            c.execute(lines.update().where(lines.c.batch_id == batch_id, lines.c.idx == idx,
                                           lines.c.state == "running", lines.c.owner == owner)
                      .values(state="pending", owner=None, lease_until=None))

    def close_open_lines(self, batch_id: str, state: str, result_of=None) -> int:
        """Pending and running lines -> `state` (cancelled, or failed with result_of(custom_id))."""
        with self.engine.begin() as c:
            if result_of is None:
                return c.execute(lines.update().where(lines.c.batch_id == batch_id, lines.c.state.in_(OPEN))
                                 .values(state=state, lease_until=None)).rowcount
            count = 0
            while True:  # in pages: an expired batch may have 50,000 lines left
                rows = c.execute(sa.select(lines.c.idx, lines.c.custom_id)
                                 .where(lines.c.batch_id == batch_id, lines.c.state.in_(OPEN))
                                 .order_by(lines.c.idx).limit(1000)).all()
                if not rows:
                    return count
                for row in rows:
                    c.execute(lines.update().where(lines.c.batch_id == batch_id, lines.c.idx == row.idx)
                              .values(state=state, result=result_of(row.custom_id), lease_until=None))
                count += len(rows)

    def counts(self, batch_id: str) -> dict[str, int]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(lines.c.state, sa.func.count()).where(lines.c.batch_id == batch_id)
                             .group_by(lines.c.state)).all()
        return {state: n for state, n in rows}

    def results(self, batch_id: str, states: tuple[str, ...]) -> Iterator[str]:
        """The recorded answers in line order, a page per query."""
        idx = -1
        while True:
            with self.engine.connect() as c:
                rows = c.execute(sa.select(lines.c.idx, lines.c.result)
                                 .where(lines.c.batch_id == batch_id, lines.c.idx > idx, lines.c.state.in_(states))
                                 .order_by(lines.c.idx).limit(1000)).all()
            if not rows:
                return
            for row in rows:
                yield row.result
            idx = rows[-1].idx

    def line_owners(self, batch_id: str) -> dict[str, int]:
        """Who answered how many lines (tests and diagnostics: replicas sharing a batch)."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(lines.c.owner, sa.func.count()).where(
                lines.c.batch_id == batch_id, lines.c.state.in_(("done", "failed")), lines.c.owner.is_not(None))
                .group_by(lines.c.owner)).all()
        return {owner: n for owner, n in rows}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives the process being killed (not a power cut).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
