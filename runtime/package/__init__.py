"""vidrt.package: the model-package contract, what `vidrt export` writes and everything reads.

    registry.py   model variants (typed, with sources): architecture, VAE, sampling defaults
    contracts.py  each component's I/O contract (names, dtypes, dynamic axes), declared once
    manifest.py   manifest.json: schema, artifacts with sha256, engines, loading and checks
    verified.py   remembered sha256 checks (a file that matched once is trusted while unchanged)

Imports only vidrt.errors and itself.
"""
