"""Prefect's state for the flow tests (its home, persisted results) goes to a temporary folder, set
before `pipelines.flows` is imported: Prefect reads its settings then."""

import os
import tempfile

os.environ.setdefault("PIPELINES_HOME", tempfile.mkdtemp(prefix="pipelines-tests-"))
