"""Other serving engines for the same models and handlers (Ray Serve)."""
