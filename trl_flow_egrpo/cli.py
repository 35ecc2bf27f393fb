"""The ``trl-flow-egrpo`` command.

- ``trl-flow-egrpo train --config RECIPE.yaml [--field value ...]``: train with E-GRPO
  (:mod:`trl_flow_egrpo.commands.train`, the same as ``examples/hpd.py``).
- ``trl-flow-egrpo evaluate [--config RECIPE.yaml] --trained_model DIR ...``: score a base model and its
  fine-tune (:mod:`trl_flow_egrpo.commands.evaluate`, the same as ``examples/evaluate.py``).
- ``trl-flow-egrpo serve-reward NAME``: serve one reward over HTTP for
  :class:`~trl_flow_egrpo.rewards.remote.RemoteReward` (see ``docs/remote-rewards.md``). ``NAME`` is a built-in
  reward (``hps``, ``clip``, ``pickscore``, ``image_reward``, ``ocr``, ``color``, ...) or ``module:callable``.

Without the console script, and under a launcher: ``python -m trl_flow_egrpo.cli COMMAND ...``,
``accelerate launch -m trl_flow_egrpo.cli train --config RECIPE.yaml``. Nothing heavy (torch, diffusers) is
imported before a command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from . import __version__

DEFAULT_PORT = 8711

RECIPE_COMMANDS = {
    "train": "train with E-GRPO from a YAML recipe (--config) and options (the fields of EGRPOConfig)",
    "evaluate": "score a base model and its fine-tune side by side, with the paper's metrics",
}
"""The subcommands that parse their own options (``trl.TrlParser``), in :mod:`trl_flow_egrpo.commands`."""


def build_parser(serve_arguments: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``trl-flow-egrpo`` command.

    ``train`` and ``evaluate`` are listed only: :func:`main` hands their options to their own parsers.
    ``serve_arguments=False`` leaves out the options of ``serve-reward``, whose defaults come from a module that
    imports torch: the top-level ``--help`` does not need them.
    """
    parser = argparse.ArgumentParser(
        prog="trl-flow-egrpo",
        description="E-GRPO for flow-matching text-to-image models: train, evaluate, serve rewards.",
        epilog="`trl-flow-egrpo COMMAND --help` lists the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in RECIPE_COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    serve = commands.add_parser(
        "serve-reward",
        help="serve a reward over HTTP for RemoteReward",
        description="Serve one reward over HTTP (POST /score, GET /health) for trl_flow_egrpo.rewards.RemoteReward. "
        "Binds to 127.0.0.1 unless --host says otherwise.",
    )
    if serve_arguments:
        add_serve_arguments(serve)
    return parser


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The options of ``serve-reward``."""
    from .serve.protocol import DEFAULT_REQUEST_TIMEOUT, MIN_TOKEN_LENGTH, TOKEN_ENV

    serve.add_argument(
        "name",
        help="a built-in reward (hps, clip, pickscore, image_reward, ocr, color, brightness, "
        "jpeg_compressibility, ...) or module:callable",
    )
    serve.add_argument(
        "--reward-kwargs",
        default="{}",
        metavar="JSON",
        help='keyword arguments of the reward as a JSON object, e.g. \'{"checkpoint": "weights/hps.pt", '
        '"dtype": "float16"}\'',
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all, which "
        f"requires a token in ${TOKEN_ENV})",
    )
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    serve.add_argument(
        "--device", default=None, help="device the reward scores on (default: cuda if available, else cpu)"
    )
    serve.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="the most images per reward call; concurrent requests are merged up to it (default 64)",
    )
    serve.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        metavar="VAR",
        help=f"environment variable holding the bearer token clients must send (default {TOKEN_ENV}); "
        f"unset or empty: no token; at least {MIN_TOKEN_LENGTH} visible ASCII characters, no whitespace",
    )
    serve.add_argument(
        "--max-request-mb",
        type=float,
        default=512.0,
        help="the most megabytes (10^6 bytes) per request body and per request's decoded images (default 512)",
    )
    serve.add_argument("--max-batch", type=int, default=1024, help="the most images per request (default 1024)")
    serve.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="requests handled at once; beyond it requests get 503 and clients retry (default 64). Open "
        "connections that have not sent a request do not count",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        metavar="SECONDS",
        help="a connection that has not sent a complete request head (request line and headers) this many seconds "
        "after opening, or after the first byte of its next request, is closed; a request body that stalls "
        f"this long gets 408 (default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    serve.add_argument(
        "--no-warmup",
        action="store_true",
        help="do not score a test image before serving (the model then loads on the first request)",
    )
    serve.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="allow a non-loopback --host without a token (anyone reaching the port can use the reward)",
    )
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve_reward(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Build the reward and its scorer, bind the port, print the URL, serve until interrupted."""
    from .serve import server
    from .serve.protocol import check_token

    try:
        reward_kwargs = json.loads(args.reward_kwargs)
    except ValueError as error:
        parser.error(f'--reward-kwargs is not valid JSON ({error}): give an object like \'{{"dtype": "float16"}}\'.')
    if not isinstance(reward_kwargs, dict):
        parser.error(f"--reward-kwargs must be a JSON object, got {args.reward_kwargs!r}.")
    for option in ("batch_size", "max_batch", "max_connections"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}.")
    if not args.max_request_mb > 0:
        parser.error(f"--max-request-mb must be > 0, got {args.max_request_mb}.")
    if not 0 < args.request_timeout < float("inf"):
        parser.error(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}.")
    token = os.environ.get(args.token_env) or None
    if token is not None:
        try:
            check_token(token)
        except ValueError as error:
            parser.error(f"${args.token_env}: {error}")
    if token is None and not server.is_loopback(args.host) and not args.insecure_no_token:
        parser.error(
            f"--host {args.host} accepts connections from other machines, so the server needs a token: set "
            f"${args.token_env} (and the same token on the clients), or pass --insecure-no-token."
        )

    try:
        reward = server.load_reward(args.name, reward_kwargs)
        scorer = server.BatchScorer(reward, args.device or server.default_device(), args.batch_size)
        if not args.no_warmup:
            server.warm_up(scorer)
        sock = server.bind(args.host, args.port)
    except (ValueError, ImportError, OSError, RuntimeError, TypeError) as error:
        parser.exit(1, f"trl-flow-egrpo serve-reward: cannot serve {args.name!r}: {type(error).__name__}: {error}\n")
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"Serving reward '{scorer.name}' on http://{url_host}:{port} (device {scorer.device}, batch size "
        f"{scorer.batch_size}, {'token required' if token else 'no token'})",
        flush=True,
    )
    server.run(
        scorer,
        sock,
        token=token,
        max_request_bytes=int(args.max_request_mb * 1e6),
        max_images=args.max_batch,
        max_connections=args.max_connections,
        request_timeout=args.request_timeout,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``trl-flow-egrpo`` console script (and of ``python -m trl_flow_egrpo.cli``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in RECIPE_COMMANDS:
        module = importlib.import_module(f".commands.{command}", __package__)
        prog = f"trl-flow-egrpo {command}"
        if command == "train":  # what torchrun must run, should accelerate's CPU launch be refused
            module.main(argv[1:], prog=prog, launched_as=["-m", "trl_flow_egrpo.cli", command])
        else:
            module.main(argv[1:], prog=prog)
        return
    parser = build_parser(serve_arguments=command == "serve-reward")
    args = parser.parse_args(argv)
    if args.command == "serve-reward":
        serve_reward(args, parser)


if __name__ == "__main__":
    main()
