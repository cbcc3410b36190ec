"""Fault injection for scripts/fault_matrix.py, on the PYTHONPATH of the processes it starts (never jaxscale's).

With JAXSCALE_FAULT_UNAVAILABLE_WHILE=FILE, Orbax's array reads raise the error tensorstore raises when its
storage cannot be reached, for as long as FILE exists.
"""

import os

_marker = os.environ.get("JAXSCALE_FAULT_UNAVAILABLE_WHILE")
if _marker:
    import orbax.checkpoint as ocp

    _restore = ocp.StandardCheckpointHandler.restore

    def _unavailable_while_marked(self, *args, **kwargs):
        if os.path.exists(_marker):
            raise ValueError("UNAVAILABLE: injected by scripts/fault_matrix.py: the storage service is unreachable")
        return _restore(self, *args, **kwargs)

    ocp.StandardCheckpointHandler.restore = _unavailable_while_marked
