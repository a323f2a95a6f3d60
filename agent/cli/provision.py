"""``ebike-agent provision``: the unit takes its identity (device id, broker, certificates)
from the boot partition, moves the secrets into /etc/ebike-agent and removes them from
the card's FAT partition (agent/provision.py, docs/provisioning.md).

systemd runs it as root at boot, before the agent, whenever the boot partition's
``ebike-agent/`` directory holds a file (packaging/ebike-agent-provision.service). Nothing
there: exit 0 and nothing said. A bad provisioning file: exit 2 with file, key and
reason, nothing changed, so the agent starts on its old configuration.
"""

from __future__ import annotations

import argparse
import json
import os

from agent.cli.common import DEFAULT_CONFIG

BOOT_DIR = "/boot/firmware/ebike-agent"
ETC_DIR = "/etc/ebike-agent"
SERVICE_USER = "ebike-agent"  # the agent's, so it can read its key (packaging/ebike-agent.service)


def _provision(args: argparse.Namespace) -> int:
    from agent.provision import Outcome, provision

    out = provision(args.boot, args.etc, args.config, args.owner, check=args.check)
    if args.json:
        done = out or Outcome()
        print(json.dumps({"provisioned": bool(done.device_id) and not args.check, "check": args.check, **vars(done)}))
        return 0
    if out is None:
        return 0
    if args.check:
        print(f"ok: {os.path.join(args.boot, 'provision.toml')}: {out.device_id}: " + ", ".join(out.keys)
              + "; nothing changed (--check)")
        return 0
    if not out.device_id:
        print(f"removed from {args.boot} (left by a provisioning cut short, installed already): "
              + ", ".join(os.path.basename(p) for p in out.removed))
        return 0
    print(f"provisioned {out.device_id} from {os.path.join(args.boot, 'provision.toml')}: " + ", ".join(out.keys))
    print(f"{out.config}: " + (f"written, the previous file kept as {out.config}.previous" if out.config_written
                               else "already so"))
    who = out.owner or "root (there is no user " + args.owner + ")"
    if out.installed:
        print(f"installed, mode 0600, owner {who}: " + ", ".join(out.installed))
    print(f"removed from {args.boot}: " + ", ".join(os.path.basename(p) for p in out.removed))
    print("the agent uses it from its next start")
    return 0


def add_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "provision", help="take this unit's identity from the boot partition (first boot)",
        description="Read DIR/provision.toml (--boot) and the files it names (certificates, key, command trust "
                    "keys), check them all, merge the file into the configuration (--config; the previous file "
                    "kept as FILE.previous), install the files in --etc with mode 0600 for the service user, "
                    "and only then remove them from the boot partition. A bad file: exit 2, nothing changed. "
                    "Nothing in DIR: exit 0, nothing said. Safe to run again after a power cut: it finishes the "
                    "job. See docs/provisioning.md.")
    p.add_argument("--boot", default=BOOT_DIR, metavar="DIR", help="the provisioning directory (default %(default)s)")
    p.add_argument("--etc", default=ETC_DIR, metavar="DIR",
                   help="where the secrets go (default %(default)s)")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help="the agent's configuration (default %(default)s)")
    p.add_argument("--owner", default=SERVICE_USER, metavar="USER",
                   help="the user the installed files belong to: the agent's (default %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="only check DIR against the configuration (a flashing station, before writing a card)")
    p.add_argument("--json", action="store_true", help="what was done, as one JSON document")
    p.set_defaults(func=_provision)
