"""Secrets never leave the process: the one redaction every writer of a config, a log line or an upload uses.

A run's config can hold credentials (``hub_token``; a user's own fields or URLs with a password in them), and the
config is written to many places: ``checkpoint-N/trainer_state.json``, the trackers' init config (tensorboard's
``hparams.yml`` and event files, the wandb / trackio config), the model card, and, with
``hub_strategy="every_save"``, the checkpoints uploaded to the Hub. Each of them goes through :func:`redact`, so
the rule lives in one place:

1. **Secret names.** A mapping key is secret when one of its words is ``token``, ``password``, ``passwd``,
   ``secret``, ``key``, ``apikey``, ``credential(s)``, ``auth``, ``authorization`` or ``cookie``, or ends with
   ``token``, ``password`` or ``secret`` (``hubtoken``). Words are split at ``_``, ``-``, ``.``, spaces and
   camelCase humps, case-insensitively: ``hub_token``, ``HF_TOKEN``, ``apiKey``, ``x-api-key`` and
   ``db_password`` are secret; ``prompt_column``, ``max_tokens`` (a count), ``tokenizer`` and
   ``lora_target_modules`` are not. The value of a secret key becomes ``"***"``, whatever its type (a
   numeric password read from YAML is an int), except ``None`` and booleans, which say whether there is a
   secret, not what it is (``hub_token: null`` stays readable). Containers under a secret key have every leaf
   redacted the same way.
2. **Secret-looking text, under any key.** In every string: the userinfo of a URL
   (``https://user:pw@host/x`` -> ``https://***@host/x``), the value of a URL query parameter with a secret
   name (``?api_key=abc`` -> ``?api_key=***``), and Hugging Face tokens (``hf_`` and 30 or more letters and
   digits, -> ``hf_***``).

No ``EGRPOConfig`` field but ``hub_token`` has a secret name (``tests/test_secrets.py`` checks every field), so
the rule costs the record of a run nothing. The secrets themselves stay usable: the config object keeps them,
only what is written is redacted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

REDACTED = "***"
"""What a redacted secret is replaced with."""

SECRET_WORDS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "secret",
        "key",
        "apikey",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "cookie",
    }
)
"""Words of a key name that make its value a secret (see the module docstring)."""

_SECRET_SUFFIXES = ("token", "password", "secret")

# Words of a name: runs of letters/digits, split again at camelCase humps ("apiKey" -> "api", "Key").
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# scheme://userinfo@ : the userinfo runs up to the last "@" before the host ends (a "/", "?", "#" or space).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#]+@")
# ?name=value or &name=value inside a URL's query string.
_QUERY_PARAMETER = re.compile(r"(?P<lead>[?&;](?P<name>[^=&#\s;?]+)=)(?P<value>[^&#\s;]*)")
# A whole URL: "scheme://" (optional) then everything up to the last "@". Up to the last "@", not the first "/",
# because a password may hold "/" or "#", which would otherwise leave part of it in the message.
_WHOLE_URL_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?.*@", re.DOTALL)
# Hugging Face user access tokens: "hf_" and 34 letters today; 30 or more to be safe.
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}")


def name_words(name: str) -> list[str]:
    """The lower-case words of a key name: ``"hub_token"`` -> ``["hub", "token"]``, ``"apiKey"`` ->
    ``["api", "key"]``, ``"HF_TOKEN"`` -> ``["hf", "token"]``."""
    return [word.lower() for word in _WORD.findall(str(name))]


def is_secret_name(name: str) -> bool:
    """Whether a key named ``name`` holds a secret: one of its words is in :data:`SECRET_WORDS` or ends with
    ``token``, ``password`` or ``secret`` (rule 1 of the module docstring)."""
    return any(word in SECRET_WORDS or word.endswith(_SECRET_SUFFIXES) for word in name_words(name))


def redact_text(text: str) -> str:
    """``text`` with URL userinfo, secret URL query parameters and Hugging Face tokens replaced by ``***``
    (rule 2 of the module docstring); everything else unchanged."""
    text = _URL_USERINFO.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)
    text = _QUERY_PARAMETER.sub(
        lambda match: match["lead"] + REDACTED if is_secret_name(match["name"]) and match["value"] else match[0],
        text,
    )
    return _HF_TOKEN.sub(f"hf_{REDACTED}", text)


def redact_url(url: str) -> str:
    """One URL (not free text) with its userinfo replaced by ``***@``: ``http://user:pw@host`` and
    ``user:pw@host`` -> ``***@host``, up to the URL's last ``@``, so a password holding ``/`` or ``#`` is
    masked whole. Unchanged if the URL has no ``@``."""
    return _WHOLE_URL_USERINFO.sub(lambda match: (match.group(1) or "") + f"{REDACTED}@", str(url), count=1)


def redact(value, *, secret: bool = False):
    """A copy of ``value`` (a config dict, or any nesting of mappings, lists, tuples and scalars) that is safe
    to write anywhere: the values of secret keys replaced by ``"***"`` and secret-looking text redacted in every
    string (the rule of the module docstring). ``value`` itself is not changed.

    Args:
        value: what is about to be written.
        secret: whether ``value`` sits under a secret key (then every leaf but ``None`` and booleans is
            redacted).

    Returns:
        The redacted copy: mappings become dicts, lists stay lists, other sequences (tuples) become tuples.
    """
    if isinstance(value, Mapping):
        return {key: redact(item, secret=secret or is_secret_name(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [redact(item, secret=secret) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if value is None or isinstance(value, bool):
        return value
    if secret:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value
