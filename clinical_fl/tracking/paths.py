"""Where the project lives, for the default MLflow store under ``mlruns/``.

The ServerApp runs from a copy of the app bundle (in simulation under
``$FLWR_HOME``), not from the user's checkout, so ``__file__`` and the working
directory are the wrong places to put results. An editable install records the
checkout's path; that is where ``mlruns/`` belongs.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

DISTRIBUTION = "clinical-fl-lora"


def project_root() -> Path:
    """The checkout the package was installed from (editable), else the working directory."""
    try:
        direct_url = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        direct_url = None
    if direct_url:
        info = json.loads(direct_url)
        if info.get("url", "").startswith("file://"):
            return Path(unquote(urlparse(info["url"]).path))
    return Path.cwd()
