"""The ``n2v-chunked`` command line's ``--config`` file and ``--storage-options``.

A YAML file gives option defaults, one section per subcommand, and the object
store's client options under a top-level ``storage_options:``, e.g.::

    storage_options:
      endpoint_url: https://s3.example.org
    predict:
      chunks: [1, 512, 512]
      scheduler: slurm

Values arrive typed and are checked like the command line would check them;
the command line's own options win over the file's.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ..errors import ConfigError
from ..model.typecheck import BAD, conform, mismatch


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """Declare ``--storage-options KEY=VALUE`` (repeatable) on a subcommand that reads or writes URLs."""
    p.add_argument(
        "--storage-options", action="append", metavar="KEY=VALUE", default=None,
        help="option for the object store's client (obstore), repeatable: endpoint_url=..., anon=true, "
        "profile=..., region=..., or any of obstore's S3 settings; credentials best come from the AWS "
        "environment variables or ~/.aws (see docs/object_stores.md)",
    )


def configure_stores(args: argparse.Namespace, top: Any) -> None:
    """Storage options (YAML ``storage_options:`` then ``--storage-options``) for the run's URLs."""
    from ..io import objects, stores

    urls = [str(getattr(args, k)) for k in ("input", "output") if isinstance(getattr(args, k, None), str)]
    for url in urls:
        stores.require_client(url)
    if isinstance(getattr(args, "output", None), str):
        stores.check_writable(args.output)
    options = stores.parse_storage_options(top) if top else {}
    for key, val in stores.parse_storage_options(getattr(args, "storage_options", None)).items():
        options[key] = {**options[key], **val} if isinstance(val, dict) and isinstance(options.get(key), dict) else val
    objects.configure(options, urls)


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Any:
    """Use the ``--config`` YAML file's section for the chosen command as defaults.

    Returns the file's top-level ``storage_options:`` mapping (None without one).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    if not known.config:
        return None
    from ..model.config import read_config_file

    data = read_config_file(known.config)
    top = data.get("storage_options")
    if top is not None and not isinstance(top, dict):
        raise ConfigError(f"config file {known.config}: 'storage_options' must be a mapping")
    command = next((a for a in rest if not a.startswith("-")), None)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in subparsers.choices:
        return top
    sp = subparsers.choices[command]
    section: dict[str, Any] = dict(data.get(command, {}) or {})
    if not isinstance(section, dict):
        raise ConfigError(f"config file {known.config}: section '{command}' must be a mapping")
    if isinstance(section.get("storage_options"), dict):  # a mapping here, KEY=VALUE items on the command line
        from ..io.stores import parse_storage_options

        top = {**(top or {}), **parse_storage_options(section.pop("storage_options"))}
    dests = {a.dest for a in sp._actions}
    unknown = sorted(k for k in section if k.replace("-", "_") not in dests)
    if unknown:
        raise ConfigError(f"config file {known.config}: unknown option(s) for '{command}': {', '.join(unknown)}")
    actions = {a.dest: a for a in sp._actions}
    where = f"config file {known.config}, section '{command}'"
    sp.set_defaults(**{k.replace("-", "_"): _option_value(actions[k.replace("-", "_")], k, v, where)
                       for k, v in section.items()})
    sp.set_defaults(config_given=frozenset(k.replace("-", "_") for k in section))  # for given_options
    # Positionals given in the file satisfy argparse only if they are optional there.
    for action in sp._actions:
        if action.dest in {k.replace("-", "_") for k in section} and not action.option_strings:
            action.nargs = "?"
    return top


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str], args: argparse.Namespace) -> frozenset[str]:
    """The options (``dest`` names) the user gave: on the command line or in the ``--config`` file.

    An option given with its default value counts as given, unlike a
    comparison with the defaults could tell: ``train --resume`` needs to know
    what was asked, to apply it or refuse it (:func:`n2v_chunked.model.config.resumed`).
    """
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sp = subparsers.choices.get(getattr(args, "command", None))
    if sp is None:
        return frozenset()
    unset = object()
    # options that add to their default (--author A --author B) start from None instead: None is "not given"
    adding = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction, argparse._ExtendAction)
    actions = [a for a in sp._actions if a.option_strings and a.default is not argparse.SUPPRESS]
    saved = [(a, a.default) for a in actions], dict(sp._defaults)
    try:
        for a in actions:
            a.default = None if isinstance(a, adding) else unset
            if a.dest in sp._defaults:
                sp._defaults[a.dest] = a.default
        again = parser.parse_args(argv)
    finally:
        for a, default in saved[0]:
            a.default = default
        sp._defaults.clear()
        sp._defaults.update(saved[1])
    from_line = {k for k, v in vars(again).items()
                 if v is not unset and not (v is None and k in {a.dest for a in actions if isinstance(a, adding)})}
    return frozenset(from_line | set(getattr(args, "config_given", ())))


# String options that a config file may also give as a YAML list
LIST_OPTIONS: dict[str, Any] = {"chunks": list[int], "shards": list[int], "patch": list[int], "struct_axes": list[str]}


def _option_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A ``--config`` value checked like the command line would: type, then choices.

    argparse converts only command-line strings; YAML values arrive typed and
    must be of the option's type (``steps: 2.5`` or ``lr: "0.001"`` is refused).
    """
    if value is None and action.default is None:
        return None  # ``device: null``: the option's own default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        hint: Any = bool
    elif action.type in (int, float):
        hint = action.type
    else:
        hint = str | LIST_OPTIONS[action.dest] if action.dest in LIST_OPTIONS else str
        if action.choices is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # ``ngff: 0.5`` is a number to YAML
    out = conform(value, hint)
    if out is BAD:
        raise ConfigError(f"{where}: {mismatch(key, value, hint)}")
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: {key!r} = {value!r} must be one of {', '.join(map(str, action.choices))}")
    return out
