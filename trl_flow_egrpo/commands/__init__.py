"""The ``trl-flow-egrpo`` subcommands that run a recipe: ``train`` (:mod:`.train`) and ``evaluate`` (:mod:`.evaluate`).

Each module reads its options with ``trl.TrlParser`` (a YAML recipe given to ``--config``, overridden by the
command line) and imports torch only once it runs, so that ``--help`` answers at once. ``examples/hpd.py`` and
``examples/evaluate.py`` are the same commands as scripts.
"""

from __future__ import annotations


def parse_recipe(dataclass_types: tuple[type, ...], argv: list[str], prog: str | None, other_commands_keys: bool):
    """The dataclasses of ``dataclass_types`` from ``--config RECIPE.yaml`` and the options of ``argv``.

    Args:
        dataclass_types: the dataclasses whose fields are the options (``EGRPOConfig`` among them).
        argv: the command line, without the command's name.
        prog: the command's name in ``--help`` and the errors.
        other_commands_keys: whether the recipe may hold keys of another command (``evaluate`` reads training
            recipes, whose rewards and training prompts are ``train``'s), which are then ignored.

    Exits with status 2 and a one-line error (no traceback) for an unknown option or recipe key, and for a value
    the config refuses (its message names the fix).
    """
    from trl import TrlParser

    parser = TrlParser(dataclass_types, prog=prog)

    def fail(message: str):  # not parser.error: its usage line lists every option, burying the message
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    try:
        *parsed, recipe_unknown, command_line_unknown = parser.parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as error:
        fail(str(error))
    if command_line_unknown:
        fail(f"unknown options: {' '.join(command_line_unknown)} (--help lists them)")
    if recipe_unknown and not other_commands_keys:
        keys = [item.removeprefix("--") for item in recipe_unknown if item.startswith("--")]
        fail(f"unknown keys in the recipe: {', '.join(keys)} (remove them; --help lists the options)")
    return tuple(parsed)
