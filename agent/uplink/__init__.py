"""The uplink: records out to the broker as batches, the cloud's acks and commands in.

It owns the broker link (``mqtt``: reconnects, the bandwidth cap; the one module that
imports paho), the cloud-ack window and the reconnect backoff (``window``), the send
stage between the outbox and the link (``pump``) and the data budget of a metered SIM
(``budget``: what the link carries this month, and the resolution it allows). The
record and batch format it sends is agent.wire, the common language of store, uplink,
commands and fleet.

It may import agent.errors, agent.config, agent.wire, agent.store (what it sends) and
the command path's check of a signed message (a signed ack is checked as a command
is); never agent.runtime, and never agent.fleet, which builds on it instead: the
fleet's subscriber takes ``mqtt``'s link helpers, so both ends name a failure alike.
"""
