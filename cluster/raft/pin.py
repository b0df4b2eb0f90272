"""The pysyncobj version the Raft adapter is written against.

The hardened adapter (``cluster/raft/``) overrides pysyncobj's private, name-mangled
handlers and reads its private state. That is only correct for the exact release whose
source was read, so every ``cluster/raft_*`` module imports this one first and refuses to
load against anything else. Line numbers quoted in those modules refer to
``pysyncobj/syncobj.py`` (and friends) of this release.
"""

from __future__ import annotations

import pysyncobj.version

PYSYNCOBJ_VERSION = "0.3.17"

if pysyncobj.version.VERSION != PYSYNCOBJ_VERSION:
    raise ImportError(
        f"cluster.raft is written against pysyncobj=={PYSYNCOBJ_VERSION} (it overrides that "
        f"release's private handlers); found pysyncobj=={pysyncobj.version.VERSION}. "
        "Re-read docs/adr/0002-pysyncobj-hardening.md and re-check every override before "
        "changing the pin."
    )
