"""The dependency audit of ``make lint``: pip-audit, and an honest reading of its answer.

``python deploy/audit.py <pip-audit JSON report> <pip-audit stderr log>``. Exits 1 when a
package has a known vulnerability (each is printed with its advisory ids). pip-audit
prints "No known vulnerabilities found" and exits 0 even when it could look up none of the
packages (PyPI's JSON API answering 404 for every version, as a registry mirror does), so
packages it skipped are counted and the audit says it was SKIPPED, with pip-audit's
reason; a report that is missing altogether (no route to the service) is a skip too.
Skips do not fail lint: a machine without the service can still lint. Standard library
only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(report: Path, log: Path) -> int:
    """Print the audit's outcome; 1 when a vulnerability is known, else 0."""
    if not report.is_file() or report.stat().st_size == 0:
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if "Error" in line or "error" in line] if log.is_file() else []
        print("pip-audit: SKIPPED - the vulnerability service could not be reached"
              + (f": {errors[-1].strip()[:300]}" if errors else ""))
        return 0
    deps = json.loads(report.read_text())["dependencies"]
    audited = [d for d in deps if "skip_reason" not in d]
    skipped = [d for d in deps if "skip_reason" in d]
    vulnerable = [d for d in audited if d.get("vulns")]
    for dep in vulnerable:
        ids = ", ".join(v["id"] for v in dep["vulns"])
        print(f"pip-audit: {dep['name']} {dep['version']} is vulnerable: {ids}")
    summary = (f"pip-audit: {len(audited)} of {len(deps)} packages audited, "
               f"{len(vulnerable)} with known vulnerabilities")
    if skipped:
        summary += (f"; SKIPPED {len(skipped)}: the vulnerability service could not look "
                    f"them up (e.g. {skipped[0]['skip_reason']})")
    print(summary)
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
