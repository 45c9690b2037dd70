"""``autoshrink plugins``: every registered technique, model and dataset, and where it came from."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoshrink.cli.common import add_plugin_argument, discover_plugins, print_json

if TYPE_CHECKING:
    from autoshrink.plugins import PluginHost


def add_parser(verbs) -> None:
    parser = verbs.add_parser("plugins", help="list techniques, models and datasets",
                              description="List everything the installed plugins register.")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def rows(host: PluginHost) -> list[dict]:
    listed = []
    for kind, table in host.registry.items():
        for name, reg in sorted(table.items()):
            stage = reg.obj.stage.label if kind == "technique" else None
            listed.append({"kind": kind, "name": name, "stage": stage, "plugin": reg.plugin,
                           "distribution": reg.distribution, "version": reg.version,
                           "description": getattr(reg.obj, "paper", None)
                           or getattr(reg.obj, "description", "")})
    return listed


def run(args) -> int:
    host = discover_plugins(args)
    listed = rows(host)
    broken = [{"plugin": b.plugin, "distribution": b.distribution, "error": b.error}
              for b in host.broken]
    if args.json:
        print_json({"registered": listed, "broken": broken})
        return 0
    # columns as wide as their longest entry: third-party names can be longer than ours
    name_width = max((len(r["name"]) for r in listed), default=0)
    plugin_width = max((len(r["plugin"]) for r in listed), default=0)
    for kind in ("technique", "model", "dataset"):
        print(f"{kind}s:")
        for row in (r for r in listed if r["kind"] == kind):
            stage = f"[{row['stage']}]" if row["stage"] else ""
            print(f"  {row['name']:<{name_width}} {stage:<16} {row['plugin']:<{plugin_width}}"
                  f" {row['distribution']} {row['version']}  {row['description']}")
    for item in broken:
        print(f"broken plugin {item['plugin']} ({item['distribution']}): {item['error']}")
    return 0
