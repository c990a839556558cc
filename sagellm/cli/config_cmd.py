"""`sage-llm config show|path|init`: the effective settings, where the file lives, a template."""

from __future__ import annotations

import sys

from sagellm.cli.settings import TEMPLATE, SettingsError, config_path, load_settings


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    show = sub.add_parser("show", help="the effective settings (file < env < flags) and sources")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=run_show)
    sub.add_parser("path", help="print the config file's path").set_defaults(func=run_path)
    init = sub.add_parser("init", help="write a commented template to the config path")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=run_init)
    p.set_defaults(func=run_show, json=False)


def run_path(args) -> int:
    print(config_path())
    return 0


def run_show(args) -> int:
    import json

    import yaml

    try:
        settings, sources = load_settings()
    except SettingsError as e:
        print(f"sage-llm config: error: {e}", file=sys.stderr)
        return 1
    data = settings.model_dump()
    if args.json:
        print(json.dumps({"settings": data, "sources": sources}, indent=2))
        return 0
    path = config_path()
    print(f"# config file: {path}{'' if path.is_file() else ' (absent)'}")
    for line in yaml.safe_dump(data, sort_keys=False).splitlines():
        key = line.split(":", 1)[0].strip()
        full = f"gateway.{key}" if line.startswith("  ") else key
        src = sources.get(full)
        print(f"{line}  # {src}" if src and not line.rstrip().endswith(":") else line)
    return 0


def run_init(args) -> int:
    path = config_path()
    if path.exists() and not args.force:
        print(f"sage-llm config: error: {path} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEMPLATE, encoding="utf-8")
    print(f"wrote {path}")
    return 0
