"""`turn-monitor` in Python: a behavior for the tests of a turn's calls sharing an instance.

Every event answers with an `info` alert whose data is `{"seen": N}`, N being the events this
instance has handled (1 on a fresh instance, kept in a module global). An event whose change
sets `fail` answers with the guest's own error after counting; one that sets `panic` raises an
uncaught exception (a trap) before counting.

Built with componentize-py (scripts/build-guests.sh), which generates the `wit_world`
bindings for the `behavior` world of wit/platform.wit while it builds.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import types

SEEN = 0


class WitWorld(wit_world.WitWorld):
    def on_event(self, event):
        global SEEN
        changed = json.loads(event.changed)
        if "panic" in changed:
            raise RuntimeError("asked to panic")
        SEEN += 1
        if "fail" in changed:
            raise Err(f"asked to fail (event {SEEN} of this instance)")
        return [types.Action_Alert(types.Alert("info", "seen", json.dumps({"seen": SEEN})))]
