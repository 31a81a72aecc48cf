"""What a job prints: the project's own messages once, library chatter in a per-rank log file.

NeMo, megatron-core, Lightning and OneLogger report through Python's ``logging`` (NeMo's
``nemo_logger`` and, once NeMo's logger is set up, ``megatron.core`` with console handlers of
their own, not propagating to the root). Left alone, every rank prints megatron's
parallel-group listings, telemetry notices and deprecation messages. With
``verbose=false`` (the default) :func:`quiet_console`:

* filters every console handler (Hydra's on the root logger, NeMo's, any other library's):
  it shows records of the project's ``nemo_upcycle.*`` loggers (INFO from rank 0, warnings
  from every rank) and errors from any logger on every rank, nothing else;
* writes every record of this rank, library INFO and warnings included, to
  ``<log_dir>/logs/rank<k>.log`` (:func:`log_to_file`, called once the job may write
  ``log_dir``: a rejected command leaves no file behind; records until then are kept);
* routes Python warnings into logging (so into that file).

User errors, guard messages, crash tracebacks and the step lines are printed directly to
stdout/stderr and are untouched. ``verbose=true`` leaves the console as the libraries set
it up (everything on every rank) and still writes the log file.

Handlers that libraries create after :func:`quiet_console` (NeMo's, on import) are adopted
by :func:`adopt_library_handlers`; the training job calls it right after importing NeMo.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

LOG_SUBDIR = "logs"
PROJECT_LOGGER = "nemo_upcycle"
# Libraries that log through loggers of their own that do not propagate to the root.
_LIBRARY_LOGGERS = ("nemo_logger", "megatron.core")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MAX_PENDING = 100_000


def run_log_path(log_dir: str | Path, rank: int) -> Path:
    return Path(log_dir) / LOG_SUBDIR / f"rank{rank}.log"


class _ConsolePolicy(logging.Filter):
    """What a console handler shows when ``verbose=false``.

    One instance sits on every console handler, so it also drops a record that reaches a
    second console handler (a library logger's own and the root's).
    """

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self._shown: Optional[logging.LogRecord] = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record is self._shown:
            return False
        if record.levelno >= logging.ERROR:
            show = True
        elif record.name == PROJECT_LOGGER or record.name.startswith(PROJECT_LOGGER + "."):
            show = self.rank == 0 or record.levelno >= logging.WARNING
        else:
            show = False
        if show:
            self._shown = record
        return show


class _RunLog(logging.Handler):
    """This rank's log file. Attached to the root and to each logger that does not propagate;
    a record that passes two of them is written once. Records are held until the file may be
    created (:meth:`open`)."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter(_FORMAT))
        self._last: Optional[logging.LogRecord] = None
        self._pending: list[logging.LogRecord] = []
        self._file: Optional[logging.FileHandler] = None
        self.path: Optional[Path] = None

    def open(self, path: Path) -> None:
        if self._file is not None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self._file.setFormatter(self.formatter)
        self.path = path
        self._file.stream.write(f"==== launch at {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        pending, self._pending = self._pending, []
        for record in pending:
            self._file.emit(record)

    def emit(self, record: logging.LogRecord) -> None:
        if record is self._last:
            return
        self._last = record
        if self._file is not None:
            self._file.emit(record)
        elif len(self._pending) < _MAX_PENDING:
            self._pending.append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class _Console:
    def __init__(self, rank: int, verbose: bool):
        self.rank = rank
        self.verbose = verbose
        self.policy = _ConsolePolicy(rank)
        self.run_log = _RunLog()


_CONSOLE: Optional[_Console] = None


def quiet_console(rank: int, verbose: bool = False) -> None:
    """Set up this process's console and log file (see the module docstring). Idempotent."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = _Console(rank, verbose)
        logging.getLogger().addHandler(_CONSOLE.run_log)
        if not verbose:
            logging.captureWarnings(True)
        # Library INFO must reach the file (Hydra's job logging already sets the root to INFO).
        if logging.getLogger().getEffectiveLevel() > logging.INFO:
            logging.getLogger().setLevel(logging.INFO)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name)  # created now: they get the log file before any library adds handlers
    adopt_library_handlers()


def adopt_library_handlers() -> None:
    """Filter console handlers added since :func:`quiet_console`; give each logger that does
    not propagate to the root the log file. A no-op when the console was never set up."""
    if _CONSOLE is None:
        return
    root = logging.getLogger()
    loggers = [root, *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                       if isinstance(lg, logging.Logger))]
    for logger in loggers:
        if not _CONSOLE.verbose:
            for handler in logger.handlers:
                if _is_console(handler) and _CONSOLE.policy not in handler.filters:
                    handler.addFilter(_CONSOLE.policy)
        if logger is not root and (not logger.propagate or logger.name in _LIBRARY_LOGGERS) \
                and _CONSOLE.run_log not in logger.handlers:
            logger.addHandler(_CONSOLE.run_log)


def log_to_file(log_dir: str | Path) -> Optional[Path]:
    """Start writing ``<log_dir>/logs/rank<k>.log`` (with the records held so far)."""
    if _CONSOLE is None:
        return None
    _CONSOLE.run_log.open(run_log_path(log_dir, _CONSOLE.rank))
    return _CONSOLE.run_log.path


def _is_console(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
