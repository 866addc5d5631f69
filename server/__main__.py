"""``python -m server``: run patchserve with uvicorn on ``PATCHSERVE_HOST:PATCHSERVE_PORT``.

SIGTERM drains: uvicorn stops accepting connections, lets in-flight requests (streams included)
finish for up to ``PATCHSERVE_DRAIN_TIMEOUT`` seconds, runs the shutdown (engine stop), and the
process exits 0. (uvicorn re-raises the signal after its shutdown; the handler installed here turns
that into a normal exit, so orchestrators see a clean stop, not a kill.)
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn

from server.app import create_app
from server.settings import Settings

log = logging.getLogger("server")


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    log.info("stopped by %s after draining", signal.Signals(signum).name)
    sys.exit(0)


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change batch at INFO
    signal.signal(signal.SIGTERM, _exit_cleanly)  # restored by uvicorn after its graceful shutdown
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout,
    )


if __name__ == "__main__":  # vLLM spawns worker processes: the guard keeps them from re-running main()
    main()
