"""Rewards as services: the reward server (:mod:`.server`, needs the ``server`` extra) and its defences against
silent clients (:mod:`.guards`), the wire format it shares with
:class:`~trl_flow_egrpo.rewards.remote.RemoteReward` (:mod:`.protocol`, numpy, torch and PIL only) and
:class:`~.launch.RewardServerProcess`, which runs a server in a subprocess.

Importing this package imports neither FastAPI nor uvicorn.
"""
