"""Rewards as services: the reward server (:mod:`.server`, needs the ``server`` extra) and the wire format it
shares with :class:`~trl_flow_egrpo.rewards.remote.RemoteReward` (:mod:`.protocol`, standard library and torch
only).

Importing this package imports neither FastAPI nor uvicorn.
"""
