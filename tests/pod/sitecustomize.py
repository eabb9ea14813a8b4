"""For child processes of the pod tests (PYTHONPATH names this directory): a fake gs:// bucket
(``STABILITY_FAKE_GCS=ROOT``) and pod-like device memory queries (``STABILITY_FAKE_POD=1``),
both from tests/fake_gcs.py, installed for the life of the process."""

import os
import sys

_ACTIVE = []  # the entered context managers (a collected one would undo its patches)

if os.environ.get("STABILITY_FAKE_GCS") or os.environ.get("STABILITY_FAKE_POD"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fake_gcs

    if os.environ.get("STABILITY_FAKE_GCS"):
        _ACTIVE.append(fake_gcs.bucket(fake_gcs.Path(os.environ["STABILITY_FAKE_GCS"])))
    if os.environ.get("STABILITY_FAKE_POD"):
        _ACTIVE.append(fake_gcs.pod_devices())
    for cm in _ACTIVE:
        cm.__enter__()
