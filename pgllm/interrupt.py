"""Ctrl-C that stops the server's work every time, wherever the signal lands.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is. During a
statement that is often a psycopg notice handler: `pgllm train` draws its progress bar in one, for
each step the server reports. psycopg calls notice handlers from libpq's callback, which cannot
pass an exception on: it logs it and drops it. The interrupt was lost and training went on
(tests/test_training.py::test_ctrl_c_loses_at_most_the_chunk_in_progress failed that way on a busy
machine, where more of the time goes to drawing the bar).

So, while one of pgllm's connections has a statement in progress, SIGINT raises nothing: it
records the interrupt and asks the server to cancel the statement (libpq's PQcancel, which is
made for this), from a thread that repeats the request until the statement has ended, because a
cancel that reaches the server between the statement's protocol messages is dropped. The
statement then fails with QueryCanceled, which the command reports as interrupted (`requested()`
tells it apart from a statement_timeout). With no statement in progress, SIGINT raises
KeyboardInterrupt as usual; so does a second Ctrl-C, for whoever must stop at once.
"""

from __future__ import annotations

import signal
import threading
import weakref

import psycopg
from psycopg import pq

# every connection pgllm opened (db.connect), so that the handler finds the busy ones
_connections: "weakref.WeakSet[psycopg.Connection]" = weakref.WeakSet()
_requested = threading.Event()
REPEAT_S = 0.5  # between cancel requests while the statement runs on


def watch(conn: psycopg.Connection) -> psycopg.Connection:
    """Let Ctrl-C cancel this connection's statements."""
    _connections.add(conn)
    return conn


def requested() -> bool:
    """Whether Ctrl-C was pressed (a QueryCanceled that follows is the interrupt, not a timeout)."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt when Ctrl-C was pressed; for loops between statements, where a
    statement finished before the server saw the cancel."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _busy(conn: psycopg.Connection) -> bool:
    return not conn.closed and conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE


def _cancel_until_done(conn: psycopg.Connection, cancel) -> None:
    stop = threading.Event()
    while _busy(conn):
        try:
            cancel.cancel()
        except psycopg.Error:
            return  # the server is gone: the statement fails by itself
        stop.wait(REPEAT_S)


def _on_sigint(signum, frame) -> None:
    first = not _requested.is_set()
    _requested.set()
    busy = [c for c in list(_connections) if _busy(c)]
    if not busy or not first:
        raise KeyboardInterrupt
    for conn in busy:
        threading.Thread(target=_cancel_until_done, args=(conn, conn.pgconn.get_cancel()),
                         name="pgllm-cancel", daemon=True).start()


def install() -> None:
    """Handle SIGINT as above (the `pgllm` command; the library leaves signals alone)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
