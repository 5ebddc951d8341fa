"""Metadata filters on PostgreSQL (jsonb containment): AND across keys, OR within a key,
exact matches of any Unicode text, served by the GIN index."""

from __future__ import annotations

from typing import Any

import pytest

from deferq.store.base import ExecutionQuery
from tests.postgres.support import new

psycopg = pytest.importorskip("psycopg")

from deferq.store.postgres import PostgresStore  # noqa: E402

pytestmark = pytest.mark.postgres

METADATA = {
    "tokyo_sign_in": {"客户": "東京", "flow": "sign-in"},
    "osaka_sign_in": {"客户": "大阪", "flow": "sign-in"},
    "tokyo_sign_up": {"客户": "東京", "flow": "sign-up"},
    "quoted": {'say "hi"': "back\\slash", "emoji": "👩‍💻"},
    "none": {},
}


@pytest.fixture
def stored(store: PostgresStore) -> dict[str, str]:
    ids = {}
    for name, metadata in METADATA.items():
        ids[name] = store.enqueue([new(metadata=metadata)])[0].id
    return ids


def matching(store: PostgresStore, stored: dict[str, str], **metadata: Any) -> set[str]:
    page = store.list_executions(ExecutionQuery(metadata=metadata["m"], first=100))
    names = {v: k for k, v in stored.items()}
    return {names[e.id] for e in page.items}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"客户": ["東京"]}, {"tokyo_sign_in", "tokyo_sign_up"}),
        ({"客户": ["東京", "大阪"]}, {"tokyo_sign_in", "osaka_sign_in", "tokyo_sign_up"}),
        ({"客户": ["東京", "大阪"], "flow": ["sign-in"]}, {"tokyo_sign_in", "osaka_sign_in"}),
        ({"客户": ["東京"], "flow": ["sign-up", "nope"]}, {"tokyo_sign_up"}),
        ({"客户": ["東"]}, set()),  # no prefix match
        ({"flow": ["SIGN-IN"]}, set()),  # no case folding
        ({'say "hi"': ["back\\slash"]}, {"quoted"}),
        ({"emoji": ["👩‍💻"]}, {"quoted"}),
        ({"missing": ["x"]}, set()),
    ],
)
def test_metadata_filters(
    store: PostgresStore, stored: dict[str, str], filters: Any, expected: set[str]
) -> None:
    assert matching(store, stored, m=filters) == expected


def test_metadata_round_trips_exactly(store: PostgresStore, stored: dict[str, str]) -> None:
    for name, metadata in METADATA.items():
        assert store.get_execution(stored[name]).metadata == metadata  # type: ignore[union-attr]


def test_the_gin_index_serves_metadata_filters(store: PostgresStore) -> None:
    with store._borrow() as item, item.conn.transaction():
        item.conn.execute("SET LOCAL enable_seqscan = off")
        plan = item.conn.execute(
            "EXPLAIN SELECT id FROM deferq_executions"
            " WHERE metadata @> %s::jsonb OR metadata @> %s::jsonb",
            ('{"客户": "東京"}', '{"客户": "大阪"}'),
        ).fetchall()
    assert "deferq_executions_metadata" in "\n".join(row[0] for row in plan)
