"""The command line every worker shares: --once, --drain, --log-level, --log-format."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from audio_pipeline.config import ConfigError, EnvReader
from audio_pipeline.logs import LogFormat, configure_logging
from audio_pipeline.runtime.service import RunMode, Service, read_service_config


def build_arg_parser(
    prog: str | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--once", action="store_true", help="handle one claim, then exit")
    modes.add_argument(
        "--drain", action="store_true", help="work until the source queues are empty, then exit"
    )
    parser.add_argument(
        "--log-level",
        default=EnvReader().str("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="default: $LOG_LEVEL or INFO",
    )
    parser.add_argument(
        "--log-format",
        # a string default goes through `type` too, so a bad $LOG_FORMAT is a usage error
        default=EnvReader().str("LOG_FORMAT", LogFormat.LOGFMT.value),
        choices=list(LogFormat),
        type=_log_format,
        help="logfmt lines (default) or one JSON object per line; default: $LOG_FORMAT",
    )
    return parser


def _log_format(value: str) -> LogFormat:
    try:
        return LogFormat(value.lower())
    except ValueError:
        allowed = ", ".join(f.value for f in LogFormat)
        raise argparse.ArgumentTypeError(f"{value!r} is not one of: {allowed}") from None


def run_worker(worker_cls: type[Service], argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the settings, run; returns the process exit code."""
    parser = build_arg_parser(
        prog=f"{worker_cls.stage}-worker", description=(worker_cls.__doc__ or "").strip()
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    mode = RunMode.ONCE if args.once else RunMode.DRAIN if args.drain else RunMode.FOREVER
    try:
        config = read_service_config(worker_cls)
        worker = worker_cls(
            config.settings,
            mode=mode,
            timings=config.timings,
            retry=config.retry,
            stage_settings=config.stage,
            metrics=config.metrics,
        )
    except ConfigError as exc:
        print(f"{worker_cls.stage}-worker: {exc}", file=sys.stderr)
        return 2
    return worker.work()
