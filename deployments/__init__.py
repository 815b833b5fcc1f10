"""mixtral-serve's Ray Serve application: one router ingress in front of one replica deployment per tier.

NOTE: keep this package's import-time footprint small: the router process imports only
`deployments.router` and its torch-free helpers; only the builder (`deployments.app`) and the
model replicas (`deployments.replica`) import the engine.
"""
