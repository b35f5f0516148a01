#!/usr/bin/env python3
"""A standard TUF client (python-tuf's ngclient) against a repository the depot serves.

Refreshes the repository from a trusted root, keeping its metadata in --state between runs
(so rollback protection holds across runs), and optionally downloads and verifies a target.
Prints one JSON object; exits 0 on success, 2 when the client refuses, 3 for an unknown target.
"""
import argparse
import json
import os
import shutil
import sys

from tuf.api import exceptions
from tuf.ngclient import Updater


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--metadata-url", required=True)
    p.add_argument("--targets-url", required=True)
    p.add_argument("--root", required=True, help="the trusted root metadata file")
    p.add_argument("--state", required=True, help="client metadata directory, kept between runs")
    p.add_argument("--target")
    p.add_argument("--out")
    a = p.parse_args()

    os.makedirs(a.state, exist_ok=True)
    trusted = os.path.join(a.state, "root.json")
    if not os.path.exists(trusted):
        shutil.copy(a.root, trusted)
    try:
        # bootstrap=None: trust the root kept in the state directory, which the client itself
        # advances through root rotations.
        updater = Updater(
            metadata_dir=a.state,
            metadata_base_url=a.metadata_url,
            target_base_url=a.targets_url,
            target_dir=os.path.dirname(os.path.abspath(a.out)) if a.out else a.state,
            bootstrap=None,
        )
        updater.refresh()
        result = {"refreshed": True, "targets": sorted(updater._trusted_set.targets.targets.keys())}
        if a.target:
            info = updater.get_targetinfo(a.target)
            if info is None:
                print(json.dumps({"error": "TargetNotFound", "message": a.target}))
                return 3
            path = updater.download_target(info, filepath=a.out)
            result.update({"target": a.target, "length": info.length, "custom": info.custom, "path": path})
        print(json.dumps(result))
        return 0
    except (exceptions.RepositoryError, exceptions.DownloadError) as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
