"""serve imports bcrypt and yaml only for --web-config-file: without one (the common case)
neither their code nor bcrypt's library sits in the daemon's RSS, and no hash is computed
at start. Checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys


def test_no_bcrypt_or_yaml_without_a_web_config() -> None:
    code = ("import json, sys; import netmemtrace.commands.serve; "
            "from netmemtrace.http import webconfig; "
            "webconfig.WebConfig(); "
            "print(json.dumps(sorted(m for m in ('bcrypt', 'yaml') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
