"""scripts/test-executables.py: `name path` of each test executable in cargo's JSON messages.

Reads `cargo test --no-run --message-format=json-render-diagnostics` on stdin (make build-cuda)
and prints one line per unit-test binary, e.g. `qat-quant target-cuda/release/deps/qat_quant-1a2b`.
"""

import json
import sys

for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["target"]["name"].replace("_", "-"), m["executable"])
