"""Verifies a rollout evidence bundle independently of the depot's code.

    verify_evidence.py BUNDLE DIRECTOR_ROOT

Recomputes the hash chain over the log entries exactly as exported, checks that the manifest
names its head and length, and verifies the ed25519 signature over the manifest with the
targets key listed in the director's root metadata (`1.root.json`, which the fleet certifies).
Prints {"ok": true, "entries": N, "decisions": [...]} or {"ok": false, "error": "..."}.
"""

import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FORMAT = "atlasmesh-rollout-evidence/1"


def verify(bundle, root):
    prev = bytes(32)
    for i, link in enumerate(bundle["log"], start=1):
        if link["seq"] != i:
            return f"entry {i} is missing (found seq {link['seq']})"
        if bytes.fromhex(link["prev_sha256"]) != prev:
            return f"entry {i} does not follow entry {i - 1}"
        digest = hashlib.sha256(prev + i.to_bytes(8, "big") + link["entry"].encode()).digest()
        if digest.hex() != link["sha256"]:
            return f"entry {i} was changed after it was logged"
        prev = digest
    manifest = json.loads(bundle["manifest"])
    if manifest["format"] != FORMAT:
        return f"unknown format {manifest['format']}"
    if manifest["entries"] != len(bundle["log"]) or manifest["head_sha256"] != prev.hex():
        return "the manifest does not name this log"
    sig = bundle.get("signature")
    if not sig:
        return "the bundle is not signed"
    targets = root["signed"]["roles"]["targets"]["keyids"]
    if sig["key_id"] not in targets:
        return "signed by a key the director root does not name for targets"
    public = root["signed"]["keys"][sig["key_id"]]["keyval"]["public"]
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
    try:
        key.verify(bytes.fromhex(sig["signature"]), (FORMAT + "\n").encode() + bundle["manifest"].encode())
    except InvalidSignature:
        return "the signature does not match the manifest"
    return None


def main():
    with open(sys.argv[1]) as f:
        bundle = json.load(f)
    with open(sys.argv[2]) as f:
        root = json.load(f)
    error = verify(bundle, root)
    if error:
        print(json.dumps({"ok": False, "error": error}))
        return 0
    decisions = [d["decision"] for link in bundle["log"] for d in json.loads(link["entry"])["decisions"]]
    print(json.dumps({"ok": True, "entries": len(bundle["log"]), "decisions": decisions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
