#!/usr/bin/env python3
"""Fetches a /metrics page and parses it with prometheus_client's strict OpenMetrics parser.

Prints one JSON object per sample, so the Rust test can assert on what an independent
Prometheus implementation understood. Exits non-zero if the exposition does not parse.
"""
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers.get("Content-Type", "")
        text = response.read().decode("utf-8")
    if not content_type.startswith("application/openmetrics-text"):
        print(f"unexpected content type {content_type!r}", file=sys.stderr)
        return 1
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            print(json.dumps({"family": family.name, "type": family.type, "name": sample.name,
                              "labels": sample.labels, "value": sample.value}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
