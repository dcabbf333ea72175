"""`api.asgi`, the app `strata api` serves: building it and answering requests loads no model
library, so an API process stays small (the models run in the workers)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

MODEL_LIBRARIES = ("torch", "transformers", "peft", "workers")
API = Path(__file__).resolve().parents[2] / "api"

PROBE = """
import json, sys
from fastapi.testclient import TestClient
from registry.instance import open_instance
from registry.settings import StrataSettings
open_instance(StrataSettings(), upgrade=True).close()  # what `strata migrate` does first
import api.asgi
app = api.asgi.service_app()
_, secret = app.state.inst.registry.tokens.create(name="t", scopes=["admin"])
h = {"Authorization": f"Bearer {secret}"}
with TestClient(app) as client:
    codes = [client.get("/health").status_code, client.get("/v1/streams", headers=h).status_code,
             client.post("/v1/streams", json={"name": "s", "base": {"kind": "tiny"}},
                         headers=h).status_code]
print(json.dumps({"codes": codes, "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in %r)}))
"""


def test_the_service_app_imports_no_model_library(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "STRATA_DATA_DIR": str(tmp_path),
        "STRATA_ARTIFACT_BACKEND": "local",
        "STRATA_DATABASE_URL": f"sqlite:///{tmp_path / 'strata.db'}",
        "STRATA_BROKER_URL": "redis://127.0.0.1:6379/15",
        "STRATA_BROKER_TIMEOUT_S": "2",
    }
    out = subprocess.run([sys.executable, "-c", PROBE % (MODEL_LIBRARIES,)], env=env,
                         capture_output=True, text=True, timeout=300, check=False,
                         cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # health, a read, and a stream creation checked and queued (sent to the broker)
    assert result["codes"] == [200, 200, 202], result
    assert result["loaded"] == [], result["loaded"]


def _imports(nodes: list[ast.stmt] | list[ast.AST]) -> list[str]:
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append((node.module or "").split(".")[0])
    return names


def test_the_api_package_imports_nothing_from_the_training_library() -> None:
    """api -> services -> continual's plain modules: the arrows go one way. Only the CLI's
    embedded commands (`strata serve`, `demo`, `bench`) import the workers, inside the command
    that runs the model in that process."""
    anywhere, top = [], []
    for file in sorted(API.rglob("*.py")):
        tree = ast.parse(file.read_text())
        anywhere += [
            f"{file.name}: {n}" for n in _imports(list(ast.walk(tree))) if n == "continual"
        ]
        top += [f"{file.name}: {n}" for n in _imports(tree.body)
                if n in ("workers", "torch", "transformers", "peft")]  # fmt: skip
    assert anywhere == [] and top == []
