"""#19 item 9: the API's store work (recording pairs, votes, the canary's head-to-head, the
relay) runs off the event loop, so a store that is slow to answer never stalls the server.

The slow store is caused for real: another connection holds SQLite's write lock (as a long
transaction or a backup would), and a vote queues behind it for up to the busy timeout.
(How fast /healthz stays with a million voted rows during a canary is a benchmark:
bench/store_load.py.)
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from kaizen.core.settings import Settings
from tests.conftest import USER_KEY

HOLD_S = 4.0
"""How long the lock is held. A vote on the event loop would freeze the whole server for that
long; off the loop, probes and chats answer meanwhile."""


def test_a_vote_waiting_on_a_locked_store_does_not_stall_the_server(api_server: tuple[str, Settings]) -> None:
    """#19 item 9: while a vote waits for the store's write lock, /healthz and chat answer."""
    base, settings = api_server
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    chat = {"model": settings.served_model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    pair = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=120,
                      json={**chat, "comparison": "force"})
    assert pair.status_code == 200, pair.text
    cid = pair.json()["comparison_id"]

    lock = sqlite3.connect(settings.api_db, timeout=30, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # this connection now holds the store's write lock
    probes = chats = 0
    try:
        with ThreadPoolExecutor(1) as pool:
            vote = pool.submit(httpx.post, f"{base}/v1/feedback", headers=headers, timeout=60,
                               json={"comparison_id": cid, "choice": 0})
            deadline = time.monotonic() + HOLD_S
            while time.monotonic() < deadline:
                # a timeout here (the server frozen behind the vote) fails the test
                assert httpx.get(f"{base}/healthz", timeout=HOLD_S / 2).status_code == 200
                probes += 1
                if chats == 0:
                    r = httpx.post(f"{base}/v1/chat/completions", headers=headers, json=chat, timeout=HOLD_S)
                    assert r.status_code == 200, r.text
                    chats += 1
                time.sleep(0.05)
            assert not vote.done(), "the vote did not wait for the lock: the test proves nothing"
            lock.execute("COMMIT")
            answer = vote.result(timeout=60)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    assert answer.status_code == 202, answer.text  # the vote was kept, only delayed
    assert probes >= 2 and chats == 1
