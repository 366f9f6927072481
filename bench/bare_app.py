"""The write-path baseline: the least a FastAPI + psycopg insert endpoint can do on the same Postgres.

Run as ``python -m bench.bare_app DSN PORT``; it owns a throwaway table ``bench_bare_insert``.
"""

from __future__ import annotations

import sys
import uuid
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from psycopg_pool import ConnectionPool


def create_app(dsn: str) -> FastAPI:
    pool = ConnectionPool(dsn, min_size=4, max_size=20, open=False)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        pool.open()
        with pool.connection() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS bench_bare_insert (id uuid PRIMARY KEY, body jsonb NOT NULL)")
        yield
        with pool.connection() as conn:
            conn.execute("DROP TABLE IF EXISTS bench_bare_insert")
        pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "READY"}

    @app.post("/patients", status_code=201)
    def create(body: dict[str, Any]) -> dict[str, str]:
        new_id = str(uuid.uuid4())
        from psycopg.types.json import Jsonb

        with pool.connection() as conn:
            conn.execute("INSERT INTO bench_bare_insert (id, body) VALUES (%s, %s)", (new_id, Jsonb(body)))
        return {"id": new_id}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
