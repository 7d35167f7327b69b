"""ClientApp: what runs inside each hospital. Flower's registration of the handlers
(``fl_app/hospital/handlers.py``) and of the mods around training.

In deployment a SuperNode starts a fresh ClientApp process for every message, and importing
torch, transformers, PEFT and Opacus takes about 5 s of it. Secure aggregation's key
stages (setup, key sharing, unmasking, decryption) are answered by a mod and need none of
them, so the handlers' module is imported only when a message reaches a handler.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clinical_fl.protocol import messages as m
from fl_app.console import quiet_third_party
from fl_app.hospital.clipping_mod import clip_update_for_client_level_dp
from fl_app.hospital.edge import hospital_edge_mod
from fl_app.hospital.fault_drill import fault_drill_mod
from fl_app.hospital.secure_aggregation_mod import secure_aggregation_mod

quiet_third_party()  # before the handlers import Opacus, which configures logging on import

# The hospital's edge wraps every handler and mod: whatever fails leaves as a refusal code,
# never as exception text (which Flower would otherwise send to the server).
app = ClientApp(mods=[hospital_edge_mod])


@app.query(m.PREFLIGHT_QUERY)
def preflight(msg: Message, context: Context) -> Message:
    from fl_app.hospital import handlers as hospital_handlers

    return hospital_handlers.preflight(msg, context)


# Outermost first: secure aggregation masks or encrypts what client-level DP has clipped; the
# fault drill (off unless configured) breaks the update as a faulty hospital's would be.
@app.train(mods=[secure_aggregation_mod, clip_update_for_client_level_dp, fault_drill_mod])
def train(msg: Message, context: Context) -> Message:
    from fl_app.hospital import handlers as hospital_handlers

    return hospital_handlers.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fl_app.hospital import handlers as hospital_handlers

    return hospital_handlers.evaluate(msg, context)
