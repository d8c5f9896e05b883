"""Every error a session server answers with under the contract, in one place.

Each error knows its HTTP status and its OpenAI ``error.type``, so the HTTP
layer renders all of them the same way::

    {"error": {"type": ..., "message": ..., "code": ..., **details}}

Hierarchy::

    SessionServerError
    ├── RequestError                  the client sent something we refuse
    │   ├── InvalidRequest            400 invalid_request
    │   ├── RouteNotFound             404 not_found
    │   ├── MethodNotAllowed          405 method_not_allowed
    │   ├── RequestTimeout            408 request_timeout
    │   └── BodyTooLarge              413 request_too_large
    ├── SessionError                  the session cannot take this operation
    │   ├── SessionNotFound           404 session_not_found
    │   ├── TrajectoryConflict        409 trajectory_conflict
    │   └── SessionDeleted            410 session_deleted   (turn preempted by DELETE)
    ├── UpstreamFailure               the LLM engine did not give us a usable answer
    │   ├── UpstreamError             502 upstream_error
    │   │   └── StreamCut                 (an event) the engine's stream broke after
    │   │                                 chunks were relayed: not retried
    │   └── UpstreamTimeout           504 upstream_timeout
    ├── ServerShuttingDown            503 server_shutting_down
    └── ServerBusy                    503 server_busy       (over --max-turns-in-flight)

The reference server raises them; the parsers of this package raise
``InvalidRequest``; the harness reads their ``error_type`` names. Foreign
exceptions (sockets and h11 toward the engine, JSON decoding) are translated at
the boundary that meets them (``refserver/transport/engine_http.py`` into its
``EngineTransportError``, which ``refserver/upstream.py`` turns into these;
``refserver/app.py``) and nowhere else.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SessionServerError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        # ``code`` duplicates ``type`` because some OpenAI clients read one,
        # some the other; extra fields carry machine-readable details.
        return {
            "error": {
                "type": self.error_type,
                "code": self.error_type,
                "message": self.message,
                **self.details,
            }
        }


class RequestError(SessionServerError):
    pass


class InvalidRequest(RequestError):
    status_code = 400
    error_type = "invalid_request"


class RouteNotFound(RequestError):
    status_code = 404
    error_type = "not_found"


class MethodNotAllowed(RequestError):
    status_code = 405
    error_type = "method_not_allowed"


class RequestTimeout(RequestError):
    status_code = 408
    error_type = "request_timeout"


class BodyTooLarge(RequestError):
    status_code = 413
    error_type = "request_too_large"


class SessionError(SessionServerError):
    pass


class SessionNotFound(SessionError):
    status_code = 404
    error_type = "session_not_found"


class TrajectoryConflict(SessionError):
    status_code = 409
    error_type = "trajectory_conflict"


class SessionDeleted(SessionError):
    status_code = 410
    error_type = "session_deleted"


class UpstreamFailure(SessionServerError):
    pass


class UpstreamError(UpstreamFailure):
    status_code = 502
    error_type = "upstream_error"


class StreamCut(UpstreamError):
    """The engine's stream broke after the client had seen chunks of it.

    Not retried (another attempt would give the client a second beginning), and
    never an HTTP status: the stream ends with an ``upstream_error`` event.
    ``partial`` is the answer as relayed so far (never committed; kept so that a
    known-broken variant can show what committing it looks like).
    """

    def __init__(self, message: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class UpstreamTimeout(UpstreamFailure):
    status_code = 504
    error_type = "upstream_timeout"


class ServerShuttingDown(SessionServerError):
    status_code = 503
    error_type = "server_shutting_down"


class ServerBusy(SessionServerError):
    """More turns are in flight than the server admits; nothing was done, retry."""

    status_code = 503
    error_type = "server_busy"
