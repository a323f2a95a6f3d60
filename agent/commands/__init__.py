"""Signed remote commands, from envelope to result: the one control path.

It owns the COSE_Sign1 envelope and the result message (``envelope``), the command
catalogue (``catalogue``: per name the arguments, the interlock, whether it spans a
restart), the trusted keys (``keys``), the replay cache and journal (``journal``), the
verifier (``verifier``), the executor (``executor``), the vehicle's actions
(``actions``), the set_config trial marker (``trial``) and the stage the runtime's loop
drives (``stage``). Signing is the fleet's (agent.fleet.signing).

It may import agent.errors, agent.config, agent.signals, agent.wire,
agent.store.outbox (its transaction), agent.protocols and agent.sources (the writes
the actions send) and agent.fusion; never agent.runtime, agent.uplink.mqtt or
agent.fleet. agent.config imports ``keys`` only, a leaf: this package imports config,
not the other way round. This file imports nothing, so that importing ``keys`` loads
nothing else of the package.
"""
