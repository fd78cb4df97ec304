"""The control plane that the router and the workers share.

`messages` (the typed msgpack messages and their protocol version, with the flow drawn once),
`link` (a worker's connection to the router), `security` (CURVE keys, the loopback rule),
`logs` (request-id logging), `droplog` (rate-limited warnings for dropped frames),
`transfer_stats` (KV transfer figures in heartbeats), `worker_settings` and `worker_loop`
(the skeleton every worker process runs). It sits on the ground floor beside `engine/` and
`kvtransfer/`: it imports neither `pdserve/` nor `router/` nor a worker package.
"""
