"""The `mixtral-serve dashboards build|push` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

import configs
from dashboards import build
from dashboards.push import DEFAULT_PROMETHEUS_URL, Credential, push


def add_parser(sub: argparse._SubParsersAction) -> None:
    commands = sub.add_parser("dashboards", help="Grafana dashboards and Prometheus rules").add_subparsers(
        dest="dashboards", required=True)

    p = commands.add_parser("build", help="write the dashboards' JSON and the Prometheus rules (in the working "
                                          "directory unless told where)")
    p.add_argument("--config", type=Path, action="append",
                   help="Serve config (repeat for several): the dashboards show the first one's tiers and targets, "
                        "each gets its own rules file (default: every shipped config, local.yaml first)")
    p.add_argument("--out", type=Path, default=build.JSON_DIR, help="folder for the dashboards' JSON "
                                                                    "(default: %(default)s)")
    p.add_argument("--rules-dir", type=Path, default=build.RULES_DIR,
                   help="folder for the rules files, one <config name>.yml per config (default: %(default)s)")
    p.set_defaults(func=cmd_build)

    p = commands.add_parser("push", help="upload the dashboards (and a Prometheus datasource) to Grafana")
    p.add_argument("--config", type=Path, default=configs.LOCAL,
                   help="Serve config whose tiers and latency targets the dashboards show (default: %(default)s)")
    p.add_argument("--grafana-url", required=True, help="e.g. http://grafana:3000")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="a Grafana service account token")
    auth.add_argument("--basic-auth", metavar="USER:PASSWORD")
    p.add_argument("--folder", default="mixtral-serve", help="Grafana folder (created if missing)")
    p.add_argument("--prometheus-url",
                   help=f"the datasource's URL as Grafana reaches Prometheus (default when creating it: "
                        f"{DEFAULT_PROMETHEUS_URL}; given for an existing one, it is updated)")
    p.set_defaults(func=cmd_push)


def cmd_build(args: argparse.Namespace) -> None:
    for path in build.write(args.config or configs.shipped(), args.out, args.rules_dir):
        print(f"wrote {path}")


def cmd_push(args: argparse.Namespace) -> None:
    credential: Credential = args.token
    if args.basic_auth is not None:
        user, sep, password = args.basic_auth.partition(":")
        if not sep:
            raise ValueError("--basic-auth takes USER:PASSWORD")
        credential = (user, password)
    result = push(args.grafana_url, build.dashboards(args.config), credential, args.folder, args.prometheus_url)
    print(f"datasource {result.datasource}; folder {args.folder!r} (uid {result.folder_uid})")
    for url in result.dashboards:
        print(f"dashboard {url}")
