"""The fleet side: what runs at the operator's or in the cloud, never on the vehicle.

It owns the reference consumer (``ingest``: store batches, ack them; ``rows``: what
its two stores share; ``pgstore``: the PostgreSQL one, the only importer of psycopg), its MQTT
subscriber and the operator's one-shot publish (``subscriber``), and command signing
(``signing``). It may import any vehicle package (the wire format, the uplink's link
helpers, the command schemas): both sides must speak alike. No vehicle package imports
it, so the agent on a vehicle carries none of it; paho reaches it only through
agent.uplink.mqtt.
"""
